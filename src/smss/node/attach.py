"""Attaching a weight-store segment inside an instance: zero-copy, read-only views.

The segment is mapped ``PROT_READ``; tensors are numpy views of the mapping
(and torch tensors share their memory), so attaching costs a header parse, not
a copy, whatever the model's size. A segment whose magic, length or header do
not check out is refused (:class:`UnsafeArtifact`) instead of being read; one
whose data does not match its checksum is refused by :func:`verify`
(:class:`CorruptWeights`), which a template calls on the copy it serves from.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

from smss.errors import CorruptWeights, UnsafeArtifact
from smss.node.weightstore import HEADER, HEADER_SIZE, MAGIC, crc32
from smss.safetensors_header import parse_image

_ST_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "U16": "<u2",
    "U32": "<u4",
    "U64": "<u8",
    "BOOL": "?",
}


class Attached:
    """A mapped segment. Keep it alive as long as any view of it is in use."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise UnsafeArtifact(f"weight segment {path.name} is truncated")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, self.generation, self.length, offset, self.checksum = HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or offset != HEADER_SIZE or HEADER_SIZE + self.length != size:
            self._map.close()
            raise UnsafeArtifact(f"weight segment {path.name} is torn or not a weight segment")
        self.path = path
        self.data = memoryview(self._map)[HEADER_SIZE:]

    def safetensors(self) -> dict[str, np.ndarray]:
        """Read-only numpy views of every tensor in a safetensors image."""
        return safetensors_views(self.data)

    def close(self) -> None:
        self.data.release()
        self._map.close()


def verify(data: memoryview, checksum: int, name: str) -> None:
    """Raise :class:`CorruptWeights` unless ``data`` has the CRC-32 ``checksum``
    (one pass over the data: about 0.2 s per GB here)."""
    if crc32(data) != checksum:
        raise CorruptWeights(
            f"weight segment {name} is corrupt (its checksum does not match); "
            "it is dropped and the next start reloads the weights file"
        )


HUGE_PAGE = 2 << 20
_PROT_READ = 1


class HotCopy:
    """A model template's private copy of a segment, in transparent huge pages, read-only.

    Why a second copy: a forked instance must map every page of the weights it
    touches. Pages of a shared ``/dev/shm`` mapping are faulted in one 4 KiB
    page at a time in each new instance (about 40 ms per 400 MB here), so the
    first request would grow with the model. Private anonymous memory advised
    ``MADV_HUGEPAGE`` is handed to a forked child as 2 MiB page-table entries,
    copy-on-write and shared: the instance touches 400 MB for about 2 ms, and
    all instances of the model still share one physical copy (the template's).
    The copy is made read-only with ``mprotect``, so a write from an instance
    faults in that instance instead of silently un-sharing or corrupting it.
    """

    def __init__(self, source: memoryview) -> None:
        size = len(source)
        self._map = mmap.mmap(-1, size + HUGE_PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        offset = (-base) % HUGE_PAGE
        length = size + (-size) % HUGE_PAGE
        length = min(length, len(self._map) - offset)
        self._map.madvise(mmap.MADV_HUGEPAGE, offset, length)
        view = memoryview(self._map)[offset : offset + size]
        view[:] = source
        # From here on the pages are only read: forbid writes at the MMU.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mprotect(ctypes.c_void_p(base + offset), ctypes.c_size_t(length), _PROT_READ) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        self.address = base + offset
        self.data = view.toreadonly()

    def safetensors(self) -> dict[str, np.ndarray]:
        return safetensors_views(self.data)


def safetensors_views(data: memoryview) -> dict[str, np.ndarray]:
    """Read-only numpy views of the tensors of a safetensors image (its header checked by
    the same parser as at deploy)."""
    header = parse_image(data)
    out: dict[str, np.ndarray] = {}
    for t in header.tensors:
        numpy_dtype = _ST_DTYPES.get(t.dtype)
        if numpy_dtype is None:
            raise UnsafeArtifact(f"safetensors tensor {t.name!r:.80}: dtype {t.dtype} has no numpy view")
        array = np.frombuffer(data, dtype=np.dtype(numpy_dtype), count=t.count, offset=t.start)
        out[t.name] = array.reshape(t.shape)  # read-only: the buffer is a PROT_READ mapping
    return out


#: ONNX TensorProto data types whose raw bytes numpy can view (little-endian).
_ONNX_DTYPES = {1: "<f4", 2: "u1", 3: "i1", 5: "<i2", 6: "<i4", 7: "<i8", 9: "?", 10: "<f2", 11: "<f8"}


def onnx_views(data: memoryview, image: bytes) -> dict[str, np.ndarray]:
    """Read-only numpy views into ``data`` (a serialized ONNX model; ``image``: the
    same bytes) of every initializer stored as raw bytes, by name. Protobuf gives no
    offsets, so each tensor's bytes are found in the image, searching on from the
    previous one (initializers are serialized in order); any match holds exactly the
    tensor's bytes. A tensor that cannot be viewed is left out (ONNX Runtime then
    keeps its own copy of it), and all are without the ``onnx`` package."""
    try:
        import onnx
    except ImportError:
        return {}
    try:
        model = onnx.ModelProto.FromString(image)
    except Exception:
        raise UnsafeArtifact("ONNX model image is not a valid model") from None
    out: dict[str, np.ndarray] = {}
    start = 0
    for t in model.graph.initializer:
        dtype = _ONNX_DTYPES.get(t.data_type)
        raw = t.raw_data
        if dtype is None or not raw or t.data_location != onnx.TensorProto.DEFAULT:
            continue
        shape = tuple(int(d) for d in t.dims)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * np.dtype(dtype).itemsize != len(raw):
            continue
        at = image.find(raw, start)
        if at < 0:
            at = image.find(raw)
        if at < 0:  # pragma: no cover - the bytes come from this image
            continue
        start = at + len(raw)
        out[t.name] = np.frombuffer(data, dtype=dtype, count=count, offset=at).reshape(shape)
    return out


def torch_views(arrays: dict[str, np.ndarray]) -> dict[str, object]:
    """Torch tensors sharing memory with read-only arrays (torch warns about that; we mean it)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}
