"""The ``smss`` command against a real server: its version, input from an argument, a
file and stdin, the token, and how it fails: one line on stderr, a non-zero exit
code, no traceback, and nothing on stdout (so ``--json | jq`` reads only answers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from smss import __version__
from smss.client import Client
from smss.testing.server import ServerProcess, free_port, start_server

pytestmark = pytest.mark.slow

TOKEN = "cli-test-token-0123456789abcdef"
ECHO = Path(__file__).parent.parent / "e2e" / "models" / "echo.py"
ENV = {**os.environ, "SMSS_URL": "", "SMSS_TOKEN": "", "SMSS_KEEP_ALIVE_S": ""}


def smss(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smss.cli", *args],
        input=stdin.decode() if stdin is not None else None,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env={**ENV, **(env or {})},
        check=False,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert proc.returncode != 0, proc
    assert proc.stdout == "", proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("cli"), ["--token", TOKEN], env=ENV)
    try:
        with Client(server.url, TOKEN) as client:
            client.deploy(f"{ECHO}:Echo")
        server.wait_for_model("echo")
        yield server
    finally:
        server.stop()


def test_version_and_completion() -> None:
    proc = smss("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"smss {__version__}"
    helped = smss("--help")
    assert "--install-completion" in helped.stdout
    assert "--show-completion" in helped.stdout


def test_an_unreachable_platform_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    one_error_line(smss("functions", "--url", url, "--json"), "cannot reach the platform", url)


def test_invoke_from_an_argument_a_file_and_stdin(server: ServerProcess, tmp_path: Path) -> None:
    expected = {"y": [[2.0, 4.0, 6.0, 8.0]]}
    arg = smss("invoke", "echo", '{"x": [[1, 2, 3, 4]]}', "--url", server.url, "--json")
    assert arg.returncode == 0, arg.stderr
    assert json.loads(arg.stdout) == expected
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    (tmp_path / "in.json").write_text(json.dumps(request))
    from_file = smss("invoke", "echo", "--file", str(tmp_path / "in.json"), "--url", server.url, "--json")
    assert json.loads(from_file.stdout) == expected
    from_stdin = smss(
        "invoke", "echo", "-", "--url", server.url, "--json", stdin=json.dumps(request).encode()
    )
    assert json.loads(from_stdin.stdout) == expected
    np.savez(tmp_path / "in.npz", x=np.ones((3, 4), np.float32))
    out = tmp_path / "out.npz"
    binary = smss("invoke", "echo", "-f", str(tmp_path / "in.npz"), "--out", str(out), "--url", server.url)
    assert binary.returncode == 0, binary.stderr
    with np.load(out) as answer:
        assert np.array_equal(answer["y"], np.full((3, 4), 2, np.float32))


def test_failures_go_to_stderr_with_the_servers_message(server: ServerProcess, tmp_path: Path) -> None:
    url = server.url
    one_error_line(smss("invoke", "nope", "{}", "--url", url, "--json"), "404", "unknown model 'nope'")
    one_error_line(smss("invoke", "echo", "{bad", "--url", url, "--json"), "not JSON")
    one_error_line(smss("invoke", "echo", '{"x": [[1, 2]]}', "--url", url, "--json"), "400", "shape")
    one_error_line(smss("invoke", "echo", "--url", url), "not JSON")  # stdin empty, not a terminal
    # Deleting needs the token: without it 401, with a wrong one 403; both from the server.
    one_error_line(smss("delete", "echo", "--url", url), "401", "admin token")
    one_error_line(smss("delete", "echo", "--url", url, "--token", "wrong"), "403")
    one_error_line(smss("runs", "list", "--url", url, "--json", env={"SMSS_TOKEN": "wrong"}), "403")


def test_the_token_from_the_flag_or_the_environment(server: ServerProcess) -> None:
    listed = smss("runs", "list", "--url", server.url, "--json", "--token", TOKEN)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    from_env = smss("runs", "list", "--json", env={"SMSS_TOKEN": TOKEN, "SMSS_URL": server.url})
    assert from_env.returncode == 0, from_env.stderr


def test_runs_start_and_delete_a_workflow(server: ServerProcess, tmp_path: Path) -> None:
    spec = tmp_path / "twice.yaml"
    spec.write_text(
        "name: twice\nstages:\n  - name: a\n    function: echo\n    inputs: {x: request.x}\n"
        "outputs: {y: a.y}\n"
    )
    deployed = smss("deploy", str(spec), "--url", server.url, "--token", TOKEN)
    assert deployed.returncode == 0, deployed.stderr
    started = smss("runs", "start", "twice", "--random", "--session", "s1", "--url", server.url, "--json")
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["status"] == "completed"
    (tmp_path / "in.json").write_text('{"x": [[1, 1, 1, 1]]}')
    with_file = smss(
        "runs", "start", "twice", "--inputs", str(tmp_path / "in.json"), "--url", server.url, "--json"
    )
    assert json.loads(with_file.stdout)["outputs"]["y"]["data"] == [2, 2, 2, 2]
    one_error_line(smss("runs", "start", "twice", "--url", server.url), "--inputs FILE, or --random")
    deleted = smss("delete", "twice", "--url", server.url, "--token", TOKEN)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted workflow twice" in deleted.stdout
    one_error_line(smss("delete", "twice", "--url", server.url, "--token", TOKEN), "404")
