"""Inputs of ``smss invoke`` / ``smss runs start``: JSON, OIP v2 bodies, .npz / .npy, typed
by the model's metadata; anything else is InvalidInput."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from smss.cli.inputs import parse, random_inputs
from smss.errors import InvalidInput

META = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]}
TWO = {
    "inputs": [
        {"name": "a", "datatype": "INT64", "shape": [2]},
        {"name": "b", "datatype": "BOOL", "shape": [1]},
    ]
}


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def test_a_json_object_is_typed_by_the_metadata() -> None:
    out = parse(b'{"x": [[1, 2, 3, 4]]}', META)
    assert out["x"].dtype == np.float32
    assert out["x"].tolist() == [[1, 2, 3, 4]]


def test_an_oip_request_body() -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}]}
    out = parse(json.dumps(body).encode(), META)
    assert out["x"].shape == (2, 4)
    assert out["x"].dtype == np.float32


def test_binary_npz_and_npy() -> None:
    out = parse(_npz(a=np.array([1, 2]), b=np.array([True])), TWO)
    assert out["a"].dtype == np.int64
    assert out["b"].tolist() == [True]
    buf = io.BytesIO()
    np.save(buf, np.ones((3, 4), np.float64))
    assert parse(buf.getvalue(), META)["x"].dtype == np.float32
    with pytest.raises(InvalidInput, match="one array"):
        parse(buf.getvalue(), TWO)


def test_pickled_arrays_are_refused() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInput, match="plain arrays"):
        parse(buf.getvalue(), META)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{bad", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"y": [1]}', "no input named y"),
        (b'{"x": [[1, "a"]]}', "not a FP32 tensor"),
        (b'{"inputs": [{"name": "x", "shape": [3], "data": [1, 2]}]}', "does not fit shape"),
    ],
)
def test_bad_inputs_are_invalid_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse(data, META)


def test_random_inputs_have_the_declared_shapes() -> None:
    out = random_inputs(
        {"inputs": [{"name": "frame", "datatype": "FP32", "shape": [1, 3, 8, -1]}, *TWO["inputs"]]}, 1
    )
    assert out["frame"].shape == (1, 3, 8, 1)
    assert out["frame"].dtype == np.float32
    assert out["a"].dtype == np.int64
    assert out["b"].dtype == np.bool_
    assert np.array_equal(random_inputs(META, 7)["x"], random_inputs(META, 7)["x"])
