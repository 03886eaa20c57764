"""Weights for the demo models, generated deterministically on first use.

``ensure_artifact(dest, name)`` writes ``dest/<file>`` and a ``<file>.sha256``
sidecar (``sha256sum`` format) and reuses them while the file still matches
the sidecar. Every tensor is drawn from its own numpy ``Generator`` seeded by
(model seed, CRC-32 of the tensor name), so the bytes do not depend on the
order of generation, on torch's random streams or on the thread count: two
runs give identical files.

Guarantees: a file is written under a temporary name and moved into place with
``os.replace``, then its sidecar is written the same way, so a crash leaves
either no sidecar (the file is regenerated) or a complete, verified file.
Concurrent generators write identical bytes, so the last replace wins harmlessly.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from smss.demo import models
from smss.spec import WeightsFormat

if TYPE_CHECKING:
    from torch import nn

#: The models ``ensure_demo_artifacts`` prepares; ``cnn_large`` (400 MB) only on request.
DEMO_MODELS = ("mlp", "cnn", "mlp_onnx")
#: The stages of the "behavior" workflow (:mod:`smss.demo.behavior`).
BEHAVIOR_MODELS = ("behavior_perceive", "behavior_track", "behavior_respond")
#: Bumped when a recipe changes; recorded in each file (provenance, not checked).
RECIPE_VERSION = "1"
ONNX_OPSET = 17
_ONNX_IR_VERSION = 8  # the lowest IR that carries opset 17: readable by older runtimes too

Arrays = dict[str, npt.NDArray[np.generic]]


@dataclass(frozen=True)
class DemoArtifact:
    """A demo model ready to deploy: ``source`` holds class ``class_name``."""

    name: str
    source: Path
    class_name: str
    weights: Path
    weights_format: WeightsFormat


@dataclass(frozen=True)
class _Recipe:
    name: str
    class_name: str
    file: str
    seed: int
    write: Callable[[_Recipe, Path], None]


def ensure_demo_artifacts(dest: Path) -> list[DemoArtifact]:
    """Generate (or reuse) the weights of every model in :data:`DEMO_MODELS`."""
    return [ensure_artifact(dest, name) for name in DEMO_MODELS]


def ensure_behavior_artifacts(dest: Path) -> list[DemoArtifact]:
    """Generate (or reuse) the weights of every model in :data:`BEHAVIOR_MODELS`."""
    return [ensure_artifact(dest, name) for name in BEHAVIOR_MODELS]


def ensure_artifact(dest: Path, name: str) -> DemoArtifact:
    """The artifact of demo model ``name``, generating its weights into ``dest`` if needed."""
    try:
        recipe = _RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown demo model {name!r}; one of {', '.join(_RECIPES)}") from None
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / recipe.file
    if not _intact(path):
        _atomic_write(path, lambda tmp: recipe.write(recipe, tmp))
        line = f"{_sha256(path)}  {path.name}\n"
        _atomic_write(_sidecar(path), lambda tmp: tmp.write_text(line, encoding="ascii"))
    fmt: WeightsFormat = "onnx" if path.suffix == ".onnx" else "safetensors"
    return DemoArtifact(name, Path(models.__file__), recipe.class_name, path, fmt)


def missing(dest: Path, names: tuple[str, ...]) -> list[str]:
    """The models of ``names`` whose weights under ``dest`` are not there (or damaged)."""
    return [n for n in names if not _intact(dest / _RECIPES[n].file)]


def main(argv: list[str] | None = None) -> None:
    """``python -m smss.demo.generate DEST NAME...``: generate those weights into DEST.

    Generating imports torch (and onnx), so a platform runs this in a process of its
    own: its gateway never imports a model runtime."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    dest, names = Path(args[0]), args[1:]
    for name in names:
        ensure_artifact(dest, name)


def parameter_count(name: str) -> int:
    """Parameters of a torch demo model, counted on the ``meta`` device (nothing allocated)."""
    return sum(p.numel() for p in _meta_module(name).parameters())


# -- files ---------------------------------------------------------------------------------------


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _intact(path: Path) -> bool:
    try:
        recorded = _sidecar(path).read_text(encoding="ascii").split()
    except (FileNotFoundError, UnicodeDecodeError):
        return False
    return path.is_file() and recorded[:1] == [_sha256(path)]


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- tensors -------------------------------------------------------------------------------------


def _meta_module(name: str) -> nn.Module:
    import torch

    builders: dict[str, Callable[[], nn.Module]] = {
        "mlp": models.build_mlp,
        "cnn": models.build_cnn,
        "cnn_large": lambda: models.build_cnn(models.CNN_LARGE_HEAD),
        "behavior_perceive": models.build_perceive,
        "behavior_track": models.build_track,
        "behavior_respond": models.build_respond,
    }
    if name not in builders:
        raise ValueError(f"{name!r} is not a torch demo model; one of {', '.join(builders)}")
    with torch.device("meta"):
        return builders[name]()


