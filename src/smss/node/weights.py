"""``smss.Weights``: what a model's ``load()`` receives.

A read-only view of a model's weights. In an instance started by the node
agent the tensors are zero-copy views of the node's weight store (one shared
copy per node, see :mod:`smss.node.weightstore`); used on its own (tests,
benchmarks) it reads the file.
Pickle formats are never read: weights are safetensors or ONNX only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smss.errors import UnsafeArtifact

if TYPE_CHECKING:
    from smss.node.attach import Attached, HotCopy

_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib"}


class Weights:
    """Weights of one model. ``format`` is ``"safetensors"`` or ``"onnx"``."""

    def __init__(
        self,
        path: Path,
        format: str,
        *,
        attached: Attached | HotCopy | None = None,
    ) -> None:
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise UnsafeArtifact(f"weights file type {path.suffix} is a pickle format; refused")
        self.path = path
        self.format = format
        self.attached = attached
        self._views: Mapping[str, np.ndarray] | None = None

    def numpy(self) -> Mapping[str, np.ndarray]:
        """Read-only numpy arrays by tensor name (safetensors only)."""
        if self.format != "safetensors":
            raise UnsafeArtifact(f"numpy() needs safetensors weights, not {self.format}")
        if self.attached is not None:
            if self._views is None:
                self._views = self.attached.safetensors()
            return self._views
        from safetensors.numpy import load_file

        arrays = load_file(str(self.path))
        for a in arrays.values():
            a.flags.writeable = False
        return arrays

    def torch(self) -> dict[str, Any]:
        """Tensors for ``module.load_state_dict(weights.torch())``."""
        if self.attached is not None:
            from smss.node.attach import torch_views

            return torch_views(dict(self.numpy()))
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
        source: str | bytes = str(self.path)
        if self.attached is not None:
            source = bytes(self.attached.data)  # ORT parses its own copy of the (small) graph
        return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"], **options)

    def __repr__(self) -> str:
        return f"Weights({self.path.name!r}, format={self.format!r})"
