"""Instances and deployments over time: scale from and to zero, a killed instance, a model
that cannot load, and a restart of the platform on the same data directory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from e2e_helpers import (
    MODELS,
    REQUEST_TIMEOUT_S,
    SCALE_W,
    assert_error,
    assert_gone,
    functions,
    instance_pids,
    json_infer_body,
    output_of,
    pid_alive,
    renamed_model,
    seed_demo,
    smss_cli,
    start,
    stop_checked,
    wait_until,
    write_scale_weights,
)

from smss.client import Client
from smss.testing.server import ServerProcess

X = np.random.default_rng(5).standard_normal((2, 64), dtype=np.float32)
X4 = np.array([[1.0, -2.0, 3.5, 0.25]], dtype=np.float32)


@pytest.fixture
def own_demo_server(tmp_path: Path, demo_weights: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``smss serve --demo ARGS...`` of the test's own (stopped at teardown)."""
    servers: list[ServerProcess] = []

    def start_demo(*args: str) -> ServerProcess:
        servers.append(start(seed_demo(demo_weights, tmp_path / f"data{len(servers)}"), ["--demo", *args]))
        return servers[-1]

    yield start_demo
    for server in servers:
        server.stop()


def infer_mlp(client: httpx.Client, reference: dict[str, Any]) -> None:
    got = output_of(client.post("/v2/models/mlp/infer", json=json_infer_body({"x": X})), "y")
    np.testing.assert_allclose(got, reference["mlp"](X), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- scale to zero


def test_scale_from_zero_and_back_to_zero(
    own_demo_server: Callable[..., ServerProcess], reference: dict[str, Any]
) -> None:
    server = own_demo_server("--keep-alive", "1")
    url = server.url
    before = functions(url)["mlp"]
    assert before["instances"] == []
    assert before["cold_starts"] == 0

    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        # At zero instances the request waits for a start instead of failing, and its
        # answer says it was a cold start; the next, on the running instance, was not.
        first = client.post("/v2/models/mlp/infer", json=json_infer_body({"x": X}))
        np.testing.assert_allclose(output_of(first, "y"), reference["mlp"](X), rtol=1e-5, atol=1e-5)
        assert first.headers["SMSS-Cold-Start"] == "1"
        second = client.post("/v2/models/mlp/infer", json=json_infer_body({"x": X}))
        assert second.status_code == 200
        assert second.headers["SMSS-Cold-Start"] == "0"
        # The start is metered by the tier it began from: the first start of the
        # torch runtime had to start its zygote too.
        metrics = client.get("/metrics").text
        assert 'smss_start_seconds_count{function="mlp",tier="no_runtime"} 1.0' in metrics
        # Keep it busy while looking, so the 1 s keep-alive cannot stop it under our feet.
        stop = threading.Event()
        failures: list[str] = []

        def keep_busy() -> None:
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as busy:
                while not stop.is_set():
                    r = busy.post("/v2/models/mlp/infer", json=json_infer_body({"x": X}))
                    if r.status_code != 200:
                        failures.append(r.text)

        busy = threading.Thread(target=keep_busy)
        busy.start()
        try:
            pids = wait_until(lambda: instance_pids(url, "mlp"), 30, "the instance to be listed")
            assert len(pids) == 1
            assert functions(url)["mlp"]["cold_starts"] == 1
        finally:
            stop.set()
            busy.join(REQUEST_TIMEOUT_S)
        assert not busy.is_alive()
        assert failures == []
        (pid,) = pids
        assert pid_alive(pid)

        # Idle for longer than the keep-alive: back to zero, and the worker process is gone.
        wait_until(lambda: functions(url)["mlp"]["instances"] == [], 60, "mlp to scale to zero")
        assert_gone([pid])

        # And from zero again, for a burst of 200 requests at once: they wait for the start
        # (the queue holds 256) and are all served by a bounded number of new instances.
        responses = asyncio.run(burst(url, 200, X))
        assert [r.status_code for r in responses if r.status_code != 200] == []
        want = reference["mlp"](X)
        for r in responses:
            np.testing.assert_allclose(output_of(r, "y"), want, rtol=1e-5, atol=1e-5)
        after = functions(url)["mlp"]
        assert 2 <= after["cold_starts"] <= 1 + after["spec"]["scaling"]["max_instances"]
        # Each new instance took at most its concurrency of the waiting requests.
        cold = sum(r.headers["SMSS-Cold-Start"] == "1" for r in responses)
        concurrency = after["spec"]["scaling"]["concurrency"]
        assert 1 <= cold <= (after["cold_starts"] - 1) * concurrency
    stop_checked(server)


async def burst(url: str, n: int, x: np.ndarray) -> list[httpx.Response]:
    """``n`` requests for mlp sent at once, each on its own connection."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    body = json_infer_body({"x": x})
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v2/models/mlp/infer", json=body) for _ in range(n)))


# ---------------------------------------------------------------------------------- kill -9


@dataclass
class Outcome:
    status: int
    retry_after: str | None
    correct: bool
    after_kill: bool
    body: str


@dataclass
class Hammer:
    """Client threads that call mlp until stopped, recording every outcome."""

    url: str
    reference: dict[str, Any]
    threads: int = 6
    killed: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        want = self.reference["mlp"](X)
        for k in range(self.threads):
            t = threading.Thread(target=self._run, args=(want,), name=f"hammer-{k}")
            t.start()
            self._workers.append(t)

    def _run(self, want: np.ndarray) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
                while not self.stop.is_set():
                    after_kill = self.killed.is_set()
                    r = client.post("/v2/models/mlp/infer", json=json_infer_body({"x": X}))
                    correct = r.status_code == 200 and bool(
                        np.allclose(output_of(r, "y"), want, rtol=1e-5, atol=1e-5)
                    )
                    body = "" if r.status_code == 200 else r.text[:300]
                    self.outcomes.append(
                        Outcome(r.status_code, r.headers.get("retry-after"), correct, after_kill, body)
                    )
        except Exception as e:  # a timeout here is a hung request
            self.errors.append(f"{type(e).__name__}: {e}")

    def join(self) -> list[str]:
        self.stop.set()
        for t in self._workers:
            t.join(REQUEST_TIMEOUT_S + 10)
        return [t.name for t in self._workers if t.is_alive()]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_instance_killed_under_load(
    own_demo_server: Callable[..., ServerProcess], reference: dict[str, Any], sig: signal.Signals
) -> None:
    """kill -9 (or SIGTERM) of an instance while clients hammer it: every request completes
    with 200 or 503 + Retry-After, none hangs, and the function serves again."""
    server = own_demo_server("--keep-alive", "300")
    url = server.url
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        infer_mlp(client, reference)
    (victim,) = instance_pids(url, "mlp")
    hammer = Hammer(url, reference)
    hammer.start()
    try:
        wait_until(lambda: len(hammer.outcomes) >= 30, 60, "load to build up")
        hammer.killed.set()
        os.kill(victim, sig)
        assert_gone([victim])
        # The function serves again: a fresh instance, and requests sent after the kill succeed.
        wait_until(
            lambda: sum(o.after_kill and o.status == 200 for o in hammer.outcomes) >= 3 * hammer.threads,
            60,
            "requests after the kill to succeed",
        )
    finally:
        hung = hammer.join()
    assert hung == [], "client threads hung"
    assert hammer.errors == []
    bad = [o for o in hammer.outcomes if o.status not in (200, 503)]
    assert bad == [], f"{bad[:5]}\n{server.log()[-3000:]}"
    assert all(o.correct for o in hammer.outcomes if o.status == 200)
    assert all(o.retry_after and int(o.retry_after) >= 1 for o in hammer.outcomes if o.status == 503)
    pids = instance_pids(url, "mlp")
    assert pids
    assert victim not in pids
    assert functions(url)["mlp"]["cold_starts"] >= 2  # the lost instance was replaced
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        infer_mlp(client, reference)
    stop_checked(server)


# ---------------------------------------------------------------------------------- failed loads


def deploy_failing(kind: str, tmp_path: Path, client: Client, data_dir: Path) -> str:
    """Deploy a model that cannot start; return its name."""
    if kind == "load-raises":
        client.deploy(f"{MODELS / 'broken.py'}:Broken")
        return "broken"
    name = "scale-truncated"
    result = client.deploy(
        f"{renamed_model(tmp_path, 'scale.py', 'scale', name)}:Scale",
        write_scale_weights(tmp_path / "w.safetensors"),
    )
    # Cut the weights file after the deploy accepted it (a disk fault, not a bad upload).
    weights = data_dir / "functions" / name / f"g{result['generation']}" / "weights.safetensors"
    os.truncate(weights, weights.stat().st_size - 8)
    return name


FAILING = ["load-raises", "weights-truncated-on-disk"]


@pytest.mark.parametrize("kind", FAILING)
def test_model_that_fails_to_load(
    demo_server: ServerProcess, tmp_path: Path, reference: dict[str, Any], kind: str
) -> None:
    url, data = demo_server.url, demo_server.data_dir
    with Client(url) as admin, httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        name = deploy_failing(kind, tmp_path, admin, data)
        try:
            for _ in range(3):
                # 503 with Retry-After and a clean body, whether a start is tried or the back-off runs.
                r = client.post(f"/v2/models/{name}/infer", json=json_infer_body({"x": X4}))
                assert_error(r, 503, data_dir=data)
                # Other models are unaffected.
                infer_mlp(client, reference)
            status = functions(url)[name]
            assert status["instances"] == []
            assert status["last_error"], status
            if kind == "load-raises":
                assert "deliberate failure in load()" in status["last_error"]
        finally:
            admin.delete(name)
    assert name not in functions(url)


@pytest.mark.parametrize("kind", FAILING)
def test_load_failure_503_names_the_model(demo_server: ServerProcess, tmp_path: Path, kind: str) -> None:
    url, data = demo_server.url, demo_server.data_dir
    with Client(url) as admin, httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        name = deploy_failing(kind, tmp_path, admin, data)
        try:
            r = client.post(f"/v2/models/{name}/infer", json=json_infer_body({"x": X4}))
            message = assert_error(r, 503, data_dir=data)
        finally:
            admin.delete(name)
    assert name in message


def test_load_error_body_does_not_leak_server_paths(
    demo_server: ServerProcess, reference: dict[str, Any]
) -> None:
    url, data = demo_server.url, demo_server.data_dir
    with Client(url) as admin, httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        admin.deploy(f"{MODELS / 'broken.py'}:NeedsFile")
        try:
            r = client.post("/v2/models/needs-file/infer", json=json_infer_body({"x": X4}))
            assert r.status_code == 503, r.text
            assert str(data.resolve()) not in r.text
            assert "/functions/" not in r.text
        finally:
            admin.delete("needs-file")


def test_model_that_failed_to_load_stays_unready(demo_server: ServerProcess) -> None:
    url = demo_server.url
    with Client(url) as admin, httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        admin.deploy(f"{MODELS / 'broken.py'}:Broken")
        try:
            r = client.post("/v2/models/broken/infer", json=json_infer_body({"x": X4}))
            assert_error(r, 503)
            # Watch readiness for twice the back-off the server asked clients to wait.
            watch_until = time.monotonic() + 2 * int(r.headers["retry-after"])
            while time.monotonic() < watch_until:
                ready = client.get("/v2/models/broken/ready")
                assert ready.json()["ready"] is False
                assert ready.status_code == 503
                time.sleep(0.1)
        finally:
            admin.delete("broken")


# ---------------------------------------------------------------------------------- restart


def cli_functions(url: str) -> dict[str, dict[str, Any]]:
    done = smss_cli("functions", "--json", "--url", url)
    assert done.returncode == 0, done.stderr
    return {f["name"]: f for f in json.loads(done.stdout)}


def check_custom_models(url: str) -> None:
    with Client(url) as client:
        echo = client.infer("echo", {"x": X4})["y"]
        np.testing.assert_array_equal(echo, X4 * 2)
        scaled = client.infer("scale", {"x": X4})["y"]
        np.testing.assert_array_equal(scaled, X4 * SCALE_W)


def test_restart_keeps_the_registry(tmp_path: Path, demo_weights: Path, reference: dict[str, Any]) -> None:
    data = seed_demo(demo_weights, tmp_path / "data")
    first = start(data, ["--demo", "--keep-alive", "300"])
    try:
        demo = set(cli_functions(first.url))
        assert {"mlp", "cnn", "mlp_onnx"} <= demo
        deployed = smss_cli("deploy", f"{MODELS / 'echo.py'}:Echo", "--url", first.url, "--json")
        assert deployed.returncode == 0, deployed.stderr
        assert json.loads(deployed.stdout) == {"name": "echo", "version": "1", "generation": 1}
        with Client(first.url) as client:
            result = client.deploy(
                f"{MODELS / 'scale.py'}:Scale", write_scale_weights(tmp_path / "w.safetensors")
            )
        assert result["generation"] == 1
        check_custom_models(first.url)

        deleted = smss_cli("delete", "cnn", "--url", first.url)
        assert deleted.returncode == 0, deleted.stderr
        assert_error(httpx.get(f"{first.url}/v2/models/cnn", timeout=REQUEST_TIMEOUT_S), 404)
        expected = demo - {"cnn"} | {"echo", "scale"}
        assert set(cli_functions(first.url)) == expected
        # Deleting it again is a clean error, not a crash.
        again = smss_cli("delete", "cnn", "--url", first.url)
        assert again.returncode != 0
        assert "Traceback" not in again.stdout + again.stderr
        stop_checked(first)
    finally:
        first.stop()

    second = start(data, ["--keep-alive", "300"])  # no --demo: everything comes from the registry
    try:
        listed = cli_functions(second.url)
        assert set(listed) == expected
        assert listed["echo"]["generation"] == 1
        assert listed["scale"]["spec"]["weights_format"] == "safetensors"
        check_custom_models(second.url)
        with httpx.Client(base_url=second.url, timeout=REQUEST_TIMEOUT_S) as client:
            infer_mlp(client, reference)
            assert_error(client.post("/v2/models/cnn/infer", json=json_infer_body({"x": X})), 404)
        # Redeploying bumps the generation; the new one serves.
        redeployed = smss_cli("deploy", f"{MODELS / 'echo.py'}:Echo", "--url", second.url, "--json")
        assert redeployed.returncode == 0, redeployed.stderr
        assert json.loads(redeployed.stdout)["generation"] == 2
        check_custom_models(second.url)
        stop_checked(second)
    finally:
        second.stop()
