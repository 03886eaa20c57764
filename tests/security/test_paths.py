"""Names and paths that would leave the data directory (RELIABILITY 27), against a real
``smss serve``: function and workflow names with ``..``, a slash, a NUL byte or a final
newline; symlinks planted in the data directory that point out of it, under a function's
name or an upload's. Each is refused with 400 and a stable code, and nothing is written
outside the data directory. (SMSS deploys take one source file and a content-addressed
weights upload: there is no archive whose entries could name paths.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from security_helpers import ECHO, Server, error_of

from smss.packaging import package
from smss.workflow.builder import Workflow

UNSAFE = ["../evil", "..", "a/b", "/abs", "a\x00b", "evil\n", "a\\b", ".hidden", "x" * 64]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def deploy_body(name: str) -> dict[str, Any]:
    pkg = package(f"{ECHO}:Echo", None)
    spec = msgspec.to_builtins(pkg.spec)
    spec["name"] = name
    return {"spec": spec, "source": pkg.source, "weights_sha256": None}


@pytest.mark.parametrize("name", UNSAFE, ids=[repr(n) for n in UNSAFE])
def test_unsafe_function_names_are_refused(open_server: Server, name: str) -> None:
    outside = open_server.data_dir.parent
    before = set(os.listdir(outside))
    functions_before = set(os.listdir(open_server.data_dir / "functions"))
    with open_server.http() as http:
        body = error_of(http.post("/v1/functions", json=deploy_body(name)), 400)
        assert body["code"] == "invalid_spec", body
        assert name.strip() not in http.get("/v1/functions").json()
    assert set(os.listdir(outside)) == before
    assert set(os.listdir(open_server.data_dir / "functions")) == functions_before


@pytest.mark.parametrize("name", UNSAFE, ids=[repr(n) for n in UNSAFE])
def test_unsafe_workflow_names_are_refused(open_server: Server, name: str) -> None:
    outside = open_server.data_dir.parent
    before = set(os.listdir(outside))
    spec = msgspec.to_builtins(
        Workflow("placeholder")
        .stage("double", "echo", inputs={"x": "request.x"})
        .output("y", "double.y")
        .spec()
    )
    spec["name"] = name
    with open_server.http() as http:
        body = error_of(http.post("/v1/workflows", json=spec), 400)
        assert body["code"] == "invalid_spec", body
        assert name not in [w["name"] for w in http.get("/v1/workflows").json()["workflows"]]
    assert set(os.listdir(outside)) == before


def test_a_symlink_under_a_functions_name_is_not_followed(open_server: Server, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = open_server.data_dir / "functions" / "planted"
    link.symlink_to(outside, target_is_directory=True)
    try:
        with open_server.http() as http:
            body = error_of(http.post("/v1/functions", json=deploy_body("planted")), 400)
            assert body["code"] == "unsafe_artifact", body
            assert str(outside) not in body["error"]
            # Deleting it neither follows the link nor empties what it points at.
            (outside / "keep").write_text("mine")
            http.delete("/v1/functions/planted")
    finally:
        link.unlink()
    assert tree(outside) == {"keep"}
    assert (outside / "keep").read_text() == "mine"


def test_a_symlink_under_an_uploads_name_is_not_written_through(open_server: Server, tmp_path: Path) -> None:
    content = b"weights the client sends"
    sha = hashlib.sha256(content).hexdigest()
    victim = tmp_path / "victim"
    victim.write_bytes(b"not to be overwritten")
    link = open_server.data_dir / "uploads" / sha
    link.symlink_to(victim)
    try:
        with open_server.http() as http:
            body = error_of(http.put(f"/v1/uploads/{sha}", content=content), 400)
            assert body["code"] == "unsafe_artifact", body
            # A deploy naming it does not read what it points at either.
            deploy = deploy_body("linked")
            deploy["weights_sha256"] = sha
            deploy["spec"]["weights"] = "weights.safetensors"
            deploy["spec"]["weights_format"] = "safetensors"
            error_of(http.post("/v1/functions", json=deploy), 400)
    finally:
        link.unlink()
    assert victim.read_bytes() == b"not to be overwritten"
    assert not (open_server.data_dir / "functions" / "linked").exists()
    assert [p.name for p in (open_server.data_dir / "uploads").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("sha", ["0" * 64 + "%0A", "0" * 63, "../" + "0" * 61, "0" * 64 + "%00"])
def test_malformed_upload_names_are_refused(open_server: Server, sha: str) -> None:
    with open_server.http() as http:
        r = http.put(f"/v1/uploads/{sha}", content=b"x")
    assert r.status_code in (400, 404), r.text
    error_of(r, r.status_code)
    assert [p.name for p in (open_server.data_dir / "uploads").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("path", ["a%00b", "..%2F..%2Fetc", "%2e%2e", "evil%0A"])
def test_unsafe_names_in_urls_are_refused(open_server: Server, path: str) -> None:
    with open_server.http() as http:
        for r in (
            http.post(f"/v2/models/{path}/infer", json={"inputs": []}),
            http.get(f"/v1/functions/{path}"),
            http.post(f"/v1/workflows/{path}/runs", json={"inputs": []}),
        ):
            assert r.status_code in (400, 404), (r.status_code, r.text)
            error_of(r, r.status_code)
