"""Every malformed request gets its status and a plain ``{"error": ...}`` body, and the
server keeps serving: each case is followed by a good request whose output is checked."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from e2e_helpers import REQUEST_TIMEOUT_S, assert_error, json_infer_body, output_of, wait_until

from smss.testing.server import ServerProcess

X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
GOOD = json_infer_body({"x": X})
BODY_LIMIT = 64 * 1024 * 1024  # smss serve's default Limits.max_body_bytes


def tensor(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "x", "datatype": "FP32", "shape": [1, 64], "data": X.ravel().tolist()}
    return {"inputs": [{**base, **overrides}]}


@pytest.fixture
def http(demo_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=demo_server.url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


@pytest.fixture
def still_serving(http: httpx.Client, reference: dict[str, Any]) -> Iterator[None]:
    """After the test's bad request(s), a good request still gets the right answer."""
    want = reference["mlp"](X)
    yield
    got = output_of(http.post("/v2/models/mlp/infer", json=GOOD), "y")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def post(http: httpx.Client, body: bytes | dict[str, Any], model: str = "mlp", **headers: str) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(
        f"/v2/models/{model}/infer",
        content=content,
        headers={"Content-Type": "application/json", **headers},
    )


# ---------------------------------------------------------------------------------- 404


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/no-such-model/infer"),
        ("POST", "/v2/models/mlp/versions/2/infer"),
        ("GET", "/v2/models/no-such-model"),
        ("GET", "/v2/models/mlp/versions/2"),
        ("GET", "/v2/models/mlp/versions/2/ready"),
        ("GET", "/v1/functions/no-such-model"),
        ("GET", "/no/such/route"),
    ],
)
def test_unknown_model_or_version_is_404(http: httpx.Client, method: str, path: str) -> None:
    r = http.request(method, path, json=GOOD if method == "POST" else None)
    assert_error(r, 404)


def test_wrong_method_is_405_with_error_body(http: httpx.Client) -> None:
    assert_error(http.get("/v2/models/mlp/infer"), 405)


# ---------------------------------------------------------------------------------- malformed JSON

DEEP = 100_000
MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "truncated": json.dumps(GOOD).encode()[:50],
    "invalid-utf8-string": b'{"id": "\xff\xfe", "inputs": []}',
    "invalid-utf8-name": json.dumps(GOOD).encode().replace(b'"x"', b'"\xc3\x28"'),
    "array-not-object": b"[" + json.dumps(GOOD).encode() + b"]",
    "string-not-object": b'"inputs"',
    "nan-in-data": json.dumps(tensor(data=[float("nan")] * 64)).encode(),
    "bare-nan": b"NaN",
    "deep-array": b"[" * DEEP + b"]" * DEEP,
    "deep-object": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "deep-unknown-field": b'{"extra":' + b"[" * DEEP + b"]" * DEEP + b',"inputs":[]}',
    "deep-data": json.dumps(tensor(data=None)).encode().replace(b"null", b"[" * DEEP + b"]" * DEEP),
    "deep-parameters": json.dumps(tensor()).encode()[:-3]
    + b',"parameters":{"p":'
    + b"[" * DEEP
    + b"]" * DEEP
    + b"}}]}",
    "trailing-garbage": json.dumps(GOOD).encode() + b"}}",
    "inputs-not-list": b'{"inputs": {"x": 1}}',
}


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_json_is_400(http: httpx.Client, body: bytes) -> None:
    assert_error(post(http, body), 400)


# ---------------------------------------------------------------------------------- tensors

