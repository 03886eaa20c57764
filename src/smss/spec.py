"""Function specs: what a deployed model declares, validated once at deploy time.

These are msgspec structs: they are stored (registry) and sent across process
boundaries as JSON / msgpack, never pickled.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec
import numpy as np

from smss.errors import InvalidSpec

Runtime = Literal["torch", "onnx", "python"]
WeightsFormat = Literal["safetensors", "onnx"]
#: Where a function's instances run (see :class:`Resources`).
DeviceChoice = Literal["auto", "cpu", "cuda"]

#: Open Inference Protocol v2 datatypes and their numpy dtypes (little-endian).
DATATYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    # Strings: an object array of ``bytes`` (see smss.bytes_tensors for the wire form).
    "BYTES": np.dtype(object),
}
DTYPE_TO_DATATYPE: dict[str, str] = {dt.str: name for name, dt in DATATYPES.items()}
DTYPE_TO_DATATYPE["|b1"] = "BOOL"
DTYPE_TO_DATATYPE["|u1"] = "UINT8"
DTYPE_TO_DATATYPE["|i1"] = "INT8"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")  # fullmatch: "$" would let a final newline in
MAX_DIMS = 8


def check_name(kind: str, name: str) -> str:
    """Names become file and URL path parts: letters, digits, ``_ . -``; no ``..``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidSpec(
            f"invalid {kind} name {name!r}: use 1-63 letters, digits, '_', '.', '-' "
            "starting with a letter or digit, without '..'"
        )
    return name


#: Joins a name and a version into the internal name a second version is stored under
#: (see :mod:`smss.app.versions`); names users give cannot hold it.
SEPARATOR = "~"


def internal_name(name: str, version: str) -> str:
    return f"{name}{SEPARATOR}{version}"


def public_name(stored: str) -> tuple[str, str | None]:
    """``(name, version)`` of a stored function name; version None for a plain name."""
    name, sep, version = stored.partition(SEPARATOR)
    return name, (version if sep else None)


def check_stored_name(stored: str) -> str:
    """A plain name, or ``name~version`` with both parts valid names."""
    name, version = public_name(stored)
    check_name("function", name)
    if version is not None:
        check_name("version", version)
    return stored


def datatype_of(dtype: np.dtype[np.generic]) -> str:
    try:
        return DTYPE_TO_DATATYPE[dtype.str]
    except KeyError:
        raise InvalidSpec(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


class TensorSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One named tensor: ``shape`` uses -1 for a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > 128:
            raise InvalidSpec(f"invalid tensor name {self.name!r}")
        if self.datatype not in DATATYPES:
            raise InvalidSpec(
                f"tensor {self.name!r}: unsupported datatype {self.datatype!r} "
                f"(one of {', '.join(DATATYPES)})"
            )
        if len(self.shape) > MAX_DIMS or any(d < -1 or d == 0 for d in self.shape):
            raise InvalidSpec(
                f"tensor {self.name!r}: shape {list(self.shape)} must have at most {MAX_DIMS} "
                "dimensions, each positive or -1"
            )

    @property
    def dtype(self) -> np.dtype[np.generic]:
        return DATATYPES[self.datatype]

    def zeros(self) -> np.ndarray:
        """Zeros (empty strings for BYTES) of this shape, with batch 1 for a variable dimension."""
        shape = [1 if d == -1 else d for d in self.shape]
        if self.datatype == "BYTES":
            return np.full(shape, b"", dtype=object)
        return np.zeros(shape, self.dtype)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )


