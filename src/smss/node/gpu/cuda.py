"""The CUDA side of :class:`~smss.node.gpu.device.DeviceMemory`: the only module that
calls ``torch.cuda``. Imported only in a GPU owner or standby process, never in the
agent, a zygote or a template (a process that has initialised CUDA cannot fork a
child that uses it).

* A model's weights are one ``uint8`` buffer allocated by torch's caching allocator
  in the owner; :meth:`CudaMemory.share` calls ``UntypedStorage._share_cuda_()`` on it
  once per process that will open it (each call puts the storage behind a fresh
  reference count, which that process gives back when its view is freed), and
  :meth:`CudaMemory.open` passes those eight fields to
  ``UntypedStorage._new_shared_cuda(...)`` (``cudaIpcOpenMemHandle``), as
  ``torch.multiprocessing.reductions.rebuild_cuda_tensor`` does.
* The process sees its one GPU as device 0 (``CUDA_VISIBLE_DEVICES``, set by the
  agent from the GPU's NVML index, :func:`smss.node.gpu.shares.process_env`).

Nothing here has run on a GPU in this repository's CI: ``tests/gpu`` (marked
``gpu``) exercises it where one exists (``scripts/gpu-check``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Any

import torch

from smss.node.gpu.device import MIB, tensors_from
from smss.node.gpu.layout import Layout
from smss.node.gpu.proto import Backend, CudaHandle, Handle

DEVICE = "cuda:0"


class CudaMemory:
    backend: Backend = "cuda"

    def __init__(self, nvml_index: int | None = None) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._nvml_index = nvml_index

    def init(self) -> int:
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device (is the CUDA build of torch installed?)")
        torch.cuda.init()  # type: ignore[no-untyped-call]
        torch.cuda.set_device(0)
        torch.zeros(1, device=DEVICE).add_(1)  # creates the context now, not at first use
        torch.cuda.synchronize()
        return int(torch.cuda.get_device_properties(0).total_memory) // MIB

    def warm(self) -> None:
        """One small convolution, normalisation, matrix product and reduction: cuDNN's
        and cuBLAS's handles and workspaces are made here, before any model is bound."""
        import torch.nn.functional as F

        with torch.inference_mode():
            x = torch.randn(2, 3, 16, 16, device=DEVICE)
            w = torch.randn(8, 3, 3, 3, device=DEVICE)
            y = F.relu(F.conv2d(x, w, padding=1))
            y = F.batch_norm(y, torch.zeros(8, device=DEVICE), torch.ones(8, device=DEVICE))
            y = F.max_pool2d(y, 2).flatten(1)
            (y @ torch.randn(y.shape[1], 10, device=DEVICE)).softmax(-1).sum().item()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def context_mb(self) -> int | None:
        """This process's memory on the GPU as NVML counts it (context, libraries and
        kernels) less what torch's allocator holds; None where NVML cannot say (no
        ``nvidia-ml-py``, or a PID namespace that hides our pid from it)."""
        if self._nvml_index is None:
            return None
        try:
            pynvml: Any = importlib.import_module("pynvml")
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(self._nvml_index)
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid == os.getpid() and p.usedGpuMemory:
                        used = int(p.usedGpuMemory) - int(torch.cuda.memory_reserved(0))
                        return max(0, used // MIB)
            finally:
                pynvml.nvmlShutdown()
        except Exception:
            return None
        return None

    def upload(self, key: str, image: memoryview, layout: Layout) -> None:
        buf = torch.empty(max(layout.nbytes, 1), dtype=torch.uint8, device=DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only segment: only read
            host = torch.frombuffer(image, dtype=torch.uint8) if len(image) else torch.empty(0)
        # One copy per tensor (pageable memory: the driver stages it): a few hundred
        # small copies cost milliseconds, the large ones run at the link's speed.
        for s in layout.slots:
            buf[s.offset : s.offset + s.nbytes].copy_(host[s.source : s.source + s.nbytes])
        torch.cuda.synchronize()
        self.free(key)
        self._buffers[key] = buf

    def share(self, key: str) -> Handle:
        storage = self._buffers[key].untyped_storage()
        device, handle, size, offset, ref_counter, ref_offset, event, event_sync = storage._share_cuda_()  # type: ignore[no-untyped-call]
        return CudaHandle(
            int(device),
            bytes(handle),
            int(size),
            int(offset),
            bytes(ref_counter),
            int(ref_offset),
            bytes(event),
            bool(event_sync),
        )

    def free(self, key: str) -> None:
        if self._buffers.pop(key, None) is not None:
            # Blocks other processes still hold wait in torch's limbo until they let go.
            torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]
            torch.cuda.empty_cache()

    def close(self) -> None:
        for key in list(self._buffers):
            self.free(key)

    def open(self, handle: Handle, layout: Layout) -> dict[str, Any]:
        if not isinstance(handle, CudaHandle):
            raise RuntimeError("a CUDA standby was given a host buffer")
        storage = torch.UntypedStorage._new_shared_cuda(
            handle.device,
            handle.handle,
            handle.size,
            handle.offset,
            handle.ref_counter,
            handle.ref_counter_offset,
            handle.event_handle,
            handle.event_sync_required,
        )
        base = torch.empty((0,), dtype=torch.uint8, device=DEVICE)
        base.set_(storage, 0, (storage.nbytes(),), (1,))
        return tensors_from(base, layout)

    def cap(self, fraction: float) -> None:
        torch.cuda.set_per_process_memory_fraction(float(fraction), 0)

    def device(self) -> str:
        return DEVICE

    def out_of_memory(self, error: BaseException) -> bool:
        if isinstance(error, torch.OutOfMemoryError):
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
            return True
        return False


__all__ = ["CudaMemory"]
