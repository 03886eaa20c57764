"""``smss bench workflow``: what the durable log costs the ``behavior`` pipeline.

Runs the demo pipeline (perceive -> track (stateful) -> respond) against a
platform started for the benchmark:

* durable runs (the engine, write-ahead log with group commit, synchronous=FULL)
  and, for comparison, the same three stages called through the dispatchers
  with no engine and no log (``durable: false``), both over the same HTTP route,
  sequentially and with 16 concurrent sessions; each session alternates a durable
  and a direct run, so that both meet the same machine at the same moments;
* ``log_overhead_ms_per_stage`` = (durable p50 - direct p50) / 3 and
  ``overhead_pct`` = (durable p50 - direct p50) / direct p50, sequential;
* ``fsyncs_per_run``: commits of the log (one fsync each) per durable run, over
  sequential durable runs alone;
* ``recovery_s``: 100 runs of four sessions submitted without waiting while the
  instances of the middle stage (``track``) are stopped with SIGSTOP, so that every
  one of them is unfinished (in ``track``, or queued behind its session's run
  there), the platform killed with SIGKILL once all are acknowledged, then
  restarted: seconds from the restart (process start included) to the platform
  listing none of them as running (``GET /v1/runs?status=running``, polled every
  20 ms); ``unfinished_after`` counts those not then ``completed``;
  ``interrupted`` says how many the log held unfinished at the kill (100),
  ``resumed_s`` when the restarted platform answered again.

With ``--store postgresql://...`` the same measurements run a second time on platforms
whose registry, log and session state are in PostgreSQL (``smss serve --store``; each
platform in a fresh schema of that database, dropped afterwards), reported beside the
SQLite figures under ``postgresql``; there ``commits_per_run`` stands for
``fsyncs_per_run``: COMMITs of the log per durable run, each a WAL flush on the server
(``synchronous_commit = on``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss.testing.server import ServerProcess, start_server

STAGES = 3


def _frame(rng: np.random.Generator) -> list[dict[str, Any]]:
    x = rng.standard_normal((1, 3, 64, 64), dtype=np.float32)
    return [{"name": "frame", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": x.ravel().tolist()}]


def _runs(url: str, sessions: int, per_session: int, durable: bool, wait: bool = True) -> list[float]:
    return _mixed(url, sessions, per_session, (durable,), wait)[durable]


def _mixed(
    url: str, sessions: int, per_session: int, modes: tuple[bool, ...], wait: bool = True
) -> dict[bool, list[float]]:
    """Each session sends ``per_session`` runs of each mode in ``modes`` (durable or
    not), alternating, so that both modes meet the same machine at the same time."""
    latencies: dict[bool, list[float]] = {m: [] for m in modes}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        rng = np.random.default_rng(i)
        with httpx.Client(base_url=url, timeout=120) as http:
            for _ in range(per_session):
                for durable in modes:
                    body = {"session": f"user-{i}", "inputs": _frame(rng), "wait": wait, "durable": durable}
                    t0 = time.perf_counter()
                    r = http.post("/v1/workflows/behavior/runs", json=body)
                    elapsed = (time.perf_counter() - t0) * 1000
                    with lock:
                        if r.status_code >= 400 or (wait and r.json().get("status") != "completed"):
                            errors.append(r.text[:200])
                        latencies[durable].append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} runs failed, e.g. {errors[0]}")
    return latencies


def _summary(latencies: list[float]) -> dict[str, float]:
    a = np.asarray(latencies)
    return {
        "runs": len(latencies),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
    }


def _commits(server: ServerProcess) -> int:
    return int(httpx.get(f"{server.url}/v1/log/stats").json().get("commits", 0))


def measure_overhead(
    server: ServerProcess, runs: int, commits_field: str = "fsyncs_per_run"
) -> dict[str, Any]:
    _mixed(server.url, 1, 20, (True, False))  # warm every instance
    c0 = _commits(server)
    seq_log = _runs(server.url, 1, runs // 4, durable=True)
    fsyncs = (_commits(server) - c0) / (runs // 4)
    # Latencies: durable and direct runs alternate, so both see the same conditions.
    seq = _mixed(server.url, 1, runs, (True, False))
    seq_log, seq_direct = seq[True], seq[False]
    conc = _mixed(server.url, 16, max(1, runs // 16) * 2, (True, False))
    conc_log, conc_direct = conc[True], conc[False]
    log_p50, direct_p50 = statistics.median(seq_log), statistics.median(seq_direct)
    return {
        "sequential": {"log": _summary(seq_log), "direct": _summary(seq_direct)},
        "concurrent_16": {"log": _summary(conc_log), "direct": _summary(conc_direct)},
        "log_overhead_ms_per_stage": round((log_p50 - direct_p50) / STAGES, 3),
        "overhead_pct": round((log_p50 - direct_p50) / direct_p50 * 100, 2),
        commits_field: round(fsyncs, 2),
    }


def measure_recovery(data: Path, runs: int = 100, store: tuple[str, ...] = ()) -> dict[str, Any]:
    """``store``: the ``--store URL`` flags of both platforms (none: SQLite in ``data``)."""
    # --adopt-window 0: the crash takes every instance with it, so the figure is a
    # recovery from the log alone (not one helped by adopted warm instances).
    server = start_server(data, ["--demo", "--log-level", "warning", "--adopt-window", "0", *store])
    server.wait_for_model("behavior")
    _runs(server.url, 4, 2, durable=True)  # every stage has an instance
    rng = np.random.default_rng(1000)
    bodies = [
        msgspec.json.encode({"session": f"crash-{i % 4}", "inputs": _frame(rng), "wait": False})
        for i in range(runs)
    ]
    stopped = _instance_pids(server, "behavior_track")
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    ids: list[str] = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for body in bodies:
                r = http.post(
                    "/v1/workflows/behavior/runs", content=body, headers={"Content-Type": "application/json"}
                )
                r.raise_for_status()
                ids.append(r.json()["run_id"])
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        for pid in stopped:  # they die with the platform (SIGKILL reaches a stopped process)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    interrupted = _unfinished_in_pg(store[1]) if store else _unfinished_in_log(data / "log.db")
    t0 = time.perf_counter()
    server = start_server(data, ["--log-level", "warning", *store], port=None)
    resumed = time.perf_counter() - t0
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            # One cheap request a poll (reading 100 runs' logs each time would add its own
            # seconds to the figure); each run's status is read once they are all done.
            interrupted_ids, deadline = set(ids), time.monotonic() + 300
            while time.monotonic() < deadline:
                listed = http.get("/v1/runs", params={"status": "running", "limit": 1000}).json()["runs"]
                if not {r["run_id"] for r in listed} & interrupted_ids:
                    break
                time.sleep(0.02)
            recovery = time.perf_counter() - t0
            statuses = [http.get(f"/v1/runs/{rid}").json()["status"] for rid in ids]
        unfinished = sum(1 for s in statuses if s != "completed")
    finally:
        server.stop()
    return {
        "recovery_s": round(recovery, 2),
        "resumed_s": round(resumed, 2),
        "submitted": len(ids),
        "interrupted": interrupted,
        "unfinished_after": unfinished,
    }


def _instance_pids(server: ServerProcess, function: str) -> list[int]:
    instances = httpx.get(f"{server.url}/v1/functions/{function}").json()["instances"]
    pids = [int(i["pid"]) for i in instances if i.get("pid")]
    if not pids:
        raise RuntimeError(f"{function} has no running instance to stop")
    return pids


def _unfinished_in_log(path: Path) -> int:
    """Runs the killed platform left unfinished, read from its log file (read-only)."""
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM runs WHERE status = 'running'").fetchone()[0])
    finally:
        db.close()


def _unfinished_in_pg(url: str) -> int:
    """Runs the killed platform left unfinished, read from its PostgreSQL schema."""
    import psycopg

    from smss.store._pg import parse_store_url

    target = parse_store_url(url)
    with psycopg.connect(target.conninfo) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM \"{target.schema}\".runs WHERE status = 'running'"
        ).fetchone()
    return int(row[0]) if row else 0


def _schema_url(url: str, schema: str) -> str:
    """``url`` naming ``schema`` (in place of any schema it named)."""
    from smss.store._pg import parse_store_url

    target = parse_store_url(url)
    return f"{target.conninfo}{'&' if '?' in target.conninfo else '?'}schema={schema}"


def _drop_schemas(url: str, schemas: list[str]) -> None:
    import psycopg

    from smss.store._pg import parse_store_url

    with psycopg.connect(parse_store_url(url).conninfo, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _measure(data: Path, runs: int, store: str | None) -> dict[str, Any]:
    """Overhead and recovery, on SQLite (``store`` None) or on the PostgreSQL of ``store``."""
    schemas = [f"smss_bench_{uuid.uuid4().hex[:12]}_{x}" for x in "ab"] if store else []
    flags = [("--store", _schema_url(store, s)) for s in schemas] if store else [(), ()]
    try:
        server = start_server(data / "a", ["--demo", "--log-level", "warning", *flags[0]])
        try:
            server.wait_for_model("behavior")
            result = measure_overhead(server, runs, "commits_per_run" if store else "fsyncs_per_run")
        finally:
            server.stop()
        result.update(measure_recovery(data / "b", store=flags[1]))
    finally:
        if store:
            _drop_schemas(store, schemas)
    return result


def run(runs: int = 200, store: str | None = None) -> dict[str, Any]:
    """The SQLite figures; with ``store`` (a ``postgresql://`` URL) the PostgreSQL ones
    beside them, under ``postgresql``."""
    with tempfile.TemporaryDirectory(prefix="smss-bench-") as tmp:
        result: dict[str, Any] = {"workflow": "behavior", **_measure(Path(tmp) / "sqlite", runs, None)}
        if store is not None:
            result["postgresql"] = _measure(Path(tmp) / "postgresql", runs, store)
    return result
