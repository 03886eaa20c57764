"""Cross-site requests on the default loopback bind (no token): a web page the user visits
must not deploy code (CSRF) nor talk to us under its own name (DNS rebinding).

Checked against the tokenless server: every refusal has a structured body and no effect;
stock clients (the smss client, httpx with JSON, tritonclient) are unaffected.
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
import tritonclient.http as tritonhttp
from security_helpers import ECHO, X4, Server, error_of, json_infer_body, run_body

from smss.packaging import package


def deploy_body(name: str) -> dict[str, Any]:
    pkg = package(f"{ECHO}:Echo", None)
    spec = msgspec.to_builtins(pkg.spec)
    spec["name"] = name
    return {"spec": spec, "source": pkg.source, "weights_sha256": None}


def functions(server: Server) -> set[str]:
    with server.http() as http:
        return {f["name"] for f in http.get("/v1/functions").json()["functions"]}


def runs_started(server: Server) -> int:
    with server.admin() as http:
        return int(http.get("/v1/log/stats").json()["runs_started"])


# What a cross-site form or a no-cors fetch() can send without the browser asking first.
SIMPLE_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]


@pytest.mark.parametrize("content_type", SIMPLE_TYPES, ids=str)
def test_deploy_needs_a_json_content_type(open_server: Server, content_type: str | None) -> None:
    body = msgspec.json.encode(deploy_body("csrf-deployed"))
    headers = {"Content-Type": content_type} if content_type else {}
    with open_server.http() as http:
        refused = error_of(http.post("/v1/functions", content=body, headers=headers), 415)
    assert refused["code"] == "unsupported_media_type"
    assert "application/json" in refused["error"]
    assert "csrf-deployed" not in functions(open_server)


def test_deploy_with_json_content_type_still_works(open_server: Server) -> None:
    body = msgspec.json.encode(deploy_body("json-deployed"))
    with open_server.http() as http:
        r = http.post(
            "/v1/functions", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
        )
        assert r.status_code == 201, r.text
        assert "json-deployed" in functions(open_server)
        assert http.delete("/v1/functions/json-deployed").status_code == 200


@pytest.mark.parametrize("content_type", SIMPLE_TYPES, ids=str)
def test_workflow_registration_and_runs_need_a_json_content_type(
    open_server: Server, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    spec = {"name": "csrf-flow", "stages": [{"name": "s", "function": "echo", "inputs": {"x": "request.x"}}]}
    before = runs_started(open_server)
    with open_server.http() as http:
        r = http.post("/v1/workflows", content=msgspec.json.encode(spec), headers=headers)
        assert error_of(r, 415)["code"] == "unsupported_media_type"
        assert http.get("/v1/workflows/csrf-flow").status_code == 404
        r = http.post(
            "/v1/workflows/echo-flow/runs", content=msgspec.json.encode(run_body()), headers=headers
        )
        assert error_of(r, 415)["code"] == "unsupported_media_type"
    assert runs_started(open_server) == before


def test_bodyless_admin_posts_refuse_form_types(open_server: Server) -> None:
    """Repository routes take no body: no Content-Type (what tritonclient sends) or JSON, never a form."""
    with open_server.http() as http:
        for path in ("/v2/repository/index", "/v2/repository/models/echo/unload"):
            r = http.post(path, content=b"a=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert error_of(r, 415)["code"] == "unsupported_media_type"
        assert http.post("/v2/repository/index").status_code == 200


FOREIGN_HOSTS = ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "127.0.0.1:1"]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_foreign_host_header_is_refused(open_server: Server, host: str) -> None:
    """DNS rebinding: the page's own name arrives in the Host header, on reads and writes."""
    host = host.format(port=open_server.port)
    with open_server.http(Host=host) as http:
        assert error_of(http.get("/v1/functions"), 421)["code"] == "misdirected_request"
        assert error_of(http.get("/v1/runs"), 421)["code"] == "misdirected_request"
        r = http.post("/v1/functions", json=deploy_body("rebound"))
        assert error_of(r, 421)["code"] == "misdirected_request"
        assert error_of(http.delete("/v1/functions/echo"), 421)["code"] == "misdirected_request"
    assert {"rebound"}.isdisjoint(functions(open_server))
    assert "echo" in functions(open_server)


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}", "localhost"]
)
def test_loopback_host_names_are_served(open_server: Server, host: str) -> None:
    with open_server.http(Host=host.format(port=open_server.port)) as http:
        assert http.get("/v1/functions").status_code == 200
        r = http.post("/v2/models/echo/infer", json=json_infer_body())
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "null", "http://localhost:1", "https://127.0.0.1.evil.example"]
)
def test_foreign_origin_cannot_change_state(open_server: Server, origin: str) -> None:
    before = runs_started(open_server)
    with open_server.http(Origin=origin) as http:
        r = http.post("/v1/functions", json=deploy_body("csrf-origin"))
        assert error_of(r, 403)["code"] == "cross_site_request"
        assert error_of(http.delete("/v1/functions/echo"), 403)["code"] == "cross_site_request"
        assert error_of(http.post("/v1/workflows/echo-flow/runs", json=run_body()), 403)["code"] == (
            "cross_site_request"
        )
        assert error_of(http.post("/v2/repository/models/echo/unload"), 403)["code"] == "cross_site_request"
        r = http.put("/v1/uploads/" + "0" * 64, content=b"x")
        assert error_of(r, 403)["code"] == "cross_site_request"
        # Reads answer (a browser keeps them from a foreign page: no CORS headers are sent).
        r = http.get("/v1/functions")
        assert r.status_code == 200
        assert "access-control-allow-origin" not in r.headers
    assert "csrf-origin" not in functions(open_server)
    assert "echo" in functions(open_server)
    assert runs_started(open_server) == before
    assert not (open_server.data_dir / "uploads" / ("0" * 64)).exists()


def test_same_origin_may_change_state(open_server: Server) -> None:
    with open_server.http(Origin=f"http://127.0.0.1:{open_server.port}") as http:
        r = http.post("/v1/workflows/echo-flow/runs", json=run_body())
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "completed"


def test_stock_clients_are_unaffected(open_server: Server) -> None:
    """tritonclient sends no Origin, binary tensors with Inference-Header-Content-Length, and
    bodyless repository POSTs without a Content-Type."""
    triton = tritonhttp.InferenceServerClient(open_server.url.removeprefix("http://"))
    try:
        tensor = tritonhttp.InferInput("x", list(X4.shape), "FP32")
        tensor.set_data_from_numpy(X4, binary_data=True)
        result = triton.infer(
            "echo", [tensor], outputs=[tritonhttp.InferRequestedOutput("y", binary_data=True)]
        )
        np.testing.assert_array_equal(result.as_numpy("y"), X4 * 2)
        assert any(m["name"] == "echo" for m in triton.get_model_repository_index())
        triton.load_model("echo")
    finally:
        triton.close()
    r = httpx.post(f"{open_server.url}/v2/models/echo/infer", json=json_infer_body(), timeout=60)
    assert r.status_code == 200, r.text