#: case -> (request, what the message must name: the offending input or output, or None).
BAD_TENSORS: dict[str, tuple[dict[str, Any], str | None]] = {
    "wrong-shape": (tensor(shape=[1, 63], data=[0.0] * 63), "'x'"),
    "wrong-rank": (tensor(shape=[64], data=[0.0] * 64), "'x'"),
    "data-too-short": (tensor(data=[0.0] * 63), "'x'"),
    "data-too-long": (tensor(data=[0.0] * 65), "'x'"),
    "ragged-nested-data": (tensor(shape=[2, 64], data=[[0.0] * 64, [0.0] * 63]), "'x'"),
    "wrong-datatype": (tensor(datatype="INT32", data=[0] * 64), "'x'"),
    "unknown-datatype": (tensor(datatype="FP128"), "'x'"),
    "bytes-datatype": (tensor(datatype="BYTES", data=["a"] * 64), "'x'"),
    "string-data": (tensor(data=["0.5"] * 64), "'x'"),
    "null-element": (tensor(data=[None] * 64), "'x'"),
    "fp32-overflow": (tensor(data=[1e39] * 64), "'x'"),
    "unknown-input": (tensor(name="z"), "'z'"),
    "missing-input": ({"inputs": []}, "'x'"),
    "no-inputs-field": ({"id": "1"}, None),
    "duplicate-input": ({"inputs": tensor()["inputs"] * 2}, "'x'"),
    "too-many-inputs": (
        {"inputs": tensor()["inputs"] + [tensor(name=f"x{i}")["inputs"][0] for i in range(64)]},
        None,
    ),
    "negative-dim": (tensor(shape=[-1, 64]), "'x'"),
    "too-many-dims": (tensor(shape=[1] * 9 + [64]), "'x'"),
    "no-data": (tensor(data=None), "'x'"),
    "unknown-output": ({**tensor(), "outputs": [{"name": "nope"}]}, "'nope'"),
    "binary-flag-not-bool": ({**tensor(), "parameters": {"binary_data_output": "yes"}}, None),
    "id-too-long": ({**tensor(), "id": "i" * 5000}, None),
    "id-not-a-string": ({**tensor(), "id": 7}, None),
    "binary-size-without-header": (tensor(data=None, parameters={"binary_data_size": 256}), "'x'"),
}


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(("body", "names"), BAD_TENSORS.values(), ids=BAD_TENSORS.keys())
def test_bad_tensor_is_400(http: httpx.Client, body: dict[str, Any], names: str | None) -> None:
    message = assert_error(post(http, body), 400)
    if names is not None:
        assert names in message, message


OVERFLOWING_SHAPES = {
    "2**32 x 2**32": [2**32, 2**32],
    "2**63 x 64": [2**63, 64],
    "2**64 x 2**64": [2**64, 2**64],
    "zero x 2**62": [0, 2**62],
}


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("shape", OVERFLOWING_SHAPES.values(), ids=OVERFLOWING_SHAPES.keys())
def test_overflowing_dims_are_refused_without_500(http: httpx.Client, shape: list[int]) -> None:
    r = post(http, tensor(shape=shape))
    assert r.status_code in (400, 413), r.text
    assert "'x'" in assert_error(r, r.status_code), "the error should name the input"


@pytest.mark.usefixtures("still_serving")
def test_overflowing_dims_are_400(http: httpx.Client) -> None:
    assert_error(post(http, tensor(shape=[2**32, 2**32])), 400)


# ---------------------------------------------------------------------------------- binary tensors


def binary_request(shape: list[int], payload: bytes, header_length: int | None = None) -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": shape,
                    "parameters": {"binary_data_size": 4 * int(np.prod(shape))},
                }
            ]
        }
    ).encode()
    return header + payload, str(len(header) if header_length is None else header_length)


@pytest.mark.usefixtures("still_serving")
def test_binary_header_length_larger_than_body_is_400(http: httpx.Client) -> None:
    body, _ = binary_request([1, 64], X.tobytes())
    assert_error(post(http, body, **{"Inference-Header-Content-Length": str(len(body) + 1)}), 400)
    assert_error(post(http, body, **{"Inference-Header-Content-Length": str(2**63)}), 400)


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("value", ["-1", "abc", "0", "1e3"])
def test_binary_header_length_not_a_valid_length_is_400(http: httpx.Client, value: str) -> None:
    body, _ = binary_request([1, 64], X.tobytes())
    assert_error(post(http, body, **{"Inference-Header-Content-Length": value}), 400)


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize(
    "payload", [b"", X.tobytes()[:-4], X.tobytes() + b"\0" * 4], ids=["none", "short", "long"]
)
def test_binary_data_not_matching_its_size_is_400(http: httpx.Client, payload: bytes) -> None:
    body, length = binary_request([1, 64], payload)
    assert_error(post(http, body, **{"Inference-Header-Content-Length": length}), 400)


