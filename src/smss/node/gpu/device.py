"""A device's memory as the GPU processes use it: one interface, two implementations.

:class:`DeviceMemory` is what the owner (upload, share, free) and a standby (init,
cap, open, warm) need of a device. :class:`~smss.node.gpu.cuda.CudaMemory` does it on
a CUDA GPU; :class:`HostMemory` does it in host shared memory, so the same owner,
standby, messages and agent code run, and are tested, on machines without a GPU
(there a buffer is a read-only ``/dev/shm`` mapping and the cap is not enforced).

Both build a model's tensors the same way (:func:`tensors_from`): views of the one
buffer at the offsets of its :class:`~smss.node.gpu.layout.Layout`, so no tensor is
copied when an instance attaches.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from smss.errors import StartFailed, UnsafeArtifact
from smss.node.gpu.layout import Layout
from smss.node.gpu.proto import Backend, Handle, HostHandle

if TYPE_CHECKING:
    import torch

MIB = 1 << 20
SHM_DIR = Path("/dev/shm")


class GpuShareExceeded(MemoryError):
    """Raised in an instance that tried to use more GPU memory than its share: that
    request fails (a model error naming the share), the instance empties its cache and
    keeps serving, and its neighbours on the GPU never see it."""


class DeviceMemory(Protocol):
    """One device, as seen from one process (which sees it as its device 0)."""

    backend: Backend

    def init(self) -> int:
        """Create the process's context on the device; returns its memory in MiB."""
        ...

    def warm(self) -> None:
        """Initialise the math libraries (a few small kernels), before any model."""
        ...

    def context_mb(self) -> int | None:
        """This process's own footprint on the device beyond its allocations, if measurable."""
        ...

    def upload(self, key: str, image: memoryview, layout: Layout) -> None:
        """Owner: copy the tensors of a safetensors ``image`` into a new buffer as ``layout`` says."""
        ...

    def share(self, key: str) -> Handle:
        """Owner: a handle to ``key``'s buffer for one more process."""
        ...

    def free(self, key: str) -> None:
        """Owner: drop ``key``'s buffer (processes that opened it keep their view)."""
        ...

    def open(self, handle: Handle, layout: Layout) -> dict[str, Any]:
        """Standby: the model's tensors, as views of the buffer ``handle`` names."""
        ...

    def cap(self, fraction: float) -> None:
        """Standby: cap this process's allocations at ``fraction`` of the device's memory."""
        ...

    def device(self) -> str:
        """The torch device name tensors live on (``cuda:0`` or ``cpu``)."""
        ...

    def out_of_memory(self, error: BaseException) -> bool:
        """Whether ``error`` is an allocation refused by the cap (after which the cache is emptied)."""
        ...

    def close(self) -> None:
        """Owner: drop every buffer."""
        ...


# ---------------------------------------------------------------- tensors


def torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": torch.uint16,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": torch.uint32,
        "F32": torch.float32,
        "F64": torch.float64,
        "I64": torch.int64,
        "U64": torch.uint64,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E4M3": torch.float8_e4m3fn,
    }


def tensors_from(base: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views of the uint8 tensor ``base`` (the whole buffer), one per slot of ``layout``."""
    if base.numel() < layout.nbytes:
        raise UnsafeArtifact(f"weight buffer holds {base.numel()} bytes, its layout needs {layout.nbytes}")
    dtypes = torch_dtypes()
    out = {}
    for s in layout.slots:
        raw = base[s.offset : s.offset + s.nbytes]
        out[s.name] = raw.view(dtypes[s.dtype]).reshape(s.shape)
    return out


def copy_into(target: memoryview, image: memoryview, layout: Layout) -> None:
    """Write each tensor of ``image`` (a safetensors image) where ``layout`` puts it."""
    for s in layout.slots:
        target[s.offset : s.offset + s.nbytes] = image[s.source : s.source + s.nbytes]


# ---------------------------------------------------------------- host backend


class HostMemory:
    """The CPU path: a "device" of ``memory_mb`` in host shared memory. Buffers are
    ``/dev/shm`` files named ``<prefix>-<key>-<n>``; a process opens one read-only."""

    backend: Backend = "host"

    def __init__(self, memory_mb: int, prefix: str = "smss-host", shm_dir: Path = SHM_DIR) -> None:
        self._memory_mb = memory_mb
        self._prefix = prefix
        self._dir = shm_dir
        self._paths: dict[str, Path] = {}
        self._count = 0
        self._maps: list[mmap.mmap] = []
        self.fraction: float | None = None

    def init(self) -> int:
        return self._memory_mb

    def warm(self) -> None:
        return None

    def context_mb(self) -> int | None:
        return 0

    def upload(self, key: str, image: memoryview, layout: Layout) -> None:
        self._count += 1
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:80]
        path = self._dir / f"{self._prefix}-{safe}-{self._count}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = max(layout.nbytes, 1)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise StartFailed(f"not enough shared memory for the weights of {key!r}") from e
            with mmap.mmap(fd, size) as target:
                view = memoryview(target)
                try:
                    copy_into(view, image, layout)
                finally:
                    view.release()
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        self.free(key)
        self._paths[key] = path

    def share(self, key: str) -> Handle:
        path = self._paths[key]
        return HostHandle(str(path), path.stat().st_size)

    def free(self, key: str) -> None:
        path = self._paths.pop(key, None)
        if path is not None:
            _unlink(path)

    def close(self) -> None:
        for key in list(self._paths):
            self.free(key)

    def open(self, handle: Handle, layout: Layout) -> dict[str, Any]:
        import torch

        if not isinstance(handle, HostHandle):
            raise StartFailed("a host standby was given a CUDA handle")
        fd = os.open(handle.path, os.O_RDONLY)
        try:
            mapped = mmap.mmap(fd, handle.size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._maps.append(mapped)  # lives as long as the process: its tensors view it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we mean it
            base = torch.frombuffer(mapped, dtype=torch.uint8)
        return tensors_from(base, layout)

    def cap(self, fraction: float) -> None:
        self.fraction = fraction  # recorded; host memory is capped by placement alone

    def device(self) -> str:
        return "cpu"

    def out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError)


def memory_for(backend: Backend, memory_mb: int, prefix: str, nvml_index: int | None = None) -> DeviceMemory:
    """The implementation of ``backend`` (importing torch's CUDA side only for ``cuda``).
    ``nvml_index``: the GPU's index for NVML, which ignores ``CUDA_VISIBLE_DEVICES``."""
    if backend == "cuda":
        from smss.node.gpu.cuda import CudaMemory

        return CudaMemory(nvml_index)
    return HostMemory(memory_mb, prefix)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
