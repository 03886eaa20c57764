"""RELIABILITY 17: twice a function's capacity, open loop, against a real ``smss serve``.

``overload`` (models/overload.py) has one instance of concurrency 2, each batch taking
0.2 s: at most about 10 requests a second. Requests arrive on a schedule at 20 a
second (whether or not earlier ones were answered), with a gateway queue bound of 4
(``--queue-limit``). A quarter of them carry a deadline of 0.1 s, which passes while
they wait in the queue; the others have 5 s. A probe, a third of the way in, sends one
request that computes for 3 s with a deadline of 2 s (again while refused) until it is
admitted: it expires while its instance computes it. Checked:

* the instance's concurrency is never exceeded: no batch the model ran held more rows
  (one per request) than 2, also after the probe was answered 504 while its instance
  still computed it (its slot is kept until the instance answers); and the gateway's
  own view, sampled all along, never shows more than 2 in flight on the instance nor
  more than 4 queued;
* the excess is refused quickly (well before any deadline) with 429 ``overloaded`` and
  a ``Retry-After``; a request whose deadline passed in the queue gets 503
  ``unavailable`` with a ``Retry-After``, one whose deadline passed in flight 504;
  nothing else comes back;
* deadlines are kept: no answer comes after its deadline by more than a generous
  margin;
* the gateway's memory stays flat-ish (a generous bound), and once the load stops the
  function answers at once again.

A batch shows at most what its instance held, less the batch before it: an excess of
one request over the concurrency would not show in the model's batches, a growing one
would; the sampled gateway view covers the rest.

Default: 12 s of overload (``--duration S`` for longer; RELIABILITY asks for minutes).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from smss.client import Client
from smss.headers import REQUEST_TIMEOUT
from smss.testing.server import ServerProcess, start_server, wait_until

pytestmark = pytest.mark.slow

MODEL = Path(__file__).parent / "models" / "overload.py"
ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}
TRACE_ENV = "SMSS_TEST_TRACE_DIR"
CONCURRENCY = 2
QUEUE_LIMIT = 4
RATE_PER_S = 20.0
DEFAULT_S = 12.0
DEADLINES_S = (5.0, 5.0, 5.0, 0.1)
#: How late past its deadline an answer may come (a loaded 2-core machine).
MARGIN_S = 1.5
#: A refusal must come well before the shortest deadline's margin would.
REFUSED_WITHIN_S = 1.0
#: Request numbers of the probe's tries, its compute time and deadline.
PROBE, PROBE_COMPUTE_S, PROBE_DEADLINE_S = 100_000, 3.0, 2.0


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    deadline_s: float
    code: str | None
    retry_after: str | None


def _body(k: int, compute_s: float = 0.0) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [float(k), compute_s]}]}


async def _one(
    http: httpx.AsyncClient, k: int, deadline_s: float, answers: dict[int, Answer], compute_s: float = 0.0
) -> Answer:
    t0 = time.monotonic()
    r = await http.post(
        "/v2/models/overload/infer", json=_body(k, compute_s), headers={REQUEST_TIMEOUT: str(deadline_s)}
    )
    seconds = time.monotonic() - t0
    code = r.json().get("code") if r.status_code != 200 else None
    if r.status_code == 200:
        assert r.json()["outputs"][0]["data"] == [2.0 * k, 2.0 * compute_s], r.text
    answers[k] = Answer(r.status_code, seconds, deadline_s, code, r.headers.get("retry-after"))
    return answers[k]


async def _probe(http: httpx.AsyncClient, until: float, answers: dict[int, Answer]) -> None:
    """The slow request, sent again (as the next request number) while it is refused."""
    k = PROBE
    while time.monotonic() < until:
        answer = await _one(http, k, PROBE_DEADLINE_S, answers, compute_s=PROBE_COMPUTE_S)
        if answer.status not in (429, 503):
            return
        k += 1
        await asyncio.sleep(1 / RATE_PER_S)


async def open_loop(url: str, seconds: float, *, probe: bool = False) -> dict[int, Answer]:
    """Requests 1, 2, ... due every 1/RATE_PER_S s for ``seconds``, each sent when due
    (with ``probe``, also the probe's, numbered from PROBE)."""
    answers: dict[int, Answer] = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    n = max(1, int(seconds * RATE_PER_S))
    async with (
        httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as http,
        asyncio.TaskGroup() as group,
    ):
        start = time.monotonic()
        for k in range(1, n + 1):
            delay = start + (k - 1) / RATE_PER_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if probe and k == n // 3:
                group.create_task(_probe(http, start + seconds, answers))
            group.create_task(_one(http, k, DEADLINES_S[k % len(DEADLINES_S)], answers))
    return answers


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _function(server: ServerProcess) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/functions/overload", timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _batches(trace: Path) -> list[list[int]]:
    """The request numbers of each batch the model ran."""
    lines = trace.read_text().splitlines() if trace.exists() else []
    return [[int(k) for k in line.split()[1].split(",")] for line in lines]


class Sampler:
    """The gateway's view of the function (in flight per instance, queued), every 50 ms."""

    def __init__(self, server: ServerProcess) -> None:
        self._server = server
        self._stop = threading.Event()
        self.samples: list[tuple[list[int], int]] = []
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(base_url=self._server.url, timeout=30) as http:
            while not self._stop.wait(0.05):
                f = http.get("/v1/functions/overload").json()
                self.samples.append(([i["in_flight"] for i in f["instances"]], int(f["queued"])))


@pytest.mark.duration_timeout(240)
def test_twice_the_capacity_is_refused_fast_within_the_bound_and_recovers(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    seconds = float(pytestconfig.getoption("--duration") or DEFAULT_S)
    traces = tmp_path / "trace"
    traces.mkdir()
    server = start_server(
        tmp_path / "data",
        ["--queue-limit", str(QUEUE_LIMIT), "--keep-alive", "300"],
        env={**ENV, TRACE_ENV: str(traces)},
    )
    try:
        with Client(server.url) as client:
            client.deploy(f"{MODEL}:Overload")
        warm = httpx.post(f"{server.url}/v2/models/overload/infer", json=_body(1), timeout=120)
        assert warm.status_code == 200, warm.text  # the instance is up
        rss_before = _rss_kib(server.process.pid)

        with Sampler(server) as sampler:
            answers = asyncio.run(open_loop(server.url, seconds, probe=True))

        rss_after = _rss_kib(server.process.pid)
        wait_until(
            lambda: (
                (f := _function(server))["queued"] == 0 and all(i["in_flight"] == 0 for i in f["instances"])
            ),
            30,
            "the queue to drain",
        )
        after = [a for _ in range(5) for a in asyncio.run(open_loop(server.url, 1 / RATE_PER_S)).values()]
        instances = _function(server)["instances"]
    finally:
        assert server.stop() == 0, server.log()[-4000:]

    statuses = Counter(a.status for a in answers.values())
    batches = _batches(traces / "overload.trace")
    sizes = Counter(len(b) for b in batches)
    worst = {s: round(max(a.seconds for a in answers.values() if a.status == s), 2) for s in statuses}
    print(
        f"overload: {len(answers)} requests in {seconds} s, {dict(statuses)}, slowest {worst}, "
        f"batch sizes {dict(sizes)}, gateway RSS {rss_before} -> {rss_after} KiB"
    )
    assert set(statuses) <= {200, 429, 503, 504}, statuses
    assert statuses[429] > 0, f"twice the capacity was never refused: {statuses}"
    assert statuses[200] >= seconds * 2, f"the function served too little under overload: {statuses}"
    # Concurrency: no batch held more requests than the instance may hold ...
    assert batches, "the model never ran"
    assert max(sizes) <= CONCURRENCY, sizes
    assert len(instances) == 1
    # ... also once the probe expired while its instance computed it (504, then run).
    expired_in_flight = {k for k, a in answers.items() if a.status == 504}
    computed = {k for b in batches for k in b}
    assert expired_in_flight & computed, "the probe never expired in flight: the case was not made"
    assert max(computed) >= PROBE  # and the model ran the batches after it, bounded as well
    # ... nor in the gateway's view, all along.
    assert sampler.samples, "the gateway was never sampled"
    assert max(max(flight, default=0) for flight, _ in sampler.samples) <= CONCURRENCY
    assert max(queued for _, queued in sampler.samples) <= QUEUE_LIMIT
    # Excess refused quickly, with a time to come back.
    codes = {429: "overloaded", 503: "unavailable", 504: "deadline_exceeded"}
    for a in answers.values():
        if a.status != 200:
            assert a.code == codes[a.status], a
        if a.status in (429, 503):
            assert a.retry_after is not None, a
            assert int(a.retry_after) >= 1, a
        if a.status == 429:
            assert a.seconds < REFUSED_WITHIN_S, a
    # Deadlines kept: nothing answered past its deadline (plus a margin).
    late = [a for a in answers.values() if a.seconds > a.deadline_s + MARGIN_S]
    assert late == [], late
    # Memory flat-ish: the gateway held a queue of 4 and at most a few hundred requests.
    assert (rss_after - rss_before) / 1024 < 48, (rss_before, rss_after)
    # Recovery: once the load stops, each request is answered at once again.
    assert [a.status for a in after] == [200] * 5, after
    assert all(a.seconds < 1.5 for a in after), after