@pytest.mark.usefixtures("still_serving")
def test_binary_size_larger_than_the_shape_needs_is_400(http: httpx.Client) -> None:
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 64], "parameters": {"binary_data_size": 2**40}}
            ]
        }
    ).encode()
    assert_error(
        post(http, header + X.tobytes(), **{"Inference-Header-Content-Length": str(len(header))}), 400
    )


# ---------------------------------------------------------------------------------- input count

MAX_INPUTS = 64  # smss serve's default Limits.max_inputs


def many_inputs(n: int) -> dict[str, Any]:
    """``x`` and ``n - 1`` more one-value inputs."""
    extra = [{"name": f"extra{k}", "datatype": "FP32", "shape": [1], "data": [0.0]} for k in range(n - 1)]
    return {"inputs": [tensor()["inputs"][0], *extra]}


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("n", [MAX_INPUTS + 1, 100_000])
def test_too_many_inputs_is_400_naming_the_limit(http: httpx.Client, n: int) -> None:
    message = assert_error(post(http, many_inputs(n)), 400)
    assert f"{n} inputs" in message, message
    assert f"at most {MAX_INPUTS}" in message, message


@pytest.mark.usefixtures("still_serving")
def test_too_many_binary_inputs_is_400_naming_the_limit(http: httpx.Client) -> None:
    n = MAX_INPUTS + 1
    header = json.dumps(
        {
            "inputs": [
                {"name": f"in{k}", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}
                for k in range(n)
            ]
        }
    ).encode()
    body = header + b"\0" * 4 * n
    message = assert_error(post(http, body, **{"Inference-Header-Content-Length": str(len(header))}), 400)
    assert f"at most {MAX_INPUTS}" in message, message


@pytest.mark.usefixtures("still_serving")
def test_inputs_at_the_limit_are_not_refused_for_their_count(http: httpx.Client) -> None:
    message = assert_error(post(http, many_inputs(MAX_INPUTS)), 400)  # refused: unknown names
    assert "at most" not in message, message
    assert "extra" in message, message


@pytest.mark.usefixtures("still_serving")
def test_too_many_inputs_to_a_workflow_run_is_400_naming_the_limit(http: httpx.Client) -> None:
    r = http.post("/v1/workflows/behavior/runs", json=many_inputs(MAX_INPUTS + 1))
    assert f"at most {MAX_INPUTS}" in assert_error(r, 400)


# ---------------------------------------------------------------------------------- memory


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (its peak) of ``pid``, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _bad_shapes() -> list[tuple[bytes, dict[str, str]]]:
    """Requests whose shapes and sizes do not hold, each as (body, extra headers). Some
    declare tensors of 64 MiB that a server allocating before it checks would build."""
    big = [1024, 16384]  # 16 Mi FP32 elements: 64 MiB, within max_tensor_elements
    cases: list[dict[str, Any]] = [
        tensor(data=X.ravel().tolist()[:-1]),  # one value short
        tensor(shape=big),  # 64 values for 16 Mi
        tensor(shape=[2**32, 2**32]),
        tensor(shape=[-1, 64]),
        tensor(datatype="FP128"),
        tensor(name="nope"),
    ]
    out = [(json.dumps(c).encode(), {}) for c in cases]
    for shape, size in ((big, 4 * 1024 * 16384), ([1, 64], 2**40)):
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": shape,
                        "parameters": {"binary_data_size": size},
                    }
                ]
            }
        ).encode()
        out.append((header + X.tobytes(), {"Inference-Header-Content-Length": str(len(header))}))
    return out


@pytest.mark.usefixtures("still_serving")
def test_memory_stays_flat_under_a_stream_of_bad_shapes(
    http: httpx.Client, demo_server: ServerProcess
) -> None:
    """RELIABILITY 23: thousands of requests with bad shapes and sizes (some declaring
    64 MiB tensors) leave the gateway's memory where it was: each is refused with 400
    before anything of its declared size is allocated, and nothing of it is kept."""
    cases = _bad_shapes()

    def stream(rounds: int) -> None:
        for _ in range(rounds):
            for body, headers in cases:
                assert_error(post(http, body, **headers), 400)

    stream(30)  # warm-up: lazily built state (caches, pools) is in place
    before = _memory_kib(demo_server.process.pid)
    stream(400)  # 3,200 requests
    after = _memory_kib(demo_server.process.pid)
    grown_mib = (after["VmRSS"] - before["VmRSS"]) / 1024
    peak_mib = (after["VmHWM"] - before["VmHWM"]) / 1024
    # Generous: a request's declared tensor is 64 MiB, the leak of one body per request
    # would be 3,200 bodies (16 MiB: 5 KiB a request); allocator noise is a few MiB.
    assert grown_mib < 16, (before, after)
    assert peak_mib < 32, (before, after)


