"""The OIP v2 REST codec, checked against tritonclient's own request builder and
response parser, plus every malformed request we could think of and a fuzzer."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smss.api.codec import (
    HEADER_LENGTH,
    DecodedRequest,
    RequestedOutput,
    decode_request,
    decode_tensor_list,
    encode_response,
    encode_tensor_json,
    parse_header_length,
)
from smss.config import Limits
from smss.errors import InvalidInput, ModelError, PayloadTooLarge
from smss.spec import DATATYPES, FunctionSpec, TensorSpec

LIMITS = Limits()
SPEC = FunctionSpec(
    name="m",
    inputs=(TensorSpec("x", "FP32", (-1, 4)), TensorSpec("flag", "BOOL", (2,))),
    outputs=(TensorSpec("y", "FP32", (-1,)), TensorSpec("z", "INT64", (-1,))),
    entrypoint="m.py:M",
)
X = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
FLAG = np.array([True, False])


def spec_for(datatype: str) -> FunctionSpec:
    return FunctionSpec(
        name="m",
        inputs=(TensorSpec("x", datatype, (-1, 3)),),
        outputs=(TensorSpec("y", datatype, (-1, 3)),),
        entrypoint="m.py:M",
    )


def sample(datatype: str) -> np.ndarray[Any, Any]:
    """Six values of ``datatype`` including its extremes, shaped (2, 3)."""
    dtype: np.dtype[Any] = DATATYPES[datatype]
    if datatype == "BYTES":  # an object array of bytes, as Triton's Python backend sees it
        strings = [b"", b"a", "\u00e9t\u00e9".encode(), b"two words", b"nul\x00inside", b"x" * 300]
        return np.array(strings, dtype=object).reshape(2, 3)
    if dtype.kind == "b":
        values: list[Any] = [True, False, True, True, False, False]
    elif dtype.kind == "f":
        info = np.finfo(dtype)
        values = [float(info.max), float(info.min), float(info.tiny), 0.1, -2.5, 0.0]
    else:
        iinfo = np.iinfo(dtype)
        values = [int(iinfo.max), int(iinfo.min), 0, 1, 7, int(iinfo.max) - 1]
    return np.array(values, dtype=dtype).reshape(2, 3)


def triton_body(
    inputs: list[triton.InferInput],
    outputs: list[triton.InferRequestedOutput] | None = None,
    request_id: str = "",
) -> tuple[bytes, int | None]:
    body, json_size = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id=request_id
    )
    return body, json_size


def triton_input(name: str, array: np.ndarray[Any, Any], binary: bool) -> triton.InferInput:
    datatype = {v: k for k, v in DATATYPES.items()}[array.dtype]
    return triton.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array, binary_data=binary)


def triton_parse(body: bytes, headers: dict[str, str]) -> Any:
    length = headers.get(HEADER_LENGTH)
    return triton.InferenceServerClient.parse_response_body(
        body, header_length=None if length is None else int(length)
    )


def request_json(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return msgspec.json.encode({"inputs": inputs, **extra})


def x_input(**overrides: Any) -> dict[str, Any]:
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}
    return {**tensor, **overrides}


def flag_input(**overrides: Any) -> dict[str, Any]:
    return {"name": "flag", "datatype": "BOOL", "shape": [2], "data": [True, False], **overrides}


# --- round trips with tritonclient -------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_every_datatype_round_trips_through_tritonclient(
    datatype: str, binary_in: bool, binary_out: bool
) -> None:
    array = sample(datatype)
    outputs = [triton.InferRequestedOutput("y", binary_data=binary_out)]
    body, length = triton_body([triton_input("x", array, binary_in)], outputs)
    request = decode_request(body, length, spec_for(datatype), LIMITS)
    got = request.inputs["x"]
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)
    assert request.outputs == (RequestedOutput("y", binary_out),)

    response, headers = encode_response("m", "1", None, {"y": got}, request)
    result = triton_parse(response, headers).as_numpy("y")
    assert result.dtype == array.dtype
    if datatype == "BYTES" and not binary_out:  # JSON strings: tritonclient hands back str
        result = np.vectorize(str.encode, otypes=[object])(result)
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize("binary_in", [True, False])
def test_tritonclient_default_outputs_come_back_binary(binary_in: bool) -> None:
    inputs = [triton_input("x", X, binary_in), triton_input("flag", FLAG, binary_in)]
    body, length = triton_body(inputs, request_id="req-7")
    request = decode_request(body, length, SPEC, LIMITS)
    assert request.id == "req-7"
    assert request.outputs == ()
    assert request.binary_default  # tritonclient asks for binary when it lists no outputs
    np.testing.assert_array_equal(request.inputs["x"], X)
    np.testing.assert_array_equal(request.inputs["flag"], FLAG)

    outputs: dict[str, np.ndarray[Any, Any]] = {
        "y": np.array([1.5, -1.0], np.float32),
        "z": np.array([3], np.int64),
    }
    response, headers = encode_response("m", "1", request.id, outputs, request)
    assert headers["Content-Type"] == "application/octet-stream"
    result = triton_parse(response, headers)
    assert result.get_response()["id"] == "req-7"
    np.testing.assert_array_equal(result.as_numpy("y"), outputs["y"])
    np.testing.assert_array_equal(result.as_numpy("z"), outputs["z"])


def test_mixed_binary_and_json_outputs_in_requested_order() -> None:
    outputs = [
        triton.InferRequestedOutput("z", binary_data=False),
        triton.InferRequestedOutput("y", binary_data=True),
    ]
    body, length = triton_body([triton_input("x", X, True), triton_input("flag", FLAG, False)], outputs)
    request = decode_request(body, length, SPEC, LIMITS)
    assert request.outputs == (RequestedOutput("z", False), RequestedOutput("y", True))
    values: dict[str, np.ndarray[Any, Any]] = {
        "y": np.array([0.25, 8.0], np.float32),
        "z": np.array([[1, 2]], np.int64),
    }
    response, headers = encode_response("m", "1", None, values, request)
    result = triton_parse(response, headers)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["z", "y"]
    assert "data" in result.get_output("z")
    np.testing.assert_array_equal(result.as_numpy("y"), values["y"])
    np.testing.assert_array_equal(result.as_numpy("z"), values["z"])


def test_json_response_without_binary_outputs() -> None:
    request = DecodedRequest(id=None, inputs={}, outputs=(), binary_default=False)
    response, headers = encode_response("m", "2", None, {"y": np.ones(2, np.float32)}, request)
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(response) == {
        "model_name": "m",
        "model_version": "2",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2], "data": [1.0, 1.0]}],
    }


def test_non_finite_json_outputs_round_trip() -> None:
    request = DecodedRequest(id=None, inputs={}, outputs=(), binary_default=False)
    values = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    response, headers = encode_response("m", "1", None, {"y": values}, request)
    np.testing.assert_array_equal(triton_parse(response, headers).as_numpy("y"), values)
    assert json.loads(response)["outputs"][0]["data"][2] == -np.inf


def test_output_byte_order_and_shapes() -> None:
    request = DecodedRequest(id=None, inputs={}, outputs=(), binary_default=True)
    values = {
        "y": np.arange(6, dtype=">f8").reshape(2, 3).T,  # big-endian, not contiguous
        "z": np.array(5, np.int32),  # 0-d
        "e": np.zeros((0, 3), np.uint8),
    }
    response, headers = encode_response("m", "1", None, values, request)
    result = triton_parse(response, headers)
    for name, value in values.items():
        np.testing.assert_array_equal(result.as_numpy(name), value)


def test_encode_tensor_json() -> None:
    assert encode_tensor_json("t", np.array([[True], [False]])) == {
        "name": "t",
        "datatype": "BOOL",
        "shape": [2, 1],
        "data": [True, False],
    }


def test_output_errors_are_model_errors() -> None:
    request = DecodedRequest(None, {}, (RequestedOutput("y", None),), False)
    with pytest.raises(ModelError, match="'y'"):
        encode_response("m", "1", None, {"z": np.zeros(1)}, request)
    with pytest.raises(ModelError, match="'y'"):
        encode_response("m", "1", None, {"y": np.array(["a"])}, request)


# --- JSON forms clients write by hand ---------------------------------------------


def test_nested_data_and_zero_sized_tensors() -> None:
    body = request_json([x_input(data=X.tolist()), flag_input()])
    np.testing.assert_array_equal(decode_request(body, None, SPEC, LIMITS).inputs["x"], X)
    empty = request_json([x_input(shape=[0, 4], data=[]), flag_input()])
    assert decode_request(empty, None, SPEC, LIMITS).inputs["x"].shape == (0, 4)


def test_fp32_accepts_integers_and_bool_output_param() -> None:
    body = request_json(
        [x_input(data=list(range(8))), flag_input()],
        outputs=[{"name": "y"}],
        parameters={"binary_data_output": True, "priority": 3},
    )
    request = decode_request(body, None, SPEC, LIMITS)
    assert request.inputs["x"].dtype == np.float32
    assert request.outputs == (RequestedOutput("y", None),)
    assert request.binary_default


def test_binary_inputs_are_zero_copy_views() -> None:
    header = request_json([x_input(data=None, parameters={"binary_data_size": 32}), flag_input()])
    body = header + X.tobytes()
    x = decode_request(body, len(header), SPEC, LIMITS).inputs["x"]
    np.testing.assert_array_equal(x, X)
    assert not x.flags.writeable


def test_decode_tensor_list_for_any_names() -> None:
    items = [{"name": "anything", "datatype": "INT8", "shape": [3], "data": [1, -2, 3]}]
    for form in (items, msgspec.json.encode(items), msgspec.Raw(msgspec.json.encode(items))):
        arrays = decode_tensor_list(form, None, LIMITS, None)
        np.testing.assert_array_equal(arrays["anything"], np.array([1, -2, 3], np.int8))
    tail = memoryview(np.array([7, 8], np.int8).tobytes())
    binary = [{"name": "b", "datatype": "INT8", "shape": [2], "parameters": {"binary_data_size": 2}}]
    np.testing.assert_array_equal(decode_tensor_list(binary, None, LIMITS, tail)["b"], [7, 8])
    with pytest.raises(InvalidInput, match="'anything'"):
        decode_tensor_list([{**items[0], "shape": [-3]}], None, LIMITS, None)
    with pytest.raises(InvalidInput, match=r"missing required input.*'x'"):
        decode_tensor_list([], SPEC.inputs[:1], LIMITS, None)
    with pytest.raises(InvalidInput):
        decode_tensor_list([object()], None, LIMITS, None)


# --- malformed requests ------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_JSON = [
    b"",
    b"{",
    b'{"inputs": [',
    b'{"inputs": [{"name": "x"',
    b"\xff\xfe{}",
    b'{"id": "\xff", "inputs": []}',
    b"[]",
    b"null",
    b"42",
    b"{'inputs': []}",  # single quotes
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [NaN, 1, 2, 3]}]}',
    b'{"inputs": [{"name":"x","datatype":"FP32","shape":[1,4],"data":[Infinity,1,2,3]}]}',
    b'{"inputs": ' + DEEP + b"}",
    b'{"deep": ' + DEEP + b', "inputs": []}',
    b'{"inputs": [], "parameters": {"p": ' + DEEP + b"}}",
    b'{"inputs": [{"name":"x","datatype":"FP32","shape":[1,4],"data":' + DEEP + b"}]}",
    b'{"inputs": [{"name":"x","datatype":"FP32","shape":[1,4],"junk":' + DEEP + b"}]}",
    b'{"inputs": {}}',
    b'{"inputs": [], "id": 5}',
    b'{"inputs": [], "outputs": {}}',
    b'{"inputs": [], "parameters": []}',
    b'{"inputs": [], "parameters": {"binary_data_output": 1}}',
    b'{"outputs": []}',
]


@pytest.mark.parametrize("body", BAD_JSON, ids=range(len(BAD_JSON)))
def test_malformed_json_is_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_request(body, None, SPEC, LIMITS)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("length", [-1, 0, 10_000])
def test_bad_header_length(length: int) -> None:
    with pytest.raises(InvalidInput, match=HEADER_LENGTH):
        decode_request(request_json([x_input(), flag_input()]), length, SPEC, LIMITS)


@pytest.mark.parametrize("raw", ["", "-1", "+1", " 1", "1 ", "1_0", "0x10", "\u0663", "1" * 20, "1.0"])
def test_header_length_header_must_be_plain_digits(raw: str) -> None:
    with pytest.raises(InvalidInput, match=HEADER_LENGTH):
        parse_header_length(raw)


def test_header_length_header_values() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length("0") == 0
    assert parse_header_length("0123") == 123
    assert parse_header_length("9" * 19) == 10**19 - 1  # refused later: longer than any body


BIN = {"binary_data_size": 32}
BAD_INPUTS: list[tuple[str, list[dict[str, Any]], str]] = [
    ("negative dim", [x_input(shape=[-2, 4])], "'x'"),
    ("too many dims", [x_input(shape=[1] * 9)], "'x'"),
    ("data too short", [x_input(data=[1.0] * 7)], "'x'"),
    ("data too long", [x_input(data=[1.0] * 9)], "'x'"),
    ("ragged", [x_input(data=[[1.0] * 4, [1.0] * 3])], "'x'"),
    ("ragged long", [x_input(data=[[1.0] * 4, [1.0] * 5])], "'x'"),
    ("too deep", [x_input(data=[[[1.0] * 4], [[1.0] * 4]])], "'x'"),
    ("string number", [x_input(data=["1.0"] * 8)], "'x'"),
    ("null data", [x_input(data=None)], "'x'"),
    ("scalar data", [x_input(data=1.0)], "'x'"),
    ("float overflow", [x_input(data=[1e39] * 8)], "'x'"),
    ("bool as float", [x_input(data=[True] * 8)], "'x'"),
    ("wrong datatype", [x_input(datatype="FP64")], "'x'"),
    ("unknown datatype", [x_input(datatype="FP8")], "'x'"),
    ("bytes datatype", [x_input(datatype="BYTES")], "BYTES"),
    ("bf16 datatype", [x_input(datatype="BF16")], "'x'"),
    ("shape vs spec", [x_input(shape=[2, 5], data=[1.0] * 10)], "'x'"),
    ("rank vs spec", [x_input(shape=[8], data=[1.0] * 8)], "'x'"),
    ("shape not ints", [x_input(shape=[2.0, 4])], "'x'"),
    ("name not str", [x_input(name=7)], "name"),
    ("unknown input", [x_input(name="nope")], "'nope'"),
    ("missing input", [x_input()], "'flag'"),
    ("duplicate input", [x_input(), x_input(), flag_input()], "'x'"),
    ("bool as int", [flag_input(data=[1, 0])], "'flag'"),
    ("data and binary", [x_input(parameters=BIN)], "'x'"),
    ("binary without tail", [x_input(data=None, parameters=BIN)], "'x'"),
    ("binary size bad type", [x_input(data=None, parameters={"binary_data_size": "32"})], "'x'"),
    ("binary size bool", [x_input(data=None, parameters={"binary_data_size": True})], "'x'"),
    ("shared memory", [x_input(data=None, parameters={"shared_memory_region": "r"})], "'x'"),
    ("nested parameter", [x_input(parameters={"a": {"b": 1}})], "'x'"),
]


@pytest.mark.parametrize(("case", "inputs", "needle"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_name_the_input(case: str, inputs: list[dict[str, Any]], needle: str) -> None:
    if not any(i.get("name") == "flag" for i in inputs) and case != "missing input":
        inputs = [*inputs, flag_input()]
    with pytest.raises(InvalidInput, match=needle) as info:
        decode_request(request_json(inputs), None, SPEC, LIMITS)
    assert type(info.value) is InvalidInput


@pytest.mark.parametrize(
    ("datatype", "value"),
    [("INT8", 128), ("INT8", 1.5), ("UINT8", -1), ("UINT64", 2**64), ("INT64", -(2**63) - 1)],
)
def test_integers_out_of_range_or_fractional(datatype: str, value: Any) -> None:
    body = request_json([{"name": "x", "datatype": datatype, "shape": [1, 3], "data": [value, 0, 0]}])
    with pytest.raises(InvalidInput, match="'x'"):
        decode_request(body, None, spec_for(datatype), LIMITS)


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**70], [0, 2**26, 2**26, 2**26, 2**26]])
def test_overflowing_shapes_are_invalid_input(shape: list[int]) -> None:
    body = request_json([{"name": "t", "datatype": "FP64", "shape": shape, "data": []}])
    with pytest.raises(InvalidInput, match="'t'") as caught:
        decode_tensor_list(json.loads(body)["inputs"], None, LIMITS, None)
    assert not isinstance(caught.value, PayloadTooLarge)  # 400 naming the input, not 413


@pytest.mark.parametrize("shape", [[0, 2**40], [2**20, 2**20]])
def test_huge_shapes_are_refused_before_allocation(shape: list[int]) -> None:
    body = request_json([{"name": "t", "datatype": "FP64", "shape": shape, "data": []}])
    with pytest.raises(PayloadTooLarge, match="'t'"):
        decode_tensor_list(json.loads(body)["inputs"], None, LIMITS, None)


def test_limits() -> None:
    small = Limits(max_body_bytes=100, max_inputs=1, max_tensor_elements=4)
    with pytest.raises(PayloadTooLarge):
        decode_request(b" " * 101, None, SPEC, small)
    items = [{"name": f"t{i}", "datatype": "INT8", "shape": [1], "data": [1]} for i in range(2)]
    with pytest.raises(InvalidInput, match="at most 1"):
        decode_tensor_list(items, None, small, None)
    with pytest.raises(PayloadTooLarge, match="'t0'"):
        decode_tensor_list([{**items[0], "shape": [5], "data": [1] * 5}], None, small, None)


def binary_body(sizes: list[int], tail: bytes) -> tuple[bytes, int]:
    header = request_json(
        [
            x_input(data=None, parameters={"binary_data_size": sizes[0]}),
            flag_input(data=None, parameters={"binary_data_size": sizes[1]}),
        ]
    )
    return header + tail, len(header)


@pytest.mark.parametrize(
    ("sizes", "tail", "needle"),
    [
        ([31, 2], X.tobytes()[:31] + b"\x01\x00", "'x'"),
        ([32, 3], X.tobytes() + b"\x01\x00\x00", "'flag'"),
        ([32, 2], X.tobytes() + b"\x01", "'flag'"),
        ([32, 2], X.tobytes() + b"\x01\x00\x00", "add up to 34"),
        ([32, 2], X.tobytes() + b"\x01\x07", "'flag'"),
    ],
)
def test_bad_binary_tails(sizes: list[int], tail: bytes, needle: str) -> None:
    body, length = binary_body(sizes, tail)
    with pytest.raises(InvalidInput, match=needle):
        decode_request(body, length, SPEC, LIMITS)


@pytest.mark.parametrize(
    "outputs",
    [
        [{"name": "nope"}],
        [{"name": "y"}, {"name": "y"}],
        [{"name": "y", "parameters": {"binary_data": "yes"}}],
        [{"name": "y", "parameters": {"classification": 3}}],
    ],
)
def test_bad_requested_outputs(outputs: list[dict[str, Any]]) -> None:
    body = request_json([x_input(), flag_input()], outputs=outputs)
    with pytest.raises(InvalidInput, match=repr(outputs[0]["name"])):
        decode_request(body, None, SPEC, LIMITS)


def test_hostile_names_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidInput) as info:
        decode_request(request_json([x_input(name="n" * 100_000)]), None, SPEC, LIMITS)
    assert len(str(info.value)) < 300


# --- fuzzing -----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "datatype",
                    "shape",
                    "data",
                    "parameters",
                    "binary_data_size",
                    "binary_data",
                    "inputs",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)
TENSOR = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["x", "flag", "y", ""]) | JSON_VALUES,
        "datatype": st.sampled_from([*DATATYPES, "BYTES", "bad"]) | JSON_VALUES,
        "shape": st.lists(st.integers(-2, 2**33), max_size=4) | JSON_VALUES,
        "data": st.lists(st.integers(-300, 300) | st.floats(allow_nan=False), max_size=10) | JSON_VALUES,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "binary_data", "shared_memory_region"]),
            st.integers(-1, 40) | JSON_VALUES,
        ),
    },
)
REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(TENSOR, max_size=4) | JSON_VALUES,
        "outputs": st.lists(TENSOR, max_size=3) | JSON_VALUES,
        "id": st.text(max_size=4) | JSON_VALUES,
        "parameters": st.dictionaries(st.just("binary_data_output"), JSON_VALUES),
    },
)
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_refuses(body: bytes, length: int | None) -> None:
    try:
        request = decode_request(body, length, SPEC, LIMITS)
    except InvalidInput:
        return
    assert set(request.inputs) == {"x", "flag"}


@FUZZ
@given(st.binary(max_size=200), st.none() | st.integers(-5, 300))
def test_fuzz_random_bytes(body: bytes, length: int | None) -> None:
    decodes_or_refuses(body, length)


@FUZZ
@given(REQUEST, st.binary(max_size=64), st.booleans())
def test_fuzz_request_structures(request: dict[str, Any], tail: bytes, with_tail: bool) -> None:
    header = msgspec.json.encode(request)
    if with_tail:
        decodes_or_refuses(header + tail, len(header))
    else:
        decodes_or_refuses(header, None)


@FUZZ
@given(st.lists(TENSOR, max_size=4) | JSON_VALUES, st.none() | st.binary(max_size=64))
def test_fuzz_tensor_lists(items: Any, tail: bytes | None) -> None:
    view = None if tail is None else memoryview(tail)
    try:
        arrays = decode_tensor_list(items, None, LIMITS, view)
    except InvalidInput:
        return
    assert all(isinstance(a, np.ndarray) for a in arrays.values())


@FUZZ
@given(st.data())
def test_fuzz_mutated_tritonclient_request(data: st.DataObject) -> None:
    body, length = triton_body([triton_input("x", X, True), triton_input("flag", FLAG, False)])
    assert length is not None
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    decodes_or_refuses(bytes(mutated[:cut]), data.draw(st.sampled_from([length, None, cut])))


# --- BYTES -------------------------------------------------------------------------


def bytes_body(data: Any, shape: list[int]) -> bytes:
    return request_json([{"name": "x", "datatype": "BYTES", "shape": shape, "data": data}])


def test_bytes_json_nested_and_flat_decode_to_object_arrays_of_bytes() -> None:
    spec = spec_for("BYTES")
    flat = decode_request(bytes_body(["a", "b", "c", "d", "e", "\u00e9"], [2, 3]), None, spec, LIMITS)
    nested = decode_request(bytes_body([["a", "b", "c"], ["d", "e", "\u00e9"]], [2, 3]), None, spec, LIMITS)
    for request in (flat, nested):
        got = request.inputs["x"]
        assert got.dtype == object
        assert got.shape == (2, 3)
        assert got.ravel().tolist() == [b"a", b"b", b"c", b"d", b"e", "\u00e9".encode()]


@pytest.mark.parametrize(
    "data",
    [[["a", "b", "c"], ["d", "e"]], [["a", "b", "c"], ["d", "e", "f", "g"]], [1, 2, 3, 4, 5, 6], ["a"] * 5],
    ids=["ragged-short", "ragged-long", "numbers", "too-few"],
)
def test_bad_bytes_json_is_refused_naming_the_input(data: Any) -> None:
    with pytest.raises(InvalidInput, match="'x'"):
        decode_request(bytes_body(data, [2, 3]), None, spec_for("BYTES"), LIMITS)


def test_bytes_that_are_not_utf8_go_binary_but_not_into_json() -> None:
    outputs = {"y": np.array([[b"\xff\xfe", b"ok", b""]], dtype=object)}
    binary = DecodedRequest(None, {}, (RequestedOutput("y", True),), False)
    body, headers = encode_response("m", "1", None, outputs, binary)
    assert triton_parse(body, headers).as_numpy("y").tolist() == [[b"\xff\xfe", b"ok", b""]]
    as_json = DecodedRequest(None, {}, (RequestedOutput("y", False),), False)
    with pytest.raises(ModelError, match=r"'y'.*UTF-8"):
        encode_response("m", "1", None, outputs, as_json)
