"""RELIABILITY 33, short: a few churn cycles of ``smss bench soak`` (``smss.bench.soak``)
against a real ``smss serve --demo``, each cycle a burst that scales ``mlp`` and ``cnn``
up from zero, ``behavior`` workflow runs, cancelled requests (clients gone before the
answer), a model reload, and a scale back to zero.

Once the platform has settled after each cycle (every function at zero instances, and
what it holds unchanged over a second), it holds what it held after the first cycle:
the same processes, threads, file descriptors and ``/dev/shm`` segments, and about the
same memory (generous bounds: allocators keep what they freed). Every request of every
cycle was answered 200. The log's bound under churn is
``tests/integration/test_log_compaction.py``'s subject (its retention here is 30 s,
longer than this test).

Default: 3 cycles (``--duration S`` for cycles until S seconds have passed;
RELIABILITY asks for minutes).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from smss.bench import soak
from smss.testing.server import ServerProcess, running_server

pytestmark = pytest.mark.slow

CYCLES = 3
#: What must be back exactly, once settled.
EXACT = ("processes", "threads", "fds", "shm_segments")
SETTLE_S = 90.0


def settled(server: ServerProcess, http: httpx.Client) -> dict[str, Any]:
    """The platform's snapshot once every function is at zero and the counts in
    :data:`EXACT` stayed the same for three readings half a second apart."""
    deadline = time.monotonic() + SETTLE_S
    seen: list[tuple[int, ...]] = []
    while True:
        functions = http.get("/v1/functions").json()["functions"]
        snap = soak.snapshot(server)
        if all(not f["instances"] for f in functions):
            seen.append(tuple(snap[k] for k in EXACT))
            if len(seen) >= 3 and len(set(seen[-3:])) == 1:
                return snap
        else:
            seen.clear()
        if time.monotonic() > deadline:
            raise AssertionError(f"the platform did not settle in {SETTLE_S} s: {seen[-5:]}, {functions}")
        time.sleep(0.5)


@pytest.mark.duration_timeout(420)
def test_churn_cycles_leave_processes_fds_threads_segments_and_memory_at_baseline(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    duration = pytestconfig.getoption("--duration")
    cycles: list[dict[str, Any]] = []
    started = time.monotonic()
    with (
        running_server(tmp_path / "platform", soak.SERVE_ARGS) as server,
        httpx.Client(base_url=server.url, timeout=120.0) as http,
    ):
        for name in ("mlp", "cnn", "behavior"):
            server.wait_for_model(name)
        while len(cycles) < CYCLES or (duration is not None and time.monotonic() - started < duration):
            done = soak.cycle(server, http)
            assert set(done["statuses"]) == {"200"}, done
            assert done["reload_statuses"] == [200, 200], done
            assert done["scaled_to_zero"], done
            cycles.append(settled(server, http))
    keys = (*EXACT, "gateway_rss_mb", "pss_mb", "log_bytes")
    print("soak:", [{k: c[k] for k in keys} for c in cycles])

    baseline = cycles[0]
    for n, c in enumerate(cycles[1:], start=2):
        for key in EXACT:
            assert c[key] == baseline[key], (n, key, baseline, c)
        assert c["gateway_rss_mb"] - baseline["gateway_rss_mb"] < 32, (n, baseline, c)
        assert c["pss_mb"] < baseline["pss_mb"] * 1.15 + 32, (n, baseline, c)