# ---------------------------------------------------------------------------------- body size


def raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send ``head`` (and ``body``) on a raw socket and read the reply until the server closes
    the connection or a full response (headers and Content-Length bytes) has arrived."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(head + body)
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return reply
            reply += chunk
            header_end = reply.find(b"\r\n\r\n")
            if header_end >= 0:
                lengths = [
                    int(line.split(b":", 1)[1])
                    for line in reply[:header_end].split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if lengths and len(reply) >= header_end + 4 + lengths[0]:
                    return reply


@pytest.mark.usefixtures("still_serving")
@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/models/mlp/versions/1/infer"])
def test_body_over_limit_is_413_before_the_body_is_sent(demo_server: ServerProcess, path: str) -> None:
    # Only the headers go out: a server that waited for the 64 MiB body would never answer
    # and the socket timeout would fail the test.
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {BODY_LIMIT + 1}\r\n\r\n"
    ).encode()
    reply = raw_request(demo_server.url, head)
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split()[1] == b"413", reply[:500]
    body = rest.partition(b"\r\n\r\n")[2]
    error = json.loads(body)
    assert isinstance(error["error"], str)
    assert b"Traceback" not in body


@pytest.mark.usefixtures("still_serving")
def test_body_at_limit_is_not_refused_for_size(http: httpx.Client) -> None:
    # A body of exactly the limit passes the size check (and then fails as JSON).
    body = b" " * (BODY_LIMIT - 2) + b"{}"
    message = assert_error(post(http, body), 400)
    assert "limit" not in message


@pytest.mark.usefixtures("still_serving")
def test_chunked_body_over_limit_is_413(demo_server: ServerProcess) -> None:
    # No Content-Length: the server counts while it streams and stops at the limit.
    chunk = b" " * (1 << 20)
    head = (
        b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    chunks = BODY_LIMIT // len(chunk) + 2
    parts = urlsplit(demo_server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(head)
        try:
            for _ in range(chunks):
                sock.sendall(frame)
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: fine
        reply = b""
        try:
            while b"\r\n\r\n" not in reply and (data := sock.recv(65536)):
                reply += data
        except ConnectionResetError:
            pass
    assert reply.split(b"\r\n", 1)[0].split()[1:2] == [b"413"], reply[:500]


# ---------------------------------------------------------------------------------- slow clients


def test_stalled_and_vanishing_clients_do_not_disturb_others(
    demo_server: ServerProcess, http: httpx.Client, reference: dict[str, Any]
) -> None:
    parts = urlsplit(demo_server.url)
    address = (parts.hostname, parts.port)
    good = json.dumps(GOOD).encode()
    head = (
        f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(good)}\r\n\r\n"
    ).encode()
    stalled: list[socket.socket] = []
    try:
        for k in range(16):
            sock = socket.create_connection(address, timeout=REQUEST_TIMEOUT_S)
            stalled.append(sock)
            # Half the headers, or the headers and half the body; then nothing.
            sock.sendall(head[: len(head) // 2] if k % 2 else head + good[: len(good) // 2])
        for _ in range(8):
            # A whole request, then gone before the answer.
            with socket.create_connection(address, timeout=REQUEST_TIMEOUT_S) as sock:
                sock.sendall(head + good)
        want = reference["mlp"](X)
        for _ in range(5):
            got = output_of(http.post("/v2/models/mlp/infer", json=GOOD), "y")
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        for sock in stalled:
            sock.close()

    def settled() -> bool:
        mlp = http.get("/v1/functions/mlp").json()
        return mlp["queued"] == 0 and all(i["in_flight"] == 0 for i in mlp["instances"])

    wait_until(settled, 30, "in-flight and queued counts of mlp to return to zero")
