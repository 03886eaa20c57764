"""``smss serve`` killed and restarted, and stopped by SIGTERM, as real processes.

* SIGKILL with requests in flight: the instances outlive the server (for its adoption window),
  and a new ``smss serve`` on the same data directory adopts them into routing: the
  same pids serve, nothing more starts, and a clean stop leaves no process behind.
* Instances of a function no longer deployed are stopped by the restarted server.
* No server comes back: the instances end when the adoption window does.
* SIGTERM with requests in flight: no new connections, every request in flight
  answers 200, the server exits 0 and takes every process with it.

The node's processes (zygote, templates, spares, instances) are found by their
command line, which names the run directory (``<data>/node.json``); none of them is
a child of this test, so each test checks for leftovers itself.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from smss.client import Client
from smss.store.sqlite import SqliteRegistry
from smss.testing.server import ServerProcess, start_server, wait_until

pytestmark = pytest.mark.slow

MODEL = Path(__file__).parent / "models" / "sleeper.py"
WEIGHTED = Path(__file__).parent / "models" / "weighted.py"
X2 = np.array([1.0, 2.0], dtype=np.float32)
#: Settings come from flags only, never from the developer's shell.
ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}
ARGS = ["--keep-alive", "300", "--adopt-window", "120"]
#: Bound on anything expected to happen (a start, an adoption, processes exiting).
WAIT_S = 60.0
REQUEST_TIMEOUT_S = 60.0


# ------------------------------------------------------------------ helpers


def run_dir_of(data_dir: Path) -> Path:
    return Path(json.loads((data_dir / "node.json").read_bytes())["run_dir"])


def node_processes(run_dir: Path) -> set[int]:
    """Live processes whose command line names ``run_dir``: the node's zygotes and
    every fork of them (templates, spares, instances)."""
    needle = str(run_dir).encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if needle in cmdline and stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X"):
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def status(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/functions/sleeper", timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def instance_pids(url: str) -> set[int]:
    return {i["pid"] for i in status(url)["instances"]}


def infer(url: str, sleep_s: float) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [sleep_s, 1.0]}]}
    return httpx.post(f"{url}/v2/models/sleeper/infer", json=body, timeout=REQUEST_TIMEOUT_S)


def answer_of(r: httpx.Response) -> list[float]:
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    return [float(v) for v in out["data"]]


@dataclass
class Load:
    """``n`` requests at once on threads, each sleeping ``sleep_s`` in predict."""

    url: str
    n: int
    sleep_s: float
    responses: list[httpx.Response | BaseException] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for _ in range(self.n):
            t = threading.Thread(target=self._one)
            t.start()
            self._threads.append(t)
        return self

    def _one(self) -> None:
        try:
            self.responses.append(infer(self.url, self.sleep_s))
        except BaseException as e:
            self.responses.append(e)

    def __exit__(self, *exc: object) -> None:
        self.join()

    def join(self) -> list[httpx.Response | BaseException]:
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a request hung"
        return self.responses


def serve(data_dir: Path, *args: str) -> ServerProcess:
    return start_server(data_dir, [*ARGS, *args], env=ENV)


def with_two_instances(server: ServerProcess) -> set[int]:
    """Deploy the model and load it until its two instances serve; their pids."""
    with Client(server.url) as client:
        client.deploy(f"{MODEL}:Sleeper")
    with Load(server.url, 4, 1.0) as load:
        wait_until(lambda: len(instance_pids(server.url)) == 2, WAIT_S, "two instances to serve")
    assert all(answer_of(r) == [2.0, 2.0] for r in load.responses if isinstance(r, httpx.Response))
    assert len(load.responses) == 4
    return instance_pids(server.url)


def kill9(server: ServerProcess) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)


def stop_cleanly(server: ServerProcess, run_dir: Path) -> None:
    """SIGTERM: exit status 0, and nothing of the node is left."""
    code = server.stop()
    assert code == 0, f"smss serve exited with {code}:\n{server.log()[-4000:]}"
    wait_until(lambda: not node_processes(run_dir), WAIT_S, "the node's processes to exit")
    assert not run_dir.exists(), sorted(os.listdir(run_dir))
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"{run_dir.name}-")] == []


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Every server a test starts; the ones still running are stopped, and their
    node's processes killed, whatever the test's outcome."""
    started: list[ServerProcess] = []
    yield started
    run_dirs = set()
    for server in started:
        if (server.data_dir / "node.json").exists():
            run_dirs.add(run_dir_of(server.data_dir))
        server.stop()
    for run_dir in run_dirs:
        for pid in node_processes(run_dir):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ restart


