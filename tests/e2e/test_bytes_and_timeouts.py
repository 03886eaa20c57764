"""BYTES tensors over every wire, per-request timeouts, and the token on the repository RPCs,
against a real ``smss serve`` of its own (a token, a 3 s request timeout) with two models
deployed here: ``upper`` (BYTES in and out) and ``sleepy`` (sleeps as long as it is told).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import tritonclient.http as tritonhttp

if os.environ.get("CI") == "true":  # in CI a missing gRPC stack fails, it does not skip
    import grpc
    import tritonclient.grpc as tritongrpc
else:
    grpc = pytest.importorskip("grpc")
    tritongrpc = pytest.importorskip("tritonclient.grpc")
from e2e_helpers import MODELS, REQUEST_TIMEOUT_S, assert_error, functions, smss_cli, start, stop_checked
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

import smss
from smss.testing.server import ServerProcess, wait_until
from smss.workflow.builder import Workflow

TOKEN = "bytes-and-timeouts-token"
MAX_TIMEOUT_S = 3.0
TEXT = ["hello", "w\u00f6rld", "", "two words", "x" * 500]
UPPER = [t.upper().encode() for t in TEXT]
LENGTHS = [len(t.encode()) for t in TEXT]


def strings(values: list[str]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = [v.encode() for v in values]
    return array


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("bytes-server")
    srv = start(data, ["--token", TOKEN, "--request-timeout", str(MAX_TIMEOUT_S), "--keep-alive", "300"])
    try:
        with smss.Client(srv.url, token=TOKEN, timeout=REQUEST_TIMEOUT_S) as admin:
            admin.deploy(f"{MODELS / 'broken.py'}:Broken")  # never starts: UNAVAILABLE below
            for target in ("upper.py:Upper", "sleepy.py:Sleepy"):
                name = admin.deploy(f"{MODELS / target}")["name"]
                # Started now: a cold start must not eat the short request timeout below.
                admin.post(f"/v2/repository/models/{name}/load")
                wait_until(lambda n=name: functions(srv.url)[n]["instances"], 120, f"{name} to start")
            shout = Workflow("shout").stage("up", "upper", inputs={"text": "request.text"})
            shout = shout.output("upper", "up.upper")
            admin.post("/v1/workflows", msgspec.to_builtins(shout.spec()))
        yield srv
    finally:
        stop_checked(srv)


@pytest.fixture(scope="module")
def grpc_client(server: ServerProcess) -> Iterator[Any]:
    assert server.grpc_address is not None
    client = tritongrpc.InferenceServerClient(server.grpc_address)
    yield client
    client.close()


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


def assert_upper(outputs: dict[str, np.ndarray]) -> None:
    upper = outputs["upper"]
    assert upper.dtype == object
    assert upper.tolist() == UPPER
    assert outputs["length"].tolist() == LENGTHS


# ------------------------------------------------------------------------------ BYTES


def test_bytes_over_tritonclient_grpc(grpc_client: Any) -> None:
    tensor = tritongrpc.InferInput("text", [len(TEXT)], "BYTES")
    tensor.set_data_from_numpy(strings(TEXT))  # raw_input_contents, length-prefixed
    result = grpc_client.infer("upper", [tensor], client_timeout=REQUEST_TIMEOUT_S)
    assert_upper({"upper": result.as_numpy("upper"), "length": result.as_numpy("length")})
    meta = grpc_client.get_model_metadata("upper", as_json=True)
    assert meta["inputs"][0]["datatype"] == "BYTES"


def test_bytes_in_typed_grpc_contents(server: ServerProcess) -> None:
    assert server.grpc_address is not None
    request = pb.ModelInferRequest(model_name="upper")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(TEXT)])
    tensor.contents.bytes_contents.extend(t.encode() for t in TEXT)
    with grpc.insecure_channel(server.grpc_address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents[names.index("upper")]
    expected = b"".join(struct.pack("<I", len(u)) + u for u in UPPER)
    assert raw == expected  # each element: a u32 little-endian length, then its bytes


@pytest.mark.parametrize("binary_out", [True, False], ids=["bin-out", "json-out"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["bin-in", "json-in"])
def test_bytes_over_tritonclient_http(server: ServerProcess, binary_in: bool, binary_out: bool) -> None:
    client = tritonhttp.InferenceServerClient(
        server.url.removeprefix("http://"), network_timeout=REQUEST_TIMEOUT_S
    )
    try:
        tensor = tritonhttp.InferInput("text", [len(TEXT)], "BYTES")
        tensor.set_data_from_numpy(strings(TEXT), binary_data=binary_in)
        outputs = [tritonhttp.InferRequestedOutput(o, binary_data=binary_out) for o in ("upper", "length")]
        result = client.infer("upper", [tensor], outputs=outputs)
        upper = result.as_numpy("upper")
        # JSON strings come back to tritonclient as str, binary elements as bytes (as from Triton).
        got = [u if isinstance(u, bytes) else u.encode() for u in upper.tolist()]
        assert got == UPPER
        assert isinstance(upper.tolist()[0], bytes) == binary_out
        assert result.as_numpy("length").tolist() == LENGTHS
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_through_smss_clients(server: ServerProcess, binary: bool) -> None:
    with smss.Client(server.url, timeout=REQUEST_TIMEOUT_S) as client:
        assert_upper(client.infer("upper", {"text": strings(TEXT)}, binary=binary))
        # A list of str is sent as BYTES too.
        assert client.infer("upper", {"text": ["abc"]}, binary=binary)["upper"].tolist() == [b"ABC"]

    async def main() -> dict[str, np.ndarray]:
        async with smss.AsyncClient(server.url, timeout=REQUEST_TIMEOUT_S) as client:
            return await client.infer("upper", {"text": strings(TEXT)}, binary=binary)

    assert_upper(asyncio.run(main()))


def test_bytes_through_smss_invoke(server: ServerProcess) -> None:
    done = smss_cli("invoke", "upper", json.dumps({"text": ["ab", "\u00e9"]}), "--url", server.url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"upper": ["AB", "\u00c9"], "length": [2, 2]}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_through_a_durable_workflow(server: ServerProcess, binary: bool) -> None:
    # The run's inputs and outputs are stored as blobs: BYTES ones too, length-prefixed.
    with smss.Client(server.url, timeout=REQUEST_TIMEOUT_S) as client:
        out = client.infer("shout", {"text": strings(TEXT)}, binary=binary)
    assert out["upper"].tolist() == UPPER


def binary_request(text_bytes: bytes, shape: list[int]) -> tuple[bytes, dict[str, str]]:
    header = (
        b'{"inputs":[{"name":"text","datatype":"BYTES","shape":%b,'
        b'"parameters":{"binary_data_size":%d}}]}' % (str(shape).encode(), len(text_bytes))
    )
    return header + text_bytes, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("payload", "shape"),
    [
        (struct.pack("<I", 50) + b"short", [1]),
        (struct.pack("<I", 1) + b"a", [2]),
        (struct.pack("<I", 1) + b"abc", [1]),
        (b"", [1000]),
    ],
    ids=["length-past-end", "too-few-elements", "trailing-bytes", "count-without-bytes"],
)
def test_corrupt_binary_bytes_are_400_naming_the_input(
    http: httpx.Client, server: ServerProcess, payload: bytes, shape: list[int]
) -> None:
    body, headers = binary_request(payload, shape)
    r = http.post("/v2/models/upper/infer", content=body, headers=headers)
    assert "'text'" in assert_error(r, 400, data_dir=server.data_dir)
    # The same bytes as gRPC raw contents: INVALID_ARGUMENT.
    request = pb.ModelInferRequest(model_name="upper")
    request.inputs.add(name="text", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(payload)
    assert server.grpc_address is not None
    with grpc.insecure_channel(server.grpc_address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'text'" in caught.value.details()


def test_json_bytes_must_be_strings(http: httpx.Client, server: ServerProcess) -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [1, 2]}]}
    r = http.post("/v2/models/upper/infer", json=body)
    assert "'text'" in assert_error(r, 400, data_dir=server.data_dir)


# --------------------------------------------------------------------------- timeouts


def sleepy_body(seconds: float) -> dict[str, Any]:
    return {"inputs": [{"name": "seconds", "datatype": "FP32", "shape": [1], "data": [seconds]}]}


def test_timeout_header_cuts_a_request_short(http: httpx.Client, server: ServerProcess) -> None:
    r = http.post(
        "/v2/models/sleepy/infer", json=sleepy_body(2.5), headers={"x-request-timeout-seconds": "0.3"}
    )
    assert_error(r, 504, data_dir=server.data_dir)
    # Time enough: answered.
    r = http.post(
        "/v2/models/sleepy/infer", json=sleepy_body(0.05), headers={"x-request-timeout-seconds": "2.5"}
    )
    assert r.status_code == 200, r.text


def test_timeout_header_is_bounded_by_the_server_maximum(http: httpx.Client, server: ServerProcess) -> None:
    # Asks for a minute; the server allows 3 s; the model takes 5 s: 504, not 200.
    r = http.post(
        "/v2/models/sleepy/infer", json=sleepy_body(5.0), headers={"x-request-timeout-seconds": "60"}
    )
    assert_error(r, 504, data_dir=server.data_dir)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", ""])
def test_a_bad_timeout_header_is_400(http: httpx.Client, server: ServerProcess, value: str) -> None:
    r = http.post(
        "/v2/models/sleepy/infer", json=sleepy_body(0.0), headers={"x-request-timeout-seconds": value}
    )
    assert "x-request-timeout-seconds" in assert_error(r, 400, data_dir=server.data_dir)


def test_smss_client_timeout(server: ServerProcess) -> None:
    with (
        smss.Client(server.url, timeout=REQUEST_TIMEOUT_S) as client,
        pytest.raises(smss.errors.DeadlineExceeded),
    ):
        client.infer("sleepy", {"seconds": np.array([2.5], np.float32)}, timeout_s=0.3)


def test_grpc_deadline_beyond_the_maximum_is_cut_by_the_server(grpc_client: Any) -> None:
    tensor = tritongrpc.InferInput("seconds", [1], "FP32")
    tensor.set_data_from_numpy(np.array([5.0], np.float32))
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer("sleepy", [tensor], client_timeout=30)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # The server's own answer (its 3 s maximum), not the client's 30 s deadline.
    assert "deadline" in caught.value.message()
    assert "sleepy" in caught.value.message()


def test_a_model_that_cannot_start_is_unavailable_with_retry_after(server: ServerProcess) -> None:
    assert server.grpc_address is not None
    request = pb.ModelInferRequest(model_name="broken")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0.0] * 4)
    with grpc.insecure_channel(server.grpc_address) as channel, pytest.raises(grpc.RpcError) as caught:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "broken" in caught.value.details()
    trailing = dict(caught.value.trailing_metadata() or ())
    assert int(trailing["retry-after"]) >= 1


# ---------------------------------------------------------------------- repository RPCs


def test_repository_rpcs_need_the_token(grpc_client: Any) -> None:
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.get_model_repository_index()
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.unload_model("upper", headers={"authorization": "Bearer wrong"})
    assert caught.value.status() == "StatusCode.PERMISSION_DENIED"

    auth = {"authorization": f"Bearer {TOKEN}"}
    index = grpc_client.get_model_repository_index(headers=auth, as_json=True)
    assert {m["name"] for m in index["models"]} == {"upper", "sleepy", "broken"}
    grpc_client.load_model("upper", headers=auth)
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.load_model("nope", headers=auth)
    assert caught.value.status() == "StatusCode.NOT_FOUND"
