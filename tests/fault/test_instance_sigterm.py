"""SIGTERM to an instance with a request in flight (RELIABILITY 18), as real processes.

The model is not idempotent, so nothing may be sent to it twice. The signalled instance
stops taking requests: one sent to it meanwhile is refused as "draining" and served by
another instance (nothing ran, so sending it again is safe); the request it holds
finishes there with 200; then the instance exits 0 and leaves routing, and the function
serves on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from smss.client import Client
from smss.testing.server import start_server, wait_until

pytestmark = pytest.mark.slow

MODEL = Path(__file__).parent / "models" / "once.py"
ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}
WAIT_S = 60.0
REQUEST_TIMEOUT_S = 120.0
#: Long enough that the request is surely in flight when the instance is signalled.
HOLD_S = 4.0


def infer(url: str, sleep_s: float) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [sleep_s, 1.0]}]}
    return httpx.post(f"{url}/v2/models/once/infer", json=body, timeout=REQUEST_TIMEOUT_S)


def answer(r: httpx.Response) -> tuple[list[float], int]:
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    return [float(v) for v in outputs["y"]], int(outputs["pid"][0])


def function(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/functions/once", timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def exit_code_of(pid: int) -> int | None:
    """None while ``pid`` runs; it is no child of ours, so only its being gone is seen."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    return 0 if stat[stat.rfind(b")") + 2 :][:1] in (b"Z", b"X") else None


def test_sigterm_to_an_instance_finishes_its_request_and_sends_new_ones_elsewhere(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", ["--keep-alive", "300", "--drain-timeout", "30"], env=ENV)
    try:
        with Client(server.url) as client:
            client.deploy(f"{MODEL}:Once")
        _, victim = answer(infer(server.url, 0.0))  # one instance, warm
        held: list[httpx.Response | BaseException] = []

        def hold() -> None:
            try:
                held.append(infer(server.url, HOLD_S))
            except BaseException as e:
                held.append(e)

        holder = threading.Thread(target=hold)
        holder.start()
        wait_until(
            lambda: [i["in_flight"] for i in function(server.url)["instances"]] == [1],
            WAIT_S,
            "the request to be in flight",
        )
        os.kill(victim, signal.SIGTERM)
        # The handler runs at once (the sleep in predict is interrupted for it); the wait
        # only orders the next request after it, so that it meets a draining instance.
        time.sleep(1.0)
        # Sent while the only instance drains: refused there, served by a new one.
        late_y, late_pid = answer(infer(server.url, 0.0))
        assert late_y == [0.0, 2.0]
        assert late_pid != victim
        holder.join(REQUEST_TIMEOUT_S)
        assert not holder.is_alive(), "the request in flight hung"
        (r,) = held
        assert isinstance(r, httpx.Response), r
        assert answer(r) == ([2 * HOLD_S, 2.0], victim), "the request in flight did not finish where it ran"
        # Then the drained instance exits and leaves routing; the function serves on.
        wait_until(lambda: exit_code_of(victim) is not None, WAIT_S, "the drained instance to exit")
        wait_until(
            lambda: victim not in {i["pid"] for i in function(server.url)["instances"]},
            WAIT_S,
            "the drained instance to leave routing",
        )
        for _ in range(3):
            y, pid = answer(infer(server.url, 0.0))
            assert y == [0.0, 2.0]
            assert pid != victim
        assert function(server.url)["replaced"] == 0, "a drained instance is not a failed one"
    finally:
        assert server.stop() == 0, server.log()[-4000:]
