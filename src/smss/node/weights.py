"""``smss.Weights``: what a model's ``load()`` receives.

A read-only view of a model's weights file. Today tensors are read from the
safetensors file (memory-mapped by safetensors); the weight store of a node
replaces the backing with one shared copy per node without changing this face.
Pickle formats are never read: weights are safetensors or ONNX only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from smss.errors import UnsafeArtifact

_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib"}


class Weights:
    """Weights of one model. ``format`` is ``"safetensors"`` or ``"onnx"``."""

    def __init__(
        self,
        path: Path,
        format: str,
        *,
        arrays: Callable[[], Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise UnsafeArtifact(f"weights file type {path.suffix} is a pickle format; refused")
        self.path = path
        self.format = format
        self._arrays = arrays

    def numpy(self) -> Mapping[str, np.ndarray]:
        """Read-only numpy arrays by tensor name (safetensors only)."""
        if self.format != "safetensors":
            raise UnsafeArtifact(f"numpy() needs safetensors weights, not {self.format}")
        if self._arrays is not None:
            return self._arrays()
        from safetensors.numpy import load_file

        arrays = load_file(str(self.path))
        for a in arrays.values():
            a.flags.writeable = False
        return arrays

    def torch(self) -> dict[str, Any]:
        """Tensors for ``module.load_state_dict(weights.torch())``."""
        import torch

        if self._arrays is not None:
            return {k: torch.from_numpy(v) for k, v in self._arrays().items()}
        from safetensors.torch import load_file

        return dict(load_file(str(self.path)))

    def onnx_session(self, **options: Any) -> Any:
        """An ``onnxruntime.InferenceSession`` on this ONNX file, one intra-op thread by default."""
        import onnxruntime as ort

        if self.format != "onnx":
            raise UnsafeArtifact(f"onnx_session() needs ONNX weights, not {self.format}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(options.pop("intra_op_num_threads", 1))
        so.inter_op_num_threads = 1
        return ort.InferenceSession(
            str(self.path), sess_options=so, providers=["CPUExecutionProvider"], **options
        )

    def __repr__(self) -> str:
        return f"Weights({self.path.name!r}, format={self.format!r})"
