"""The gRPC tensor codec against tritonclient.grpc's own request builder and result reader,
the typed ``contents`` of every datatype, and requests it must refuse (pure: no server)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tritongrpc = pytest.importorskip("tritonclient.grpc")
from test_codec import sample, spec_for  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc._utils import _get_inference_request  # noqa: E402

from smss.api.grpc_api.tensors import decode_request, encode_response  # noqa: E402
from smss.config import Limits  # noqa: E402
from smss.errors import InvalidInput, ModelError, PayloadTooLarge  # noqa: E402
from smss.spec import DATATYPES  # noqa: E402

LIMITS = Limits()


def triton_request(array: np.ndarray, datatype: str, outputs: list[str] | None = None) -> Any:
    """The ModelInferRequest tritonclient.grpc's ``infer`` sends (its own builder: private,
    so a tritonclient upgrade may need this helper changed, never the server)."""
    tensor = tritongrpc.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    wanted = None if outputs is None else [tritongrpc.InferRequestedOutput(o) for o in outputs]
    return _get_inference_request(
        model_name="m",
        inputs=[tensor],
        model_version="",
        request_id="r1",
        outputs=wanted,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=None,
    )


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_through_tritonclient_grpc(datatype: str) -> None:
    array = sample(datatype)
    request = triton_request(array, datatype, ["y"])
    inputs, outputs = decode_request(request, spec_for(datatype), LIMITS)
    assert outputs == ("y",)
    assert inputs["x"].dtype == array.dtype
    np.testing.assert_array_equal(inputs["x"], array)

    response = encode_response(spec_for(datatype), "r1", {"y": inputs["x"]})
    result = tritongrpc.InferResult(response)
    got = result.as_numpy("y")
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, array)
    assert response.id == "r1"


CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def typed_request(datatype: str, shape: list[int], values: list[Any]) -> Any:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(tensor.contents, CONTENTS[datatype]).extend(values)
    return request


@pytest.mark.parametrize("datatype", sorted(CONTENTS))
def test_typed_contents_of_every_datatype(datatype: str) -> None:
    array = sample(datatype)
    request = typed_request(datatype, [2, 3], array.ravel().tolist())
    inputs, _ = decode_request(request, spec_for(datatype), LIMITS)
    assert inputs["x"].dtype == array.dtype
    np.testing.assert_array_equal(inputs["x"], array)


@pytest.mark.parametrize(
    ("datatype", "value"), [("INT8", 128), ("INT16", -(2**15) - 1), ("UINT8", 256), ("UINT16", 2**16)]
)
def test_typed_values_out_of_range_are_refused(datatype: str, value: int) -> None:
    request = typed_request(datatype, [1, 3], [0, value, 0])
    with pytest.raises(InvalidInput, match=r"'x'.*out of range"):
        decode_request(request, spec_for(datatype), LIMITS)


def test_fp16_has_no_typed_contents() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP16", shape=[1, 3])
    with pytest.raises(InvalidInput, match=r"'x'.*raw_input_contents"):
        decode_request(request, spec_for("FP16"), LIMITS)


def test_raw_contents_for_some_inputs_only_are_refused() -> None:
    request = triton_request(sample("FP32"), "FP32")
    request.inputs.add(name="other", datatype="FP32", shape=[1])
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs"):
        decode_request(request, spec_for("FP32"), LIMITS)


def test_shared_memory_and_unknown_outputs_are_refused() -> None:
    request = triton_request(sample("FP32"), "FP32")
    request.inputs[0].parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(InvalidInput, match=r"'x'.*shared memory"):
        decode_request(request, spec_for("FP32"), LIMITS)
    with pytest.raises(InvalidInput, match="'nope'"):
        decode_request(triton_request(sample("FP32"), "FP32", ["nope"]), spec_for("FP32"), LIMITS)


def test_a_shape_too_large_is_refused_before_any_data_is_read() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[2**31, 3])
    with pytest.raises(InvalidInput, match="'x'"):
        decode_request(request, spec_for("FP32"), LIMITS)


def test_an_output_without_a_protocol_datatype_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="'y'"):
        encode_response(spec_for("FP32"), "", {"y": np.array([1 + 2j])})


def test_too_many_inputs_or_dimensions_are_refused_before_they_are_copied() -> None:
    many = pb.ModelInferRequest(model_name="m")
    for i in range(LIMITS.max_inputs + 1):
        many.inputs.add(name=f"x{i}", datatype="FP32", shape=[1, 3])
    with pytest.raises(InvalidInput, match="inputs"):
        decode_request(many, spec_for("FP32"), LIMITS)
    deep = pb.ModelInferRequest(model_name="m")
    deep.inputs.add(name="x", datatype="FP32", shape=[1] * 100_000)
    with pytest.raises(InvalidInput, match="'x'"):
        decode_request(deep, spec_for("FP32"), LIMITS)


def test_bytes_tensors_have_a_tighter_element_bound() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="BYTES", shape=[LIMITS.max_bytes_elements + 1, 3])
    request.raw_input_contents.append(b"")
    with pytest.raises(PayloadTooLarge, match=r"'x'.*BYTES"):
        decode_request(request, spec_for("BYTES"), LIMITS)