class _Draw:
    """Draws the tensors of one model; each tensor has its own seeded stream."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.arrays: Arrays = {}

    def _rng(self, key: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(key.encode())])

    def normal(self, key: str, shape: tuple[int, ...], mean: float, std: float) -> None:
        a = self._rng(key).standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        a += np.float32(mean)
        self.arrays[key] = a

    def uniform(self, key: str, shape: tuple[int, ...], low: float, high: float) -> None:
        a = self._rng(key).random(shape, dtype=np.float32)
        a *= np.float32(high - low)
        a += np.float32(low)
        self.arrays[key] = a


def _init_arrays(module: nn.Module, seed: int) -> Arrays:
    """Kaiming-normal conv and linear weights; GRU cells as torch initialises them;
    BatchNorm scales, shifts and running statistics drawn near their trained
    ranges so outputs vary but stay bounded."""
    from torch import nn

    draw = _Draw(seed)
    for mname, mod in module.named_modules():
        p = f"{mname}." if mname else ""
        if isinstance(mod, nn.Conv2d | nn.Linear):
            shape = tuple(mod.weight.shape)
            fan_in = math.prod(shape[1:])
            draw.normal(p + "weight", shape, 0.0, math.sqrt(2.0 / fan_in))
            if mod.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                draw.uniform(p + "bias", tuple(mod.bias.shape), -bound, bound)
        elif isinstance(mod, nn.BatchNorm2d):
            (c,) = mod.weight.shape
            # A residual branch's last BatchNorm scales down, as trained ResNets
            # do, so the identity path dominates and activations do not blow up.
            scale = 0.2 if mname.endswith("bn2") else 1.0
            draw.normal(p + "weight", (c,), scale, 0.1 * scale)
            draw.normal(p + "bias", (c,), 0.0, 0.1)
            draw.normal(p + "running_mean", (c,), 0.0, 0.1)
            draw.uniform(p + "running_var", (c,), 0.5, 1.5)
            draw.arrays[p + "num_batches_tracked"] = np.zeros((), dtype=np.int64)
        elif isinstance(mod, nn.GRUCell):
            # torch's own GRU init: every tensor uniform in +-1/sqrt(hidden).
            bound = 1.0 / math.sqrt(mod.hidden_size)
            for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                param = getattr(mod, key)
                if param is not None:
                    draw.uniform(p + key, tuple(param.shape), -bound, bound)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: a.shape for k, a in draw.arrays.items()}
    if got != expected:
        raise RuntimeError(f"demo weights do not cover the module: {sorted(set(got) ^ set(expected))}")
    return draw.arrays


def _torch_arrays(recipe: _Recipe) -> Arrays:
    return _init_arrays(_meta_module(recipe.name), recipe.seed)


def _write_safetensors(recipe: _Recipe, path: Path) -> None:
    from safetensors.numpy import save_file

    # One key only: safetensors writes metadata from a hash map, so with two
    # keys their order (and the file's bytes) would change from run to run.
    metadata = {"smss.demo": f"{recipe.name} recipe {RECIPE_VERSION}"}
    save_file(_torch_arrays(recipe), str(path), metadata=metadata)


def _write_mlp_onnx(recipe: _Recipe, path: Path) -> None:
    """The MLP as Gemm/Relu nodes over exactly the ``mlp`` recipe's tensors."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    arrays = _torch_arrays(_RECIPES["mlp"])
    n_layers = len(models.MLP_SIZES) - 1
    nodes, inits = [], []
    x = "x"
    for i in range(n_layers):
        w, b = f"{2 * i}.weight", f"{2 * i}.bias"
        inits += [numpy_helper.from_array(arrays[w], w), numpy_helper.from_array(arrays[b], b)]
        last = i == n_layers - 1
        out = "y" if last else f"h{i}"
        # Weights stay [out, in] as in torch; Gemm transposes B.
        nodes.append(helper.make_node("Gemm", [x, w, b], [out], name=f"fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"], name=f"relu{i}"))
            x = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", models.MLP_SIZES[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", models.MLP_SIZES[-1]])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="smss.demo",
        producer_version=RECIPE_VERSION,
        ir_version=_ONNX_IR_VERSION,
    )
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


_RECIPES: dict[str, _Recipe] = {
    r.name: r
    for r in (
        _Recipe("mlp", "MLP", "mlp.safetensors", 1, _write_safetensors),
        _Recipe("cnn", "CNN", "cnn.safetensors", 2, _write_safetensors),
        # The same seed and builder as "mlp": the ONNX graph carries mlp's exact tensors.
        _Recipe("mlp_onnx", "MLPOnnx", "mlp.onnx", 1, _write_mlp_onnx),
        _Recipe("cnn_large", "CNNLarge", "cnn_large.safetensors", 3, _write_safetensors),
        _Recipe("behavior_perceive", "Perceive", "behavior_perceive.safetensors", 4, _write_safetensors),
        _Recipe("behavior_track", "Track", "behavior_track.safetensors", 5, _write_safetensors),
        _Recipe("behavior_respond", "Respond", "behavior_respond.safetensors", 6, _write_safetensors),
    )
}


if __name__ == "__main__":
    main()
