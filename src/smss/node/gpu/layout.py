"""Where each tensor of a model lies in its one buffer on a device. Pure, no CUDA.

A model's weights are held on a device as one buffer (one allocation: one CUDA IPC
handle opens them all). Tensors of a safetensors file need not be aligned to their
own element size there (an odd-sized ``U8`` tensor shifts everything after it), and
CUDA kernels want aligned pointers; so the buffer is laid out anew, each tensor at
a multiple of :data:`ALIGN` bytes, in file order. The layout is sent with the
buffer's handle (msgpack), so the process that opens it knows each tensor's place.
"""

from __future__ import annotations

import msgspec

from smss.errors import UnsafeArtifact
from smss.safetensors_header import ITEMSIZE, Header

#: Every tensor starts at a multiple of this (CUDA's allocation granularity for
#: small blocks, and enough for any vectorised load).
ALIGN = 256


class Slot(msgspec.Struct, frozen=True, array_like=True):
    """One tensor: its ``name``, safetensors ``dtype`` and ``shape``; ``offset`` in
    the device buffer, ``source`` in the file image, ``nbytes`` long."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    source: int
    nbytes: int


class Layout(msgspec.Struct, frozen=True):
    """Every tensor's slot, and the buffer's size (``nbytes``, a multiple of ALIGN)."""

    slots: tuple[Slot, ...]
    nbytes: int


def plan(header: Header) -> Layout:
    """Lay out the tensors of ``header`` (a checked safetensors header) in one buffer."""
    slots = []
    offset = 0
    for t in header.tensors:
        if t.dtype not in ITEMSIZE:  # pragma: no cover - the header parser checked it
            raise UnsafeArtifact(f"tensor {t.name!r:.80} has an unknown dtype {t.dtype}")
        nbytes = t.end - t.start
        slots.append(Slot(t.name, t.dtype, t.shape, offset, t.start, nbytes))
        offset += _round_up(nbytes)
    return Layout(tuple(slots), offset)


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
