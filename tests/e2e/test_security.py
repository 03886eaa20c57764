"""The admin token, public binding, path traversal in names, upload integrity and pickled weights.

Admin authentication failures are rate-limited per client address (10 a minute),
so each test that fails on purpose talks from its own loopback address
(127.0.0.N): its failures never lock out another test.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import numpy as np
import pytest
import tritonclient.http as tritonhttp
from e2e_helpers import (
    MODELS,
    REQUEST_TIMEOUT_S,
    assert_error,
    functions,
    json_infer_body,
    renamed_model,
    smss_cli,
    start,
    stop_checked,
    write_scale_weights,
)

from smss.client import Client
from smss.errors import SmssError
from smss.packaging import package
from smss.testing.server import ServerProcess, free_port

TOKEN = "s3cret-admin-token"
X4 = np.array([[1.0, -2.0, 3.5, 0.25]], dtype=np.float32)
_addresses = itertools.count(2)


@dataclass(frozen=True)
class TokenServer:
    server: ServerProcess
    data_dir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, token: str | None = None, scheme: str = "Bearer") -> httpx.Client:
        """An HTTP client on a loopback address of its own (see the module docstring)."""
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        transport = httpx.HTTPTransport(local_address=f"127.0.0.{next(_addresses)}")
        return httpx.Client(
            base_url=self.url, headers=headers, transport=transport, timeout=REQUEST_TIMEOUT_S
        )


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    data = tmp_path_factory.mktemp("token-server")
    server = start(data, ["--token", TOKEN, "--keep-alive", "300"])
    try:
        with Client(server.url, TOKEN) as admin:
            admin.deploy(f"{MODELS / 'echo.py'}:Echo")
        yield TokenServer(server, data)
    finally:
        stop_checked(server)


def deploy_body(name: str) -> dict[str, Any]:
    """A deploy request for ``models/echo.py`` under another name."""
    pkg = package(f"{MODELS / 'echo.py'}:Echo", None)
    spec = msgspec.to_builtins(pkg.spec)
    spec["name"] = name
    return {"spec": spec, "source": pkg.source, "weights_sha256": None}


def echo_works(http: httpx.Client, name: str = "echo") -> None:
    r = http.post(f"/v2/models/{name}/infer", json=json_infer_body({"x": X4}))
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == (X4 * 2).ravel().tolist()


# ---------------------------------------------------------------------------------- token


UPLOAD = b"some weights"
UPLOAD_SHA = hashlib.sha256(UPLOAD).hexdigest()


@dataclass(frozen=True)
class AdminRoute:
    method: str
    path: str
    json: dict[str, Any] | None = None
    content: bytes | None = None

    def send(self, http: httpx.Client) -> httpx.Response:
        return http.request(self.method, self.path, json=self.json, content=self.content)


ADMIN_ROUTES = {
    "upload": AdminRoute("PUT", f"/v1/uploads/{UPLOAD_SHA}", content=UPLOAD),
    "deploy": AdminRoute("POST", "/v1/functions", json=deploy_body("guarded")),
    "delete": AdminRoute("DELETE", "/v1/functions/doomed"),
    "repository-index": AdminRoute("POST", "/v2/repository/index"),
    "repository-load": AdminRoute("POST", "/v2/repository/models/echo/load"),
    "repository-unload": AdminRoute("POST", "/v2/repository/models/echo/unload"),
}


def effect_visible(server: TokenServer, route: str) -> bool:
    """Whether the admin call ``route`` has taken effect."""
    if route == "upload":
        return (server.data_dir / "uploads" / UPLOAD_SHA).exists()
    if route == "deploy":
        return "guarded" in functions(server.url)
    if route == "delete":
        return "doomed" not in functions(server.url)
    return False  # the repository routes are checked by their answers


@pytest.mark.parametrize("route", ADMIN_ROUTES.values(), ids=ADMIN_ROUTES.keys())
def test_admin_routes_need_the_token(token_server: TokenServer, route: AdminRoute) -> None:
    name = next(k for k, v in ADMIN_ROUTES.items() if v is route)
    if name == "delete":
        with token_server.client(TOKEN) as admin:
            assert admin.post("/v1/functions", json=deploy_body("doomed")).status_code == 201

    with token_server.client() as anonymous:
        r = route.send(anonymous)
        assert_error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
    with token_server.client("wrong-token") as wrong:
        assert_error(route.send(wrong), 403)
    with token_server.client(TOKEN, scheme="Basic") as wrong_scheme:
        assert_error(route.send(wrong_scheme), 403)
    with token_server.client(TOKEN + "x") as longer:
        assert_error(route.send(longer), 403)
    assert not effect_visible(token_server, name), "a refused admin call took effect"

    with token_server.client(TOKEN) as admin:
        r = route.send(admin)
        assert r.status_code in (200, 201), r.text
        if name == "repository-index":
            assert {"name": "echo", "version": "1"}.items() <= r.json()[0].items()
    if name in ("upload", "deploy", "delete"):
        assert effect_visible(token_server, name)
    with token_server.client() as anonymous:
        echo_works(anonymous)


def test_inference_and_read_routes_work_without_token(token_server: TokenServer) -> None:
    with token_server.client() as anonymous:
        for path in (
            "/v2/health/live",
            "/v2/health/ready",
            "/v2",
            "/v2/models/echo",
            "/v2/models/echo/ready",
        ):
            assert anonymous.get(path).status_code == 200, path
        for path in ("/v1/functions", "/v1/functions/echo", "/metrics", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        echo_works(anonymous)
        r = anonymous.get("/v1/functions")
        assert TOKEN not in r.text
    triton = tritonhttp.InferenceServerClient(token_server.url.removeprefix("http://"))
    try:
        tensor = tritonhttp.InferInput("x", list(X4.shape), "FP32")
        tensor.set_data_from_numpy(X4)
        result = triton.infer("echo", [tensor])
        np.testing.assert_array_equal(result.as_numpy("y"), X4 * 2)
    finally:
        triton.close()


def test_repeated_auth_failures_are_rate_limited(token_server: TokenServer) -> None:
    with token_server.client("guess") as guesser:
        statuses = [guesser.post("/v2/repository/index").status_code for _ in range(10)]
        assert statuses == [403] * 10
        assert_error(guesser.post("/v2/repository/index"), 429)
    # Other clients are not locked out.
    with token_server.client(TOKEN) as admin:
        assert admin.post("/v2/repository/index").status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_public_bind_without_token_is_refused(tmp_path: Path, host: str) -> None:
    data = tmp_path / "data"
    # It must refuse before binding: a server that started would run until the timeout.
    done = smss_cli(
        "serve", "--host", host, "--port", str(free_port()), "--data-dir", str(data), timeout_s=60
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "token" in output.lower(), output
    assert "Traceback" not in output
    assert not (data / "registry.db").exists()


# ---------------------------------------------------------------------------------- names and uploads

UNSAFE_NAMES = ["../evil", "a/b", "..", "/abs", "a\x00b", "x..y", ".hidden", "a\\b"]


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=[repr(n) for n in UNSAFE_NAMES])
def test_deploy_with_unsafe_name_is_rejected(token_server: TokenServer, tmp_path: Path, name: str) -> None:
    outside = token_server.data_dir.parent
    before = set(os.listdir(outside))
    functions_before = set(os.listdir(token_server.data_dir / "functions"))
    with token_server.client(TOKEN) as admin:
        assert_error(admin.post("/v1/functions", json=deploy_body(name)), 400)
    assert set(os.listdir(outside)) == before
    assert set(os.listdir(token_server.data_dir / "functions")) == functions_before
    assert name not in functions(token_server.url)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("entrypoint", "../../evil.py:Echo"),
        ("entrypoint", "/tmp/evil.py:Echo"),
        ("weights", "../weights.safetensors"),
        ("version", "../1"),
    ],
)
def test_deploy_with_unsafe_paths_in_spec_is_rejected(
    token_server: TokenServer, field: str, value: str
) -> None:
    body = deploy_body("pathy")
    body["spec"][field] = value
    if field == "weights":
        body["spec"]["weights_format"] = "safetensors"
    with token_server.client(TOKEN) as admin:
        assert_error(admin.post("/v1/functions", json=body), 400, echoes=[value])
    assert "pathy" not in functions(token_server.url)
    assert not (token_server.data_dir / "functions" / "pathy").exists()


def test_names_with_traversal_in_the_url_touch_nothing(token_server: TokenServer) -> None:
    with token_server.client(TOKEN) as admin:
        for path in ("/v1/functions/%2e%2e", "/v1/functions/..%2F..%2Fuploads"):
            r = admin.delete(path)
            assert r.status_code in (400, 404), r.text
            assert_error(r, r.status_code)
    assert (token_server.data_dir / "functions" / "echo").is_dir()
    assert (token_server.data_dir / "uploads").is_dir()
    with token_server.client() as anonymous:
        echo_works(anonymous)


def test_upload_not_matching_its_sha256_is_rejected(token_server: TokenServer) -> None:
    content = b"the real bytes"
    claimed = hashlib.sha256(b"other bytes").hexdigest()
    uploads = token_server.data_dir / "uploads"
    with token_server.client(TOKEN) as admin:
        assert_error(admin.put(f"/v1/uploads/{claimed}", content=content), 400)
        assert_error(admin.put("/v1/uploads/not-a-sha256", content=content), 400)
        assert_error(admin.put(f"/v1/uploads/{claimed.upper()}", content=content), 400)
    assert not (uploads / claimed).exists()
    assert [p.name for p in uploads.iterdir() if p.name.startswith(".")] == [], "partial upload left behind"


def test_upload_over_limit_is_413_before_the_body(token_server: TokenServer) -> None:
    """Only the headers of a 5 GiB upload are sent: the answer must not wait for the body."""
    parts = urlsplit(token_server.url)
    head = (
        f"PUT /v1/uploads/{UPLOAD_SHA} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {5 * 1024**3}\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(head)
        reply = b""
        while b"\r\n\r\n" not in reply and (data := sock.recv(65536)):
            reply += data
    assert reply.split(b"\r\n", 1)[0].split()[1:2] == [b"413"], reply[:300]


# ---------------------------------------------------------------------------------- pickled weights


class Payload:
    """Unpickling this creates the directory ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def pickled(marker: Path, how: str) -> bytes:
    if how == "torch-save":
        import torch

        buffer = io.BytesIO()
        torch.save({"w": Payload(marker)}, buffer)
        return buffer.getvalue()
    return pickle.dumps({"w": Payload(marker)}, protocol=4 if how == "pickle-4" else 2)


