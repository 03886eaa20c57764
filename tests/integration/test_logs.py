"""Where logs live and how to read them: ``smss serve`` writes ``DATA/logs/platform.log``
(text or JSON lines with the request, function, instance and run ids), takes its
settings from ``--config FILE.toml`` (a flag given wins), and ``smss logs`` reads a
function's, an instance's or the platform's log, following it with ``--follow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from smss.cli import logs
from smss.client import Client
from smss.testing.server import running_server, wait_until

pytestmark = pytest.mark.slow

MODELS = Path(__file__).parent.parent / "e2e" / "models"
ENV = {"SMSS_URL": "", "SMSS_TOKEN": "", "SMSS_KEEP_ALIVE_S": ""}


def test_sources_tail_and_follow(tmp_path: Path) -> None:
    (tmp_path / "platform.log").write_text("a started\nmlp-1 forked\nmlp_onnx-2 forked\n")
    (tmp_path / "zygote-torch.log").write_text("mlp printed this\n")
    (tmp_path / "exec-1.log").write_text("its own file\n")
    paths, pattern = logs.sources(tmp_path, "mlp")
    assert logs.tail(paths, pattern, 10) == ["mlp-1 forked", "mlp printed this"]  # not mlp_onnx's
    paths, pattern = logs.sources(tmp_path, "platform")
    assert logs.tail(paths, pattern, 2) == ["mlp-1 forked", "mlp_onnx-2 forked"]
    assert logs.tail(*logs.sources(tmp_path, "exec-1"), 10) == ["its own file"]

    paths, pattern = logs.sources(tmp_path, "mlp")
    stop = threading.Event()
    got: list[str] = []

    def reader() -> None:
        got.extend(logs.follow(paths, pattern, stop.is_set))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        time.sleep(logs.POLL_S * 2)  # the reader has taken the files' sizes
        with (tmp_path / "platform.log").open("a") as f:
            f.write("cnn-1 forked\nmlp-3 forked\nmlp-4 half")
        wait_until(lambda: got, 10, "the new line")
        (tmp_path / "platform.log").write_text("mlp-5 after rotation\n")  # shorter: rotated
        wait_until(lambda: len(got) >= 2, 10, "the rotated file's line")
    finally:
        stop.set()
        thread.join()
    assert got == ["mlp-3 forked", "mlp-5 after rotation"]


def test_serve_config_json_logs_and_smss_logs(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    # The test kit passes --port and --data-dir: those flags win over the file's values.
    config.write_text('[serve]\nport = 1\nlog-format = "json"\nlog_level = "info"\nmax-body = "1KiB"\n')
    data = tmp_path / "data"
    with running_server(data, ["--config", str(config)], env=ENV) as server:
        with Client(server.url) as client:
            client.deploy(f"{MODELS / 'echo.py'}:Echo")
            client.deploy(f"{MODELS / 'picky.py'}:Picky")
        server.wait_for_model("echo")
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        r = httpx.post(f"{server.url}/v2/models/echo/infer", json=body, headers={"x-request-id": "req-42"})
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "req-42"
        big = httpx.post(f"{server.url}/v2/models/echo/infer", content=b"x" * 2048)
        assert big.status_code == 413  # max-body from the file
        assert httpx.get(f"{server.url}/v2/health/live").headers["x-request-id"]

        platform_log = data / "logs" / "platform.log"
        records = [json.loads(line) for line in platform_log.read_text().splitlines()]
        assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
        about_echo = [r for r in records if r.get("function") == "echo"]
        assert about_echo, records[-5:]
        # A model error is logged under the request's own id, which its answer names.
        refused = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [-1, 0, 0, 0]}]}
        r = httpx.post(
            f"{server.url}/v2/models/picky/infer", json=refused, headers={"x-request-id": "req-43"}
        )
        assert r.status_code == 500
        assert r.json()["request_id"] == "req-43"
        records = [json.loads(line) for line in platform_log.read_text().splitlines()]
        error = [r for r in records if r.get("request") == "req-43" and r["level"] == "warning"]
        assert error, records[-5:]
        assert error[0]["function"] == "picky"
        assert "picky refuses negative input" in error[0]["message"]

        proc = subprocess.run(
            [sys.executable, "-m", "smss.cli", "logs", "echo", "--data-dir", str(data), "-n", "50"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **ENV},
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert "echo-" in proc.stdout
        assert all("echo" in line for line in proc.stdout.splitlines())
    missing = subprocess.run(
        [sys.executable, "-m", "smss.cli", "logs", "platform", "--data-dir", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: no logs at")
