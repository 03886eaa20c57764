"""BYTES tensors: numpy object arrays of ``bytes``, and their length-prefixed wire form.

A BYTES tensor is what Triton's Python backend hands a model: a numpy array of
dtype ``object`` whose elements are ``bytes``. On every wire that carries raw
tensor bytes (the HTTP binary extension, gRPC ``raw_input_contents``, the
gateway-instance frames, workflow blobs) it is written as tritonclient writes
it: each element, row-major, as a 4-byte little-endian length then its bytes.
No pickling, ever: an object array is rebuilt from those bytes alone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from smss.errors import InvalidInput

DATATYPE = "BYTES"
DTYPE = np.dtype(object)
_LEN = struct.Struct("<I")


def is_bytes(array: np.ndarray[Any, Any]) -> bool:
    return bool(array.dtype == DTYPE)


def from_elements(elements: Iterable[bytes], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """An object array of ``shape`` holding ``elements`` (already ``bytes``), row-major."""
    flat = np.empty(_count(shape), dtype=DTYPE)
    for i, element in enumerate(elements):
        flat[i] = element
    return flat.reshape(shape)


def as_bytes_array(value: object, where: str) -> np.ndarray[Any, Any]:
    """``value`` (a list, a str/bytes/object numpy array) as an object array of ``bytes``.

    ``str`` elements are encoded as UTF-8, as Triton does; anything else is a
    ``TypeError`` naming ``where``.
    """
    array = np.asarray(value, dtype=DTYPE) if not isinstance(value, np.ndarray) else value
    if array.dtype.kind in "SU":
        array = array.astype(DTYPE)
    elif array.dtype != DTYPE:
        raise TypeError(f"{where} must hold bytes or str, not {array.dtype}")
    out = np.empty(array.shape, dtype=DTYPE)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, element in enumerate(flat_in):
        if type(element) is bytes:
            flat_out[i] = element
        elif isinstance(element, str):
            flat_out[i] = element.encode()
        elif isinstance(element, bytes | bytearray | memoryview):  # np.bytes_ too: plain bytes out
            flat_out[i] = bytes(element)
        else:
            raise TypeError(f"{where} must hold bytes or str, not {type(element).__name__}")
    return out


def pack(array: np.ndarray[Any, Any]) -> bytes:
    """The length-prefixed bytes of an object array of ``bytes`` (row-major)."""
    parts: list[bytes] = []
    for element in array.reshape(-1):
        parts.append(_LEN.pack(len(element)))
        parts.append(element)
    return b"".join(parts)


def packed_size(array: np.ndarray[Any, Any]) -> int:
    return sum(_LEN.size + len(element) for element in array.reshape(-1))


def unpack(buffer: bytes | memoryview, shape: tuple[int, ...], where: str) -> np.ndarray[Any, Any]:
    """Rebuild an object array of ``shape`` from exactly ``buffer``; ``InvalidInput`` naming
    ``where`` when the lengths run past the end, stop short of it, or the count is wrong."""
    view = memoryview(buffer).cast("B")
    count = _count(shape)
    if count * _LEN.size > len(view):  # checked before the array is allocated
        raise InvalidInput(f"{where}: {len(view)} bytes cannot hold {count} BYTES elements")
    flat = np.empty(count, dtype=DTYPE)
    offset, end = 0, len(view)
    for i in range(count):
        if offset + _LEN.size > end:
            raise InvalidInput(f"{where}: BYTES data ends after {i} of {count} elements")
        (length,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        if offset + length > end:
            raise InvalidInput(f"{where}: BYTES element {i} claims {length} bytes past the end of the data")
        flat[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidInput(f"{where}: BYTES data has {end - offset} bytes after its {count} elements")
    return flat.reshape(shape)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