@pytest.mark.parametrize(
    ("how", "suffix"),
    [
        ("pickle-4", ".safetensors"),
        ("pickle-2", ".safetensors"),
        ("torch-save", ".safetensors"),
        ("pickle-4", ".onnx"),
    ],
)
def test_pickled_weights_are_refused_and_never_run(
    token_server: TokenServer, tmp_path: Path, how: str, suffix: str
) -> None:
    # The payload is live: unpickling a twin of it here does create its marker.
    control = tmp_path / "control"
    blob = pickled(control, how)
    if how != "torch-save":
        pickle.loads(blob)
        assert control.exists()
    marker = tmp_path / "pwned"
    weights = tmp_path / f"weights{suffix}"
    weights.write_bytes(pickled(marker, how))
    name = f"pickled-{how}-{suffix[1:]}"
    model = renamed_model(tmp_path, "scale.py", "scale", name)

    with Client(token_server.url, TOKEN) as admin, pytest.raises(SmssError) as refused:
        admin.deploy(f"{model}:Scale", weights)

    assert "HTTP 400" in str(refused.value)
    assert "pickle" in str(refused.value).lower()
    assert name not in functions(token_server.url)
    with token_server.client() as anonymous:
        assert_error(anonymous.post(f"/v2/models/{name}/infer", json=json_infer_body({"x": X4})), 404)
    assert not marker.exists(), "the pickle was executed"