def test_a_restarted_server_adopts_the_running_instances(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data = tmp_path / "data"
    first = serve(data)
    servers.append(first)
    pids = with_two_instances(first)
    run_dir = run_dir_of(data)
    family = node_processes(run_dir)
    assert pids <= family

    # Killed under load: both instances hold a request (its client loses it with the server).
    with Load(first.url, 2, 2.0) as cut_off:
        wait_until(
            lambda: sum(i["in_flight"] for i in status(first.url)["instances"]) == 2,
            WAIT_S,
            "both requests to be in flight",
        )
        kill9(first)
    assert all(isinstance(r, httpx.TransportError) for r in cut_off.responses), cut_off.responses
    assert all(alive(p) for p in family), "the node's processes died with the server"

    second = serve(data)
    servers.append(second)
    assert run_dir_of(data) == run_dir
    wait_until(lambda: instance_pids(second.url) == pids, WAIT_S, "the instances to be adopted")
    st = status(second.url)
    assert st["cold_starts"] == 0, st  # nothing was started beside them
    assert st["state"] == "ready"

    # They serve, and load starts nothing more than max_instances (2) allows.
    with Load(second.url, 6, 0.5) as load:
        pass
    assert len(load.responses) == 6
    assert all(answer_of(r) == [1.0, 2.0] for r in load.responses if isinstance(r, httpx.Response))
    assert instance_pids(second.url) == pids
    assert status(second.url)["cold_starts"] == 0
    # The same zygote, template and instances serve still (a template may have forked a new spare).
    assert all(alive(p) for p in family)

    stop_cleanly(second, run_dir)
    assert not any(alive(p) for p in family)


def test_instances_of_a_function_no_longer_deployed_are_stopped(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data = tmp_path / "data"
    first = serve(data)
    servers.append(first)
    pids = with_two_instances(first)
    run_dir = run_dir_of(data)
    kill9(first)
    assert all(alive(p) for p in pids)
    registry = SqliteRegistry(data / "registry.db")  # deleted while no server ran
    assert registry.delete_function("sleeper")
    registry.close()

    second = serve(data)
    servers.append(second)
    wait_until(lambda: not any(alive(p) for p in pids), WAIT_S, "the stale instances to be stopped")
    with Client(second.url) as client:
        assert [f["name"] for f in client.functions()] == []
    stop_cleanly(second, run_dir)


def test_without_a_restart_the_instances_end_with_the_adoption_window(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    data = tmp_path / "data"
    first = serve(data, "--adopt-window", "2")
    servers.append(first)
    pids = with_two_instances(first)
    run_dir = run_dir_of(data)
    family = node_processes(run_dir)
    kill9(first)
    wait_until(lambda: not node_processes(run_dir), WAIT_S, "the unadopted processes to exit")
    assert not any(alive(p) for p in family | pids)
    # The next server on this data directory starts afresh, and cleans what was left.
    second = serve(data)
    servers.append(second)
    assert run_dir_of(data) != run_dir
    assert not run_dir.exists()
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"{run_dir.name}-")] == []
    stop_cleanly(second, run_dir_of(data))


# ------------------------------------------------------------------ SIGTERM


def test_sigterm_drains_requests_in_flight_then_exits_0(tmp_path: Path, servers: list[ServerProcess]) -> None:
    data = tmp_path / "data"
    server = serve(data, "--drain-timeout", "30")
    servers.append(server)
    pids = with_two_instances(server)
    run_dir = run_dir_of(data)
    with Load(server.url, 2, 3.0) as load:
        wait_until(
            lambda: sum(i["in_flight"] for i in status(server.url)["instances"]) == 2,
            WAIT_S,
            "both requests to be in flight",
        )
        server.process.send_signal(signal.SIGTERM)
        # It stops accepting connections at once (a new request cannot get in).
        wait_until(lambda: refused(server.url), 10, "new connections to be refused")
    responses = load.join()
    assert len(responses) == 2
    assert [answer_of(r) for r in responses if isinstance(r, httpx.Response)] == [[6.0, 2.0]] * 2, responses
    code = server.process.wait(WAIT_S)
    assert code == 0, f"smss serve exited with {code}:\n{server.log()[-4000:]}"
    wait_until(lambda: not node_processes(run_dir), WAIT_S, "the node's processes to exit")
    assert not any(alive(p) for p in pids)
    assert not run_dir.exists()


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/v2/health/live", timeout=5)
    except httpx.ConnectError:
        return True
    return False


def test_an_adopted_instance_keeps_its_weights_and_the_store_counts_them(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    from safetensors.numpy import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"w": np.array([3.0, 5.0], dtype=np.float32)}, str(weights))
    data = tmp_path / "data"
    first = serve(data)
    servers.append(first)
    with Client(first.url) as client:
        client.deploy(f"{WEIGHTED}:Weighted", weights)
        np.testing.assert_array_equal(client.infer("weighted", {"x": X2})["y"], [3.0, 10.0])
        (pid,) = [i["pid"] for f in client.functions() for i in f["instances"]]
    run_dir = run_dir_of(data)
    kill9(first)

    second = serve(data)
    servers.append(second)
    with Client(second.url) as client:
        wait_until(
            lambda: [i["pid"] for f in client.functions() for i in f["instances"]] == [pid],
            WAIT_S,
            "the instance to be adopted",
        )
        np.testing.assert_array_equal(client.infer("weighted", {"x": X2})["y"], [3.0, 10.0])
        # Its weights are in the new store again: counted, and held while it runs.
        store = client.get("/v1/weights")["local"]
        assert any(key.startswith("weighted@") for key in store["templates"]), store
        assert store["entries"] == 1, store
        evicted = httpx.delete(f"{second.url}/v1/weights/weighted", timeout=REQUEST_TIMEOUT_S)
        assert evicted.json()["evicted"] is False, evicted.text
        assert [i["pid"] for f in client.functions() for i in f["instances"]] == [pid]
    stop_cleanly(second, run_dir)