class Batching(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Dynamic batching: up to ``max_batch_size`` requests that arrive within
    ``batch_wait_ms`` of the first are concatenated on axis 0 into one predict()."""

    max_batch_size: int = 1
    batch_wait_ms: float = 0.0


class Scaling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Instances: ``concurrency`` is the most requests one instance holds at once;
    ``keep_alive_s`` overrides the platform's keep-alive policy when set."""

    min_instances: int = 0
    max_instances: int = 4
    concurrency: int = 8
    target_concurrency: float | None = None
    keep_alive_s: float | None = None


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one instance declares it needs; placement packs instances by it.

    ``gpu`` is a fraction of one GPU's compute (0 < gpu <= 1; CUDA MPS thread
    percentage where an MPS daemon runs) and, when ``gpu_memory_mb`` is not given,
    also its share of that GPU's memory. ``gpu_memory_mb``: the GPU memory one
    instance uses *besides the model's weights* (activations, workspace, its CUDA
    context): the weights are held once per GPU and counted once, however many
    instances use them (:mod:`smss.node.gpu`).

    ``device``: ``"cuda"`` runs instances on a GPU (and needs ``gpu`` or
    ``gpu_memory_mb``), ``"cpu"`` on the CPU (and refuses GPU needs), and ``"auto"``
    (the default) means cuda when a GPU need is declared, else cpu: a spec written
    before ``device`` existed keeps its meaning. A function on a GPU that no node
    could ever hold is refused at deploy, as any need that can never fit."""

    cpu: float = 1.0
    memory_mb: int = 1024
    gpu: float = 0.0
    gpu_memory_mb: int = 0
    device: DeviceChoice = "auto"

    @property
    def on_gpu(self) -> bool:
        """Instances run on a CUDA device."""
        if self.device == "auto":
            return self.gpu > 0 or self.gpu_memory_mb > 0
        return self.device == "cuda"

    def validate(self) -> None:
        if self.cpu <= 0 or self.memory_mb <= 0 or self.gpu < 0 or self.gpu_memory_mb < 0:
            raise InvalidSpec("resources must be positive (cpu, memory_mb) or zero (gpu)")
        if self.gpu > 1:
            raise InvalidSpec(
                f"gpu {self.gpu:g}: an instance runs on one GPU, so gpu is the fraction of it "
                "the instance uses (0 < gpu <= 1)"
            )
        wants_gpu = self.gpu > 0 or self.gpu_memory_mb > 0
        if self.device == "cpu" and wants_gpu:
            raise InvalidSpec(
                "device 'cpu' declares no GPU needs: drop gpu / gpu_memory, or use device 'cuda'"
            )
        if self.device == "cuda" and not wants_gpu:
            raise InvalidSpec(
                "device 'cuda' needs a GPU share: declare gpu_memory (e.g. '2GiB') "
                "or gpu (a fraction, e.g. 0.25)"
            )


class FunctionSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A deployed model: its code entry point, tensors, runtime and settings.

    ``entrypoint`` is ``"<file>.py:<ClassName>"`` relative to the function's
    artifact directory. ``weights`` names the weights file in that directory.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    entrypoint: str
    runtime: Runtime = "python"
    version: str = "1"
    weights: str | None = None
    weights_format: WeightsFormat | None = None
    batching: Batching = Batching()
    scaling: Scaling = Scaling()
    resources: Resources = Resources()
    idempotent: bool = True

    def validate(self) -> FunctionSpec:
        check_name("function", self.name)
        check_name("version", self.version)
        if not self.inputs or not self.outputs:
            raise InvalidSpec(f"function {self.name!r} must declare inputs and outputs")
        for group in (self.inputs, self.outputs):
            names = [t.name for t in group]
            if len(set(names)) != len(names):
                raise InvalidSpec(f"function {self.name!r}: duplicate tensor names {names}")
            for t in group:
                t.validate()
        module, _, cls = self.entrypoint.partition(":")
        if not module.endswith(".py") or not cls.isidentifier():
            raise InvalidSpec(f"entrypoint {self.entrypoint!r} must be 'file.py:ClassName'")
        check_name("entrypoint file", module)
        if self.weights is not None:
            check_name("weights file", self.weights)
            if self.weights_format is None:
                raise InvalidSpec("weights given without weights_format")
        b, s, r = self.batching, self.scaling, self.resources
        if not 1 <= b.max_batch_size <= 1024 or not 0 <= b.batch_wait_ms <= 10_000:
            raise InvalidSpec("max_batch_size must be 1-1024 and batch_wait_ms 0-10000")
        if b.max_batch_size > 1 and any(t.shape[:1] != (-1,) for t in self.inputs):
            raise InvalidSpec("batching needs every input's first dimension to be -1")
        if not 0 <= s.min_instances <= s.max_instances or not 1 <= s.max_instances <= 1024:
            raise InvalidSpec("need 0 <= min_instances <= max_instances, 1 <= max_instances <= 1024")
        if not 1 <= s.concurrency <= 4096:
            raise InvalidSpec("concurrency must be 1-4096")
        if s.keep_alive_s is not None and s.keep_alive_s < 0:
            raise InvalidSpec("keep_alive_s must be >= 0")
        r.validate()
        if r.on_gpu and (self.runtime == "onnx" or self.weights_format == "onnx"):
            raise InvalidSpec(
                "on a GPU, SMSS serves torch and python models with safetensors weights; "
                "ONNX Runtime on CUDA is not supported (use device 'cpu')"
            )
        return self

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


_MIB_UNITS = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}
_AMOUNT = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_mib(value: int | str, what: str) -> int:
    """A memory amount in MiB: an int is MiB already; a string is a number with an
    optional unit, binary whatever it is spelled (``"2GiB"``, ``"2G"`` and ``"2GB"``
    are 2048, ``"512MiB"`` and ``"512"`` are 512). Rounded up to a whole MiB."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidSpec(f"{what} must be MiB as an int or a size such as '2GiB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidSpec(f"{what} must not be negative, not {value}")
        return value
    match = _AMOUNT.fullmatch(value)
    if match is None:
        raise InvalidSpec(f"invalid {what} {value!r}: use a size such as '512MiB' or '2GiB'")
    mib = float(match.group(1)) * _MIB_UNITS[match.group(2).upper() or "M"]
    return int(-(-mib // 1))


def decode_spec(data: bytes) -> FunctionSpec:
    """Decode and validate a spec from JSON; any problem is an :class:`InvalidSpec`."""
    try:
        spec = msgspec.json.decode(data, type=FunctionSpec)
    except msgspec.ValidationError as e:
        raise InvalidSpec(f"invalid function spec: {e}") from None
    except msgspec.DecodeError:
        raise InvalidSpec("function spec is not valid JSON") from None
    return spec.validate()
