"""The one checked parser of safetensors headers, used at deploy and at attach.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header><data>``;
the header maps tensor names to ``{"dtype", "shape", "data_offsets": [start, end]}``
(offsets relative to the data) plus an optional ``"__metadata__"`` of strings.
Every field is checked before anything is read through it: the header is a JSON
object of well-typed entries, each tensor's byte span equals its element count
times its dtype's size, lies inside the data, and no two tensors overlap.
Anything else is an :class:`UnsafeArtifact` (a 400 at deploy, a refused
segment at attach), never another exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import BinaryIO

import msgspec

from smss.errors import UnsafeArtifact

#: The safetensors library's own bound on a header.
MAX_HEADER_BYTES = 100 * 1024 * 1024
PREFIX_BYTES = 8
#: Bytes per element of each safetensors dtype.
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
_MAX_DIMS = 64
#: numpy's limit on an array's nominal size (a signed 64-bit byte count, with room).
_MAX_ARRAY_BYTES = 1 << 62


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int

    @property
    def count(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True, slots=True)
class Header:
    data_start: int
    tensors: tuple[TensorEntry, ...]


class _Entry(msgspec.Struct, forbid_unknown_fields=True):
    dtype: str
    shape: list[int]
    data_offsets: tuple[int, int]


_DECODE_RAW = msgspec.json.Decoder(dict[str, msgspec.Raw])
_DECODE_ENTRY = msgspec.json.Decoder(_Entry)
_DECODE_METADATA = msgspec.json.Decoder(dict[str, str] | None)


def header_length(prefix: bytes, size: int) -> int:
    """The header's length from the file's first 8 bytes, checked against its ``size``."""
    if len(prefix) < PREFIX_BYTES or size < PREFIX_BYTES:
        raise UnsafeArtifact("safetensors file is truncated")
    length = int.from_bytes(prefix[:PREFIX_BYTES], "little")
    if length > min(size - PREFIX_BYTES, MAX_HEADER_BYTES):
        raise UnsafeArtifact("safetensors header length is larger than the file")
    return length


def parse_header(text: bytes | memoryview, size: int) -> Header:
    """The checked header ``text`` (the ``N`` bytes after the prefix) of a file of ``size`` bytes."""
    data_start = PREFIX_BYTES + len(text)
    try:
        raw = _DECODE_RAW.decode(text)
    except msgspec.ValidationError:
        raise UnsafeArtifact("safetensors header is not a JSON object") from None
    except (msgspec.DecodeError, ValueError, RecursionError):
        raise UnsafeArtifact("safetensors header is not valid JSON") from None
    tensors = [_entry(name, value, data_start) for name, value in raw.items() if name != "__metadata__"]
    if "__metadata__" in raw:
        try:
            _DECODE_METADATA.decode(raw["__metadata__"])
        except (msgspec.MsgspecError, ValueError, RecursionError):
            raise UnsafeArtifact("safetensors __metadata__ must map strings to strings") from None
    tensors.sort(key=lambda t: (t.start, t.end))
    end = data_start
    for t in tensors:
        if t.start < end:
            raise UnsafeArtifact(f"safetensors tensors {_show(t.name)} and another overlap")
        end = t.end
    if end > size:
        raise UnsafeArtifact("safetensors file is truncated: tensors extend past its end")
    return Header(data_start, tuple(tensors))


def parse_image(data: bytes | memoryview) -> Header:
    """The checked header of a whole safetensors image in memory."""
    view = memoryview(data)
    length = header_length(bytes(view[:PREFIX_BYTES]), len(view))
    return parse_header(view[PREFIX_BYTES : PREFIX_BYTES + length], len(view))


def read_header(f: BinaryIO, size: int) -> Header:
    """The checked header of the safetensors file open as ``f`` (at its start), ``size`` bytes long."""
    length = header_length(f.read(PREFIX_BYTES), size)
    text = f.read(length)
    if len(text) != length:
        raise UnsafeArtifact("safetensors file is truncated")
    return parse_header(text, size)


def _entry(name: str, raw: msgspec.Raw, data_start: int) -> TensorEntry:
    try:
        entry = _DECODE_ENTRY.decode(raw)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        raise UnsafeArtifact(f"safetensors entry {_show(name)} is malformed") from None
    itemsize = ITEMSIZE.get(entry.dtype)
    if itemsize is None:
        raise UnsafeArtifact(f"safetensors entry {_show(name)} has unknown dtype {_show(entry.dtype)}")
    if len(entry.shape) > _MAX_DIMS or any(dim < 0 for dim in entry.shape):
        raise UnsafeArtifact(f"safetensors entry {_show(name)} has an invalid shape")
    # An empty tensor (a zero dimension) with huge other dimensions has the right size
    # (0) but no array can take its shape: bound the product of the non-zero ones.
    if math.prod(dim for dim in entry.shape if dim) * itemsize > _MAX_ARRAY_BYTES:
        raise UnsafeArtifact(f"safetensors entry {_show(name)} has a shape too large for an array")
    start, end = entry.data_offsets
    tensor = TensorEntry(name, entry.dtype, tuple(entry.shape), data_start + start, data_start + end)
    # Python ints: a shape whose product overflows 64 bits is just a wrong size here.
    if not 0 <= start <= end or end - start != tensor.count * itemsize:
        raise UnsafeArtifact(f"safetensors entry {_show(name)}: offsets do not match its shape and dtype")
    return tensor


def _show(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."