def test_pickle_named_pt_in_a_raw_deploy_is_refused(token_server: TokenServer, tmp_path: Path) -> None:
    """Past the client's own checks: the server looks at the bytes, whatever the file is called."""
    marker = tmp_path / "pwned"
    blob = pickled(marker, "pickle-4")
    sha = hashlib.sha256(blob).hexdigest()
    body = deploy_body("raw-pt")
    body["spec"].update(weights="weights.pt", weights_format="safetensors")
    body["weights_sha256"] = sha
    with token_server.client(TOKEN) as admin:
        assert admin.put(f"/v1/uploads/{sha}", content=blob).status_code == 201
        message = assert_error(admin.post("/v1/functions", json=body), 400)
    assert "pickle" in message
    assert "raw-pt" not in functions(token_server.url)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl", ".bin", ".ckpt"])
def test_pickle_suffix_refused_by_the_cli(token_server: TokenServer, tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / f"weights{suffix}"
    weights.write_bytes(pickled(marker, "pickle-4"))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    model = renamed_model(tmp_path, "scale.py", "scale", "pickled-by-suffix")

    done = smss_cli(
        "deploy", f"{model}:Scale", "--weights", str(weights), "--url", token_server.url, "--token", TOKEN
    )

    assert done.returncode != 0
    assert "pickle" in (done.stdout + done.stderr).lower()
    assert "Traceback" not in done.stdout + done.stderr
    assert not (token_server.data_dir / "uploads" / sha).exists(), "refused weights were uploaded"
    assert "pickled-by-suffix" not in functions(token_server.url)
    assert not marker.exists()


def test_truncated_safetensors_upload_is_refused_at_deploy(token_server: TokenServer, tmp_path: Path) -> None:
    weights = write_scale_weights(tmp_path / "w.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8])
    model = renamed_model(tmp_path, "scale.py", "scale", "scale-cut")
    with Client(token_server.url, TOKEN) as admin, pytest.raises(SmssError) as refused:
        admin.deploy(f"{model}:Scale", weights)
    assert "HTTP 400" in str(refused.value)
    assert "truncated" in str(refused.value)
    assert "scale-cut" not in functions(token_server.url)
