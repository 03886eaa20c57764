"""Tensors as content-addressed blobs: ``u32 header length | msgpack header | raw bytes``.

(A BYTES tensor's raw bytes are its length-prefixed elements, see smss.bytes_tensors.)

The reference of a blob is the sha256 of its bytes, so equal tensors share
one blob and a blob can be verified when it is read back.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import msgspec
import numpy as np

from smss import bytes_tensors
from smss.errors import InvalidInput, StorageUnavailable
from smss.spec import DATATYPES, datatype_of

_LEN = struct.Struct("<I")


class _Header(msgspec.Struct, array_like=True, frozen=True):
    datatype: str
    shape: tuple[int, ...]


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Header)


def encode_tensor(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    header = _enc.encode(_Header(datatype_of(array.dtype), tuple(int(d) for d in array.shape)))
    body = bytes_tensors.pack(array) if bytes_tensors.is_bytes(array) else array.tobytes()
    return _LEN.pack(len(header)) + header + body


def ref_of(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def decode_tensor(blob: bytes, ref: str | None = None) -> np.ndarray:
    """Decode a blob; with ``ref``, verify its content hash first."""
    if ref is not None and ref_of(blob) != ref:
        raise StorageUnavailable(f"blob {ref[:12]} is corrupt (content hash mismatch)")
    try:
        (n,) = _LEN.unpack_from(blob, 0)
        header = _dec.decode(blob[4 : 4 + n])
        dtype = DATATYPES[header.datatype]
        if header.datatype == bytes_tensors.DATATYPE:
            return bytes_tensors.unpack(memoryview(blob)[4 + n :], header.shape, "blob")
        return np.frombuffer(blob, dtype=dtype, offset=4 + n).reshape(header.shape)
    except (struct.error, msgspec.DecodeError, KeyError, ValueError, InvalidInput):
        raise StorageUnavailable("blob is not a valid tensor encoding") from None


def to_blobs(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, str], dict[str, bytes]]:
    """(name -> ref, ref -> bytes) for a set of named tensors."""
    refs: dict[str, str] = {}
    blobs: dict[str, bytes] = {}
    for name, array in tensors.items():
        blob = encode_tensor(array)
        ref = ref_of(blob)
        refs[name] = ref
        blobs[ref] = blob
    return refs, blobs
