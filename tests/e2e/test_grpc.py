"""The Open Inference Protocol over gRPC, through ``tritonclient.grpc`` unchanged, against
``smss serve --demo``: health, metadata, infer (raw and typed contents) on every demo model,
and bad requests answered with the right status codes naming what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

if os.environ.get("CI") == "true":  # in CI a missing gRPC stack fails, it does not skip
    import grpc
    import tritonclient.grpc as tritongrpc
else:
    grpc = pytest.importorskip("grpc")
    tritongrpc = pytest.importorskip("tritonclient.grpc")
from e2e_helpers import REQUEST_TIMEOUT_S
from test_inference import MODELS, assert_close, sample
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from smss.testing.server import ServerProcess


@pytest.fixture(scope="module")
def address(demo_server: ServerProcess) -> str:
    assert demo_server.grpc_address is not None, "the test server was started without gRPC"
    return demo_server.grpc_address


@pytest.fixture(scope="module")
def client(address: str) -> Iterator[Any]:
    c = tritongrpc.InferenceServerClient(address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[Any]:
    """The generated stub itself, for requests tritonclient never builds (typed contents)."""
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer_input(name: str, x: np.ndarray, datatype: str = "FP32") -> Any:
    tensor = tritongrpc.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def status_of(call: Any) -> tuple[Any, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_health_and_server_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "smss"
    assert "model_repository" in meta["extensions"]


@pytest.mark.parametrize("model", list(MODELS))
def test_model_metadata_and_readiness(client: Any, model: str) -> None:
    in_name, row, out_name, _ = MODELS[model]
    meta = client.get_model_metadata(model, as_json=True)
    assert meta["name"] == model
    assert meta["versions"] == ["1"]
    assert meta["platform"] == ("onnxruntime" if model.endswith("onnx") else "pytorch")
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        (in_name, "FP32", [-1, *row])
    ]
    assert [t["name"] for t in meta["outputs"]] == [out_name]
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, model_version="1")


@pytest.mark.parametrize(("model", "max_batch"), [("mlp", 32), ("cnn", 8)])
def test_model_config_as_triton_describes_it(client: Any, model: str, max_batch: int) -> None:
    in_name, row, out_name, _ = MODELS[model]
    config = client.get_model_config(model, as_json=True)["config"]
    assert config["name"] == model
    assert config["max_batch_size"] == max_batch
    # With batching the batch dimension is left out of dims, as in Triton.
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        (in_name, "TYPE_FP32", list(row))
    ]
    assert [t["name"] for t in config["output"]] == [out_name]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("model", list(MODELS))
def test_tritonclient_grpc_infer_matches_in_process_model(
    client: Any, reference: dict[str, Any], model: str, batch: int
) -> None:
    in_name, _, out_name, tol = MODELS[model]
    x = sample(model, batch, seed=batch + 11)
    outputs = [tritongrpc.InferRequestedOutput(out_name)]

    result = client.infer(
        model, [infer_input(in_name, x)], outputs=outputs, request_id=f"g-{model}", client_timeout=60
    )

    response = result.get_response()
    assert response.model_name == model
    assert response.model_version == "1"
    assert response.id == f"g-{model}"
    # Answers are raw (raw_output_contents), as Triton sends them.
    assert len(response.raw_output_contents) == 1
    assert_close(result.as_numpy(out_name), reference[model](x), tol)
    # No outputs listed: every output of the model, with a version named.
    again = client.infer(model, [infer_input(in_name, x)], model_version="1", client_timeout=60)
    assert_close(again.as_numpy(out_name), reference[model](x), tol)


def test_typed_contents_are_accepted(stub: Any, reference: dict[str, Any]) -> None:
    x = sample("mlp", 2, seed=5)
    request = pb.ModelInferRequest(model_name="mlp", id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())

    response = stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)

    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("y", "FP32", [2, 10])
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    assert_close(got, reference["mlp"](x), 1e-5)


def test_unknown_model_and_version_are_not_found(client: Any) -> None:
    x = sample("mlp", 1)
    code, message = status_of(lambda: client.infer("nope", [infer_input("x", x)]))
    assert code == "StatusCode.NOT_FOUND"
    assert "nope" in message
    code, _ = status_of(lambda: client.infer("mlp", [infer_input("x", x)], model_version="7"))
    assert code == "StatusCode.NOT_FOUND"
    code, _ = status_of(lambda: client.get_model_metadata("nope"))
    assert code == "StatusCode.NOT_FOUND"
    code, _ = status_of(lambda: client.is_model_ready("nope"))
    assert code == "StatusCode.NOT_FOUND"


BAD: dict[str, tuple[list[tuple[str, np.ndarray, str]], list[str] | None, str]] = {
    "wrong-shape": ([("x", np.zeros((1, 63), np.float32), "FP32")], None, "'x'"),
    "wrong-rank": ([("x", np.zeros(64, np.float32), "FP32")], None, "'x'"),
    "wrong-datatype": ([("x", np.zeros((1, 64), np.int32), "INT32")], None, "'x'"),
    "unknown-input": ([("z", np.zeros((1, 64), np.float32), "FP32")], None, "'z'"),
    "missing-input": ([], None, "'x'"),
    "bytes-for-fp32": ([("x", np.array([[b"a"] * 64], dtype=object), "BYTES")], None, "'x'"),
    "unknown-output": ([("x", np.zeros((1, 64), np.float32), "FP32")], ["nope"], "'nope'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_invalid_argument_naming_the_tensor(client: Any, case: str) -> None:
    tensors, outputs, needle = BAD[case]
    inputs = [infer_input(name, x, datatype) for name, x, datatype in tensors]
    wanted = None if outputs is None else [tritongrpc.InferRequestedOutput(o) for o in outputs]
    code, message = status_of(lambda: client.infer("mlp", inputs, outputs=wanted))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert needle in message
    assert "Traceback" not in message
    assert ".py" not in message


@pytest.mark.parametrize(
    "raw",
    [np.zeros((1, 63), np.float32).tobytes(), b"", np.zeros((1, 65), np.float32).tobytes()],
    ids=["short", "empty", "long"],
)
def test_raw_contents_that_do_not_match_the_shape_are_invalid(stub: Any, raw: bytes) -> None:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(raw)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in caught.value.details()


def test_typed_contents_of_the_wrong_count_or_range_are_invalid(stub: Any) -> None:
    short = pb.ModelInferRequest(model_name="mlp")
    short.inputs.add(name="x", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([0.0] * 63)
    huge = pb.ModelInferRequest(model_name="mlp")
    huge.inputs.add(name="x", datatype="FP32", shape=[2**32, 2**32])
    for request in (short, huge):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
        assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "'x'" in caught.value.details()


@pytest.mark.parametrize("n", [65, 100_000])
def test_too_many_inputs_are_invalid_naming_the_limit(stub: Any, n: int) -> None:
    """RELIABILITY 24 over gRPC: more inputs than ``Limits.max_inputs`` (64) is refused
    before any is read, naming the count and the limit."""
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend([0.0] * 64)
    for k in range(n - 1):
        request.inputs.add(name=f"extra{k}", datatype="FP32", shape=[1]).contents.fp32_contents.append(0.0)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{n} inputs" in caught.value.details()
    assert "at most 64" in caught.value.details()


def test_a_deadline_already_short_is_deadline_exceeded(client: Any) -> None:
    # The cnn at batch 8 takes far longer than a millisecond: the deadline, not the model, ends it.
    x = sample("cnn", 8)
    code, _ = status_of(lambda: client.infer("cnn", [infer_input("image", x)], client_timeout=0.001))
    assert code == "StatusCode.DEADLINE_EXCEEDED"
    # ... and the server still answers the next call.
    assert client.is_server_live()


def test_a_workflow_answers_over_grpc_as_over_http(client: Any, demo_server: ServerProcess) -> None:
    import httpx

    from smss.demo.behavior import FRAME_SHAPE

    meta = client.get_model_metadata("behavior", as_json=True)
    assert meta["platform"] == "workflow"
    frame = np.random.default_rng(3).standard_normal(FRAME_SHAPE, dtype=np.float32)
    # Two fresh sessions on their first turn: the same frame gives the same action.
    result = client.infer(
        "behavior", [infer_input("frame", frame)], headers={"smss-session": "grpc-s1"}, client_timeout=120
    )
    body = {
        "inputs": [
            {"name": "frame", "datatype": "FP32", "shape": list(frame.shape), "data": frame.ravel().tolist()}
        ]
    }
    r = httpx.post(
        f"{demo_server.url}/v2/models/behavior/infer",
        json=body,
        headers={"smss-session": "http-s1"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    want = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(result.as_numpy("action"), want, rtol=1e-6, atol=1e-6)
