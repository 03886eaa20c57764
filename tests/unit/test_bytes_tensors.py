"""BYTES tensors: the length-prefixed form is tritonclient's, byte for byte; conversions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from smss import bytes_tensors
from smss.errors import InvalidInput


def objects(elements: list[bytes]) -> np.ndarray:
    array = np.empty(len(elements), dtype=object)
    array[:] = elements
    return array


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=16))
def test_pack_is_tritonclients_encoding_and_unpack_reads_it(elements: list[bytes]) -> None:
    array = objects(elements)
    packed = bytes_tensors.pack(array)
    if elements:  # tritonclient's result: a 0-d object array holding the bytes
        assert packed == serialize_byte_tensor(array).item()
    assert bytes_tensors.packed_size(array) == len(packed)
    assert bytes_tensors.unpack(packed, (len(elements),), "x").tolist() == elements
    assert deserialize_bytes_tensor(packed).tolist() == elements  # tritonclient reads ours


def test_unpack_keeps_the_shape_row_major() -> None:
    array = objects([b"a", b"bb", b"", b"dddd", b"e", b"f"]).reshape(2, 3)
    got = bytes_tensors.unpack(bytes_tensors.pack(array), (2, 3), "x")
    assert got.shape == (2, 3)
    assert got.tolist() == array.tolist()


@pytest.mark.parametrize(
    "value",
    [
        ["a", "\u00e9"],
        np.array(["a", "\u00e9"]),
        np.array([b"a", "\u00e9".encode()]),
        [b"a", bytearray(b"\xc3\xa9")],
    ],
    ids=["list-of-str", "unicode-array", "bytes-array", "bytearray"],
)
def test_str_and_bytes_become_plain_bytes(value: object) -> None:
    got = bytes_tensors.as_bytes_array(value, "output 'y'")
    assert got.dtype == object
    assert got.tolist() == [b"a", "\u00e9".encode()]
    assert all(type(v) is bytes for v in got)


@pytest.mark.parametrize("value", [[1, 2], np.arange(3), [b"a", None]], ids=["ints", "int-array", "none"])
def test_anything_else_is_a_type_error_naming_the_tensor(value: object) -> None:
    with pytest.raises(TypeError, match="output 'y'"):
        bytes_tensors.as_bytes_array(value, "output 'y'")


def test_a_count_the_bytes_cannot_hold_is_refused_before_allocating() -> None:
    with pytest.raises(InvalidInput, match="cannot hold"):
        bytes_tensors.unpack(b"", (2**62,), "input 'x'")
