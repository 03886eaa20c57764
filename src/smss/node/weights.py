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


class DeviceTensors:
    """Weights already on a device: torch tensors by name, views of the one copy a
    GPU's owner holds (opened by CUDA IPC, :mod:`smss.node.gpu`), on ``device``."""

    def __init__(self, tensors: Mapping[str, Any], device: str) -> None:
        self.tensors = dict(tensors)
        self.device = device


class Weights:
    """Weights of one model. ``format`` is ``"safetensors"`` or ``"onnx"``.

    ``device``: where :meth:`torch` puts the tensors (``"cpu"``, or ``"cuda:0"`` for
    an instance on a GPU): a model moves its inputs there (``weights.device``)."""

    def __init__(
        self,
        path: Path,
        format: str,
        *,
        attached: Attached | HotCopy | DeviceTensors | None = None,
        device: str = "cpu",
    ) -> None:
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise UnsafeArtifact(f"weights file type {path.suffix} is a pickle format; refused")
        self.path = path
        self.format = format
        self.attached = attached
        self.device = attached.device if isinstance(attached, DeviceTensors) else device
        self._views: Mapping[str, np.ndarray] | None = None

    def numpy(self) -> Mapping[str, np.ndarray]:
        """Read-only numpy arrays by tensor name (safetensors only)."""
        if self.format != "safetensors":
            raise UnsafeArtifact(f"numpy() needs safetensors weights, not {self.format}")
        if isinstance(self.attached, DeviceTensors):
            if self._views is None:  # copies: the weights live on the device
                self._views = {k: _readonly(v.cpu().numpy()) for k, v in self.attached.tensors.items()}
            return self._views
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
        """Tensors for ``module.load_state_dict(weights.torch(), assign=True)``, on :attr:`device`."""
        if isinstance(self.attached, DeviceTensors):
            return dict(self.attached.tensors)
        if self.attached is not None:
            from smss.node.attach import torch_views

            return torch_views(dict(self.numpy()))
        from safetensors.torch import load_file

        return dict(load_file(str(self.path), device=self.device))

    def onnx_session(self, *, prepack: bool = True, **options: Any) -> Any:
        """An ``onnxruntime.InferenceSession`` on this ONNX file, one intra-op thread by default.

        Attached to the weight store, the session computes with the initializers
        where they lie: each is handed to ONNX Runtime as a user-owned value viewing
        the attached memory (``SessionOptions.add_initializer``), not parsed into a
        copy of its own. ``prepack``: ONNX Runtime re-lays the weights of some
        operators (matrix products) out for its kernels, a copy of those weights
        made once, in the model's template, and shared by the instances forked from
        it. ``prepack=False`` keeps every weight where it lies (no copy at all) at a
        cost in speed for large matrix products (here 2.4x slower for 1024 x 1024 at
        batch 1, none for the demo's small MLP). Attached or read from the file, a
        session made with the same ``prepack`` computes the same, bit for bit."""
        import onnxruntime as ort

        if self.format != "onnx":
            raise UnsafeArtifact(f"onnx_session() needs ONNX weights, not {self.format}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(options.pop("intra_op_num_threads", 1))
        so.inter_op_num_threads = 1
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        cpu = ["CPUExecutionProvider"]
        if self.attached is None or isinstance(self.attached, DeviceTensors):
            return ort.InferenceSession(str(self.path), sess_options=so, providers=cpu, **options)
        from smss.node.attach import onnx_views

        image = bytes(self.attached.data)  # the graph, parsed by ORT (its copy of the weights is dropped)
        values = {
            name: ort.OrtValue.ortvalue_from_numpy(view)
            for name, view in onnx_views(self.attached.data, image).items()
        }
        for name, value in values.items():
            so.add_initializer(name, value)
        session = ort.InferenceSession(image, sess_options=so, providers=cpu, **options)
        # ORT's Python wrapper keeps the model's bytes (weights included) only to
        # rebuild the session on a provider fallback, which a CPU session never does
        # (its own comment calls holding them "bad"): drop that copy.
        if getattr(session, "_model_bytes", None) is image:
            session._model_bytes = None
        # ORT reads these memory blocks for the session's lifetime: the session keeps
        # them (and through their arrays, the mapping) alive.
        session.smss_initializers = values
        return session

    def __repr__(self) -> str:
        return f"Weights({self.path.name!r}, format={self.format!r})"


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
