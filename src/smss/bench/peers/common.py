"""What every peer of ``smss bench peers`` shares: the demo model it serves, how it
loads it, and the Open Inference Protocol's JSON bodies for the peers that do not
speak the protocol themselves (the container and Ray Serve).

Peer servers run this module in their own virtual environments, so it imports
only numpy and msgspec at the top; ``smss``'s model loading and torch come in
with :func:`load_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

#: Every peer serves with this many torch / OpenMP / BLAS threads per process.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


class ModelInfo(msgspec.Struct, frozen=True):
    """One demo model as every system is given it, with the batching and scaling
    settings of its ``@smss.model`` spec (which the peers copy where they have them)."""

    name: str
    source: str
    class_name: str
    weights: str
    input_name: str
    #: One request's input shape (a batch of one).
    input_shape: tuple[int, ...]
    output_name: str
    max_batch_size: int
    batch_wait_ms: float
    #: Requests one instance takes at once.
    concurrency: int
    max_instances: int

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str) -> ModelInfo:
        return msgspec.json.decode(text, type=cls)


def demo_model(data_dir: Path, name: str) -> ModelInfo:
    """The demo model ``name`` with its weights generated (or reused) under ``data_dir``."""
    from smss._model import spec_of
    from smss.demo.generate import ensure_artifact
    from smss.packaging import load_class

    art = ensure_artifact(data_dir, name)
    _, cls = load_class(f"{art.source}:{art.class_name}")
    spec = spec_of(cls)
    (tensor,) = spec.inputs
    return ModelInfo(
        name=name,
        source=str(art.source),
        class_name=art.class_name,
        weights=str(art.weights),
        input_name=tensor.name,
        input_shape=(1, *(d for d in tensor.shape[1:])),
        output_name=spec.outputs[0].name,
        max_batch_size=spec.batching.max_batch_size,
        batch_wait_ms=spec.batching.batch_wait_ms,
        concurrency=spec.scaling.concurrency,
        max_instances=spec.scaling.max_instances,
    )


def load_model(info: ModelInfo) -> Any:
    """The model built as SMSS builds it (``cls()``, ``load(Weights)``), on one torch thread."""
    import torch

    torch.set_num_threads(1)
    from smss.node.weights import Weights
    from smss.packaging import load_class

    _, cls = load_class(f"{info.source}:{info.class_name}")
    model = cls()
    model.load(Weights(Path(info.weights), "safetensors"))
    return model


def sample_input(info: ModelInfo) -> npt.NDArray[np.float32]:
    """The one input every system is sent (seeded)."""
    n = int(np.prod(info.input_shape))
    return np.random.default_rng(0).standard_normal(n).astype(np.float32).reshape(info.input_shape)


def json_body(info: ModelInfo) -> bytes:
    """The V2 JSON request body of :func:`sample_input`."""
    x = sample_input(info)
    tensor = {"name": info.input_name, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return msgspec.json.encode({"inputs": [tensor]})


def binary_body(info: ModelInfo) -> tuple[bytes, list[tuple[str, str]]]:
    """The same request with the input as raw bytes (the binary tensor extension),
    and the headers it needs."""
    x = sample_input(info)
    tensor = {
        "name": info.input_name,
        "datatype": "FP32",
        "shape": list(x.shape),
        "parameters": {"binary_data_size": x.nbytes},
    }
    header = msgspec.json.encode({"inputs": [tensor]})
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Inference-Header-Content-Length", str(len(header))),
    ]
    return header + x.tobytes(), headers


# -- the protocol's JSON, for the servers that do not speak it themselves ------------------------

_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


class _Tensor(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]


class _Request(msgspec.Struct):
    inputs: list[_Tensor]


_request_decoder = msgspec.json.Decoder(_Request)


class BadRequest(ValueError):
    """A body that is not a V2 JSON inference request this server can take."""


def decode_request(body: bytes) -> dict[str, npt.NDArray[Any]]:
    try:
        request = _request_decoder.decode(body)
        return {
            t.name: np.asarray(t.data, dtype=_DTYPES[t.datatype]).reshape(t.shape) for t in request.inputs
        }
    except (msgspec.DecodeError, KeyError, ValueError) as e:
        raise BadRequest(str(e)) from e


def encode_response(model_name: str, outputs: dict[str, npt.NDArray[Any]]) -> bytes:
    tensors = [
        {"name": k, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
        for k, v in outputs.items()
    ]
    return msgspec.json.encode({"model_name": model_name, "outputs": tensors})


def output_of(body: bytes, name: str) -> npt.NDArray[np.float32]:
    """Output ``name`` of a V2 JSON response (whichever system wrote it)."""
    doc = msgspec.json.decode(body)
    for t in doc.get("outputs", ()):
        if t.get("name") == name:
            return np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
    raise BadRequest(f"no output {name!r} in the response")
