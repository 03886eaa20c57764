"""The gateway-instance wire: frames over real asyncio streams, corrupt input, tensor unpacking."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from smss.errors import InvalidInput
from smss.node import ipc
from smss.spec import DATATYPES

T = TypeVar("T")
PREFIX = struct.Struct("<BIQ")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10.0))


def joined(buffers: list[memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


async def socket_pair() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter], tuple[asyncio.StreamReader, asyncio.StreamWriter]
]:
    left, right = socket.socketpair()
    return await asyncio.open_connection(sock=left), await asyncio.open_connection(sock=right)


async def close(*writers: asyncio.StreamWriter) -> None:
    for w in writers:
        w.close()
        await w.wait_closed()


async def read_bytes(data: bytes) -> tuple[ipc.Message, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await ipc.read_frame(reader)


def frame(message: ipc.Message, payload: bytes = b"", version: int = ipc.VERSION) -> bytes:
    header = msgspec.msgpack.encode(message)
    return PREFIX.pack(version, len(header), len(payload)) + header + payload


# ---------------------------------------------------------------- round trips

TENSORS: dict[str, np.ndarray] = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f16": np.array([[0.5, -1.25]], dtype=np.float16),
    "i64": np.array([-(2**40), 0, 2**40], dtype=np.int64),
    "u8": np.arange(5, dtype=np.uint8),
    "bool": np.array([[True], [False]]),
    "f64_strided": np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2],  # not contiguous
    "i32_big_endian": np.array([1, -2, 3], dtype=">i4"),
    "scalar": np.array(7, dtype=np.int16),
    "empty": np.zeros((0, 3), dtype=np.float32),
}


def test_frames_round_trip_over_a_socket() -> None:
    async def main() -> None:
        (_, gw_writer), (inst_reader, inst_writer) = await socket_pair()
        try:
            metas, buffers = ipc.tensor_metas(TENSORS)
            ipc.write_frame(gw_writer, ipc.Infer(1, metas, ("out",)), buffers)
            ipc.write_frame(gw_writer, ipc.Ping(2))
            ipc.write_frame(gw_writer, ipc.Failure(3, "model_error", "boom", "Traceback ..."))
            await gw_writer.drain()

            message, payload = await ipc.read_frame(inst_reader)
            assert message == ipc.Infer(1, metas, ("out",))
            assert isinstance(message, ipc.Infer)
            got = ipc.unpack_tensors(message.inputs, payload)
            assert list(got) == list(TENSORS)
            for name, want in TENSORS.items():
                assert got[name].shape == want.shape
                assert got[name].dtype.newbyteorder("=") == want.dtype.newbyteorder("=")
                np.testing.assert_array_equal(got[name], want)
                assert not got[name].flags.writeable  # zero-copy views of the payload

            assert await ipc.read_frame(inst_reader) == (ipc.Ping(2), b"")
            assert await ipc.read_frame(inst_reader) == (
                ipc.Failure(3, "model_error", "boom", "Traceback ..."),
                b"",
            )
        finally:
            await close(gw_writer, inst_writer)

    run(main())


def test_eof_mid_frame_is_an_incomplete_read() -> None:
    data = frame(ipc.Ping(1))
    with pytest.raises(asyncio.IncompleteReadError):
        run(read_bytes(data[:-1]))
    with pytest.raises(asyncio.IncompleteReadError):
        run(read_bytes(b""))


def test_unsupported_dtype_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="unsupported dtype"):
        ipc.tensor_metas({"c": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(InvalidInput):
        ipc.tensor_metas({"s": np.array(["a", "b"])})


#: The fixed-width datatypes (BYTES, variable-length, has tests of its own below).
FIXED = sorted(d for d in DATATYPES if d != "BYTES")
dtypes = st.sampled_from(FIXED).map(lambda name: DATATYPES[name])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)), max_size=4)
)
def test_tensor_bytes_round_trip(arrays: list[np.ndarray]) -> None:
    tensors = {f"t{i}": a for i, a in enumerate(arrays)}
    metas, buffers = ipc.tensor_metas(tensors)
    got = ipc.unpack_tensors(metas, joined(buffers))
    assert list(got) == list(tensors)
    for name, want in tensors.items():
        assert got[name].shape == want.shape
        assert got[name].dtype == want.dtype
        np.testing.assert_array_equal(got[name], want)  # NaN == NaN here


# ---------------------------------------------------------------- corrupt frames


@pytest.mark.parametrize(
    "prefix",
    [
        PREFIX.pack(ipc.VERSION + 1, 3, 0),  # unknown version
        PREFIX.pack(0, 3, 0),
        PREFIX.pack(ipc.VERSION, ipc.MAX_HEADER + 1, 0),  # header over the cap
        PREFIX.pack(ipc.VERSION, 3, ipc.MAX_PAYLOAD + 1),  # payload over the cap
    ],
)
def test_corrupt_prefix_is_a_protocol_error(prefix: bytes) -> None:
    # Refused from the prefix alone: nothing after it is read or allocated.
    with pytest.raises(ipc.ProtocolError, match="bad frame"):
        run(read_bytes(prefix))


@pytest.mark.parametrize(
    "header",
    [
        b"\xc1\xc1\xc1",  # not msgpack
        msgspec.msgpack.encode(["nosuchtag", 1]),  # unknown message type
        msgspec.msgpack.encode(["infer", "one", [], []]),  # wrong field type
        msgspec.msgpack.encode({"id": 1}),  # not a tagged array
        b"\x91\xa4\x00\x00\x00\x80",  # a tag that is not UTF-8
        b"",
    ],
)
def test_corrupt_header_is_a_protocol_error(header: bytes) -> None:
    data = PREFIX.pack(ipc.VERSION, len(header), 0) + header
    with pytest.raises(ipc.ProtocolError, match="bad frame header"):
        run(read_bytes(data))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_header_is_a_protocol_error_or_a_message(header: bytes) -> None:
    data = PREFIX.pack(ipc.VERSION, len(header), 0) + header
    try:
        message, payload = run(read_bytes(data))
    except ipc.ProtocolError:
        return
    assert isinstance(message, ipc.Infer | ipc.Result | ipc.Failure | ipc.Ping | ipc.Pong)
    assert payload == b""


# ---------------------------------------------------------------- unpack_tensors


def meta(shape: tuple[int, ...], datatype: str = "FP32", nbytes: int | None = None) -> ipc.TensorMeta:
    count = int(np.prod(shape)) if shape else 1
    size = count * DATATYPES[datatype].itemsize if nbytes is None else nbytes
    return ipc.TensorMeta("x", datatype, shape, size)


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    datatype=st.sampled_from(FIXED),
    delta=st.integers(-8, 8).filter(lambda d: d != 0),
)
def test_unpack_rejects_nbytes_that_do_not_match_the_shape(
    shape: tuple[int, ...], datatype: str, delta: int
) -> None:
    good = meta(shape, datatype)
    if good.nbytes + delta < 0:
        return
    bad = meta(shape, datatype, good.nbytes + delta)
    with pytest.raises(ipc.ProtocolError, match="size mismatch"):
        ipc.unpack_tensors([bad], bytes(max(bad.nbytes, good.nbytes)))


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    datatype=st.sampled_from(FIXED),
    short=st.integers(1, 16),
)
def test_unpack_rejects_a_truncated_payload(shape: tuple[int, ...], datatype: str, short: int) -> None:
    m = meta(shape, datatype)
    if m.nbytes == 0:
        return
    with pytest.raises(ipc.ProtocolError, match="size mismatch"):
        ipc.unpack_tensors([m], bytes(max(0, m.nbytes - short)))


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    datatype=st.sampled_from(FIXED),
    extra=st.binary(min_size=1, max_size=16),
)
def test_unpack_rejects_trailing_bytes(shape: tuple[int, ...], datatype: str, extra: bytes) -> None:
    m = meta(shape, datatype)
    with pytest.raises(ipc.ProtocolError, match="trailing bytes"):
        ipc.unpack_tensors([m], bytes(m.nbytes) + extra)


def bytes_array(elements: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array.reshape(shape)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(max_size=40), max_size=12).flatmap(
        lambda items: st.tuples(st.just(items), st.sampled_from([(len(items),), (1, len(items), 1)]))
    )
)
def test_bytes_tensors_round_trip_length_prefixed(case: tuple[list[bytes], tuple[int, ...]]) -> None:
    elements, shape = case
    array = bytes_array(elements, shape)
    metas, buffers = ipc.tensor_metas({"s": array, "f": np.arange(3, dtype=np.float32)})
    payload = joined(buffers)
    # Each element as tritonclient writes it: a u32 little-endian length, then its bytes.
    assert payload[: metas[0].nbytes] == b"".join(struct.pack("<I", len(e)) + e for e in elements)
    got = ipc.unpack_tensors(metas, payload)
    assert got["s"].dtype == object
    assert got["s"].shape == shape
    assert got["s"].reshape(-1).tolist() == elements
    np.testing.assert_array_equal(got["f"], np.arange(3, dtype=np.float32))


@pytest.mark.parametrize(
    ("payload", "shape"),
    [
        (struct.pack("<I", 5) + b"abc", (1,)),  # an element running past the end
        (struct.pack("<I", 1) + b"a", (2,)),  # fewer elements than the shape
        (struct.pack("<I", 1) + b"ab", (1,)),  # bytes left after the last element
        (b"\xff\xff", (1,)),  # not even a length
        (b"", (2**40,)),  # a count the bytes cannot hold: refused before allocating
    ],
    ids=["past-end", "too-few", "trailing", "short-length", "huge-count"],
)
def test_corrupt_bytes_tensors_are_protocol_errors(payload: bytes, shape: tuple[int, ...]) -> None:
    with pytest.raises(ipc.ProtocolError, match="'x'"):
        ipc.unpack_tensors([ipc.TensorMeta("x", "BYTES", shape, len(payload))], payload)


def test_unpack_rejects_unknown_datatypes_and_negative_dimensions() -> None:
    with pytest.raises(ipc.ProtocolError, match="unknown datatype"):
        ipc.unpack_tensors([ipc.TensorMeta("x", "COMPLEX64", (1,), 8)], bytes(8))
    with pytest.raises(ipc.ProtocolError, match="negative dimension"):
        ipc.unpack_tensors([ipc.TensorMeta("x", "FP32", (-1, -4), 16)], bytes(16))


@pytest.mark.parametrize(
    "shape",
    [(0, 2**63), (0, 2**64 - 1), (0, 2**62, 2**62), (0,) * 70, (1,) * 70],
    ids=["dim-over-int64", "dim-max-u64", "size-overflow", "70-empty-dims", "70-dims"],
)
def test_unpack_rejects_shapes_numpy_cannot_hold(shape: tuple[int, ...]) -> None:
    nbytes = 0 if 0 in shape else 4
    with pytest.raises(ipc.ProtocolError):
        ipc.unpack_tensors([ipc.TensorMeta("x", "FP32", shape, nbytes)], bytes(nbytes))


@settings(max_examples=100, deadline=None)
@given(
    shape=st.lists(st.integers(-(2**63), 2**64 - 1) | st.integers(0, 3), max_size=70).map(tuple),
    datatype=st.sampled_from(sorted(DATATYPES)) | st.text(max_size=4),
    nbytes=st.integers(0, 2**64 - 1) | st.integers(0, 64),
    payload=st.binary(max_size=64),
)
def test_unpack_of_hostile_metadata_only_raises_protocol_error(
    shape: tuple[int, ...], datatype: str, nbytes: int, payload: bytes
) -> None:
    with contextlib.suppress(ipc.ProtocolError):
        ipc.unpack_tensors([ipc.TensorMeta("x", datatype, shape, nbytes)], payload)


def test_unpack_splits_a_payload_between_tensors() -> None:
    a = np.arange(6, dtype=np.int32)
    b = np.arange(3, dtype=np.float64)
    metas, buffers = ipc.tensor_metas({"a": a, "b": b})
    payload = joined(buffers)
    assert len(payload) == a.nbytes + b.nbytes
    got = ipc.unpack_tensors(metas, payload)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    with pytest.raises(ipc.ProtocolError):  # the second tensor's bytes are missing
        ipc.unpack_tensors(metas, payload[: a.nbytes])
