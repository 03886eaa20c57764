"""A live ``smss serve --cpus 1 --memory 2GiB`` reports its capped CPU device through
``smss devices --json``, ``smss status``, ``GET /v1/devices`` and ``/metrics``; caps it
cannot honour and an unreachable platform are clear errors, without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smss.testing.server import ServerProcess, free_port, running_server

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smss.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args: Sequence[str] = ["--cpus", "1", "--memory", "2GiB", "--no-spares", "--log-level", "warning"]
    with running_server(tmp_path_factory.mktemp("devices") / "data", args) as s:
        yield s


def test_devices_json_reports_the_capped_cpu(server: ServerProcess) -> None:
    done = _cli("devices", "--json", "--url", server.url)
    assert done.returncode == 0, done.stderr
    devices = json.loads(done.stdout)
    cpu = next(d for d in devices if d["kind"] == "cpu")
    assert (cpu["node"], cpu["index"]) == ("local", 0)
    assert cpu["capacity"] == {"cpu": 1.0, "memory_mb": 2048, "gpu": 0.0, "gpu_memory_mb": 0}
    assert cpu["total"] == cpu["capacity"]
    assert cpu["reserved"] == {"cpu": 0.0, "memory_mb": 0, "gpu": 0.0, "gpu_memory_mb": 0}
    assert cpu["allocated"] == {"cpu": 0.0, "memory_mb": 0, "gpu": 0.0, "gpu_memory_mb": 0}
    assert cpu["placed"] == []
    assert {"name", "free_memory_mb"} <= set(cpu)
    for gpu in (d for d in devices if d["kind"] == "cuda"):  # where the machine has any
        assert gpu["capacity"]["gpu"] == 1.0
        assert gpu["capacity"]["gpu_memory_mb"] > 0
    assert httpx.get(f"{server.url}/v1/devices", timeout=10).json() == {"devices": devices}


def test_devices_and_status_tables(server: ServerProcess) -> None:
    table = _cli("devices", "--url", server.url)
    assert table.returncode == 0, table.stderr
    assert "cpu:0" in table.stdout
    status = _cli("status", "--url", server.url)
    assert status.returncode == 0, status.stderr
    assert "weight store" in status.stdout
    assert "devices" in status.stdout
    assert "cpu:0" in status.stdout


def test_metrics_show_device_capacity(server: ServerProcess) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples = {
        (s.name, s.labels["kind"], s.labels["index"], s.labels["resource"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("smss_device_")
        for s in family.samples
    }
    assert samples[("smss_device_capacity", "cpu", "0", "cpu")] == 1.0
    assert samples[("smss_device_capacity", "cpu", "0", "memory_mb")] == 2048.0
    assert samples[("smss_device_allocated", "cpu", "0", "memory_mb")] == 0.0
    assert ("smss_device_capacity", "cpu", "0", "gpu") not in samples


def test_an_unreachable_platform_is_one_line_on_stderr() -> None:
    done = _cli("devices", "--json", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "cannot reach the platform at http://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpus", "100000"], "--cpus 100000 is more than this machine has"),
        (["--cpus", "0"], "--cpus must be a positive number of cores"),
        (["--memory", "1P"], "invalid size '1P'"),
        (["--memory", "1K"], "--memory must be at least 1 MiB"),
        (["--memory", "1000000G"], "--memory 1024000000 MiB is more than this machine has"),
    ],
)
def test_serve_refuses_caps_it_cannot_honour(tmp_path: Path, args: list[str], message: str) -> None:
    done = _cli("serve", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"), *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr.replace("\n", " "), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created
