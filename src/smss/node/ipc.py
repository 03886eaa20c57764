"""The wire between the gateway and an instance: typed msgpack headers, raw tensor bytes.

One frame is::

    u8 version | u32 header length | u64 payload length | header (msgpack) | payload

The header is a tagged msgspec struct; the payload is the tensors' raw
little-endian bytes, back to back, in the order the header lists them (a BYTES
tensor as its elements, each a u32 little-endian length then the bytes). Tensor
bytes are never re-encoded (no JSON, no pickle) between gateway and worker.
Sizes are checked against hard caps before anything is read, so a corrupt or
hostile stream cannot make either side allocate without bound.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping, Sequence

import msgspec
import numpy as np

from smss import bytes_tensors
from smss.errors import InvalidInput
from smss.spec import DATATYPES, DTYPE_TO_DATATYPE

VERSION = 1
_PREFIX = struct.Struct("<BIQ")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 34


class TensorMeta(msgspec.Struct, array_like=True, frozen=True):
    name: str
    datatype: str
    shape: tuple[int, ...]
    nbytes: int


class Infer(msgspec.Struct, tag="infer", array_like=True, frozen=True):
    id: int
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[str, ...]


class Result(msgspec.Struct, tag="result", array_like=True, frozen=True):
    """An answer, with where its time went in the instance: ``queue_s`` from the
    request's arrival until its batch started, ``compute_s`` in ``predict`` (its
    batch's, shared with the batch's other requests)."""

    id: int
    outputs: tuple[TensorMeta, ...]
    queue_s: float = 0.0
    compute_s: float = 0.0


class Failure(msgspec.Struct, tag="failure", array_like=True, frozen=True):
    """``kind`` is ``invalid_input`` (the model rejected the input) or ``model_error``."""

    id: int
    kind: str
    message: str
    traceback: str = ""


class Ping(msgspec.Struct, tag="ping", array_like=True, frozen=True):
    id: int


class Pong(msgspec.Struct, tag="pong", array_like=True, frozen=True):
    id: int
    in_flight: int


Message = Infer | Result | Failure | Ping | Pong

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class ProtocolError(Exception):
    """The byte stream is not a valid SMSS frame: the connection must be dropped."""


def tensor_metas(tensors: Mapping[str, np.ndarray]) -> tuple[tuple[TensorMeta, ...], list[memoryview]]:
    metas = []
    buffers = []
    for name, array in tensors.items():
        # Look the datatype up by the little-endian dtype: a big-endian array is sent
        # converted, not refused.
        if bytes_tensors.is_bytes(array):
            packed = bytes_tensors.pack(array)
            shape = tuple(int(d) for d in array.shape)
            metas.append(TensorMeta(name, bytes_tensors.DATATYPE, shape, len(packed)))
            buffers.append(memoryview(packed))
            continue
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        datatype = DTYPE_TO_DATATYPE.get(dtype.str)
        if datatype is None:
            raise InvalidInput(f"tensor {name!r} has unsupported dtype {array.dtype}")
        if not array.flags.c_contiguous or dtype != array.dtype:
            array = np.ascontiguousarray(array, dtype=dtype)
        metas.append(TensorMeta(name, datatype, tuple(int(d) for d in array.shape), array.nbytes))
        buffers.append(memoryview(array.data).cast("B") if array.nbytes else memoryview(b""))
    return tuple(metas), buffers


#: Payloads up to this size are copied behind the header and sent in one write
#: (one system call per frame instead of one per part); larger ones are not copied.
COALESCE_BYTES = 64 * 1024


def write_frame(writer: asyncio.StreamWriter, message: Message, buffers: Sequence[memoryview] = ()) -> None:
    header = _encoder.encode(message)
    payload_len = sum(b.nbytes for b in buffers)
    head = _PREFIX.pack(VERSION, len(header), payload_len) + header
    if payload_len <= COALESCE_BYTES:
        writer.write(b"".join((head, *buffers)))
        return
    writer.write(head)
    for b in buffers:
        if b.nbytes:
            writer.write(b)


async def read_frame(reader: asyncio.StreamReader) -> tuple[Message, bytes]:
    """Read one frame; raises ``asyncio.IncompleteReadError`` at EOF, ProtocolError if corrupt."""
    prefix = await reader.readexactly(_PREFIX.size)
    version, header_len, payload_len = _PREFIX.unpack(prefix)
    if version != VERSION or header_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        raise ProtocolError(f"bad frame: version={version} header={header_len} payload={payload_len}")
    header = await reader.readexactly(header_len)
    payload = await reader.readexactly(payload_len) if payload_len else b""
    try:
        message = _decoder.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        # msgspec reports a string that is not UTF-8 as UnicodeDecodeError, not DecodeError.
        raise ProtocolError(f"bad frame header: {e}") from None
    return message, payload


def unpack_tensors(metas: Sequence[TensorMeta], payload: bytes) -> dict[str, np.ndarray]:
    """Zero-copy views of the payload (read-only arrays)."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    view = memoryview(payload)
    for meta in metas:
        dtype = DATATYPES.get(meta.datatype)
        if dtype is None:
            raise ProtocolError(f"unknown datatype {meta.datatype!r}")
        count = 1
        for d in meta.shape:
            if d < 0:
                raise ProtocolError(f"negative dimension in {meta.name!r}")
            count *= d
        strings = meta.datatype == bytes_tensors.DATATYPE
        if offset + meta.nbytes > len(payload) or (not strings and count * dtype.itemsize != meta.nbytes):
            raise ProtocolError(f"size mismatch for tensor {meta.name!r}")
        chunk = view[offset : offset + meta.nbytes]
        try:
            if strings:
                out[meta.name] = bytes_tensors.unpack(chunk, meta.shape, f"tensor {meta.name!r}")
            else:
                out[meta.name] = np.frombuffer(chunk, dtype=dtype).reshape(meta.shape)
        except InvalidInput as e:
            raise ProtocolError(str(e)) from None
        except ValueError as e:  # more dimensions than numpy allows, or a dimension too large
            raise ProtocolError(f"bad shape for tensor {meta.name!r}: {e}") from None
        offset += meta.nbytes
    if offset != len(payload):
        raise ProtocolError("trailing bytes after the last tensor")
    return out
