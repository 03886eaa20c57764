"""``smss bench soak``: churn for N minutes, and what the platform holds after each cycle.

Starts ``smss serve --demo --keep-alive 2 --log-retention 30`` and repeats, until ``minutes`` are up,
a cycle of:

* a burst: 128 concurrent ``mlp`` requests and 16 ``cnn`` ones (scale from zero
  and up);
* 16 cancelled requests: sent on a raw socket that is closed before the answer;
* a model reload: ``mlp`` unloaded and loaded again (the repository routes);
* 8 ``behavior`` workflow runs;
* scale to zero: idle until no instance of ``mlp`` or ``cnn`` is left.

After each cycle it records the platform's processes (count, PSS and RSS in all,
file descriptors and threads in all, and the gateway's own), its ``/dev/shm``
segments and the size of its data directory's SQLite files (the workflow log
among them), and the errors of the cycle. ``growth`` compares the last cycle with
the first: under churn, none of these should keep growing.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss.bench.load import TARGETS
from smss.bench.procs import platform_procs, shm_segments
from smss.testing.server import ServerProcess, running_server

_CNN = msgspec.json.encode(
    {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [1, 3, 64, 64],
                "data": np.zeros(3 * 64 * 64, dtype=np.float32).tolist(),
            }
        ]
    }
)


async def _burst(url: str) -> dict[str, int]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    headers = {"Content-Type": "application/json"}
    mlp = TARGETS["mlp"][1]
    behavior = TARGETS["behavior"][1]
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits, headers=headers) as http:
        calls = [http.post("/v2/models/mlp/infer", content=mlp) for _ in range(128)]
        calls += [http.post("/v2/models/cnn/infer", content=_CNN) for _ in range(16)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        runs = await asyncio.gather(
            *(
                http.post("/v2/models/behavior/infer", content=behavior, headers={"SMSS-Session": f"s{k}"})
                for k in range(8)
            ),
            return_exceptions=True,
        )
    statuses: dict[str, int] = {}
    for a in [*answers, *runs]:
        key = type(a).__name__ if isinstance(a, BaseException) else str(a.status_code)
        statuses[key] = statuses.get(key, 0) + 1
    return statuses


def _cancelled(url: str, n: int) -> None:
    host, port = url.removeprefix("http://").split(":")
    body = TARGETS["mlp"][1]
    head = (
        f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(n):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head + body)  # and gone before the answer


def _reload(http: httpx.Client) -> list[int]:
    return [
        http.post("/v2/repository/models/mlp/unload").status_code,
        http.post("/v2/repository/models/mlp/load").status_code,
    ]


def _scaled_to_zero(http: httpx.Client, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        functions = {f["name"]: f for f in http.get("/v1/functions").json()["functions"]}
        if all(not functions[n]["instances"] for n in ("mlp", "cnn")):
            return True
        time.sleep(0.5)
    return False


def snapshot(server: ServerProcess) -> dict[str, Any]:
    """What the platform holds now: processes, memory, fds, threads, segments, log size."""
    procs = platform_procs(server.process.pid)
    gateway = next((p for p in procs if p.role == "gateway"), None)
    sqlite = [
        p for p in server.data_dir.rglob("*") if p.is_file() and (".sqlite" in p.name or ".db" in p.name)
    ]
    return {
        "processes": len(procs),
        "pss_mb": round(sum(p.pss_kb for p in procs) / 1024, 1),
        "rss_mb": round(sum(p.rss_kb for p in procs) / 1024, 1),
        "gateway_rss_mb": round(gateway.rss_kb / 1024, 1) if gateway else None,
        "fds": sum(p.fds for p in procs),
        "gateway_fds": gateway.fds if gateway else None,
        "threads": sum(p.threads for p in procs),
        "shm_segments": shm_segments(server.data_dir),
        "log_bytes": sum(p.stat().st_size for p in sqlite if p.exists()),
    }


#: ``smss serve`` arguments of the soak's platform: finished runs are compacted after
#: 30 s, so the log must stay bounded under churn.
SERVE_ARGS = ("--demo", "--keep-alive", "2", "--log-retention", "30", "--log-level", "warning")


def cycle(server: ServerProcess, http: httpx.Client) -> dict[str, Any]:
    """One churn cycle on ``server`` (a platform started with :data:`SERVE_ARGS`): what
    it answered, and the :func:`snapshot` after it."""
    t0 = time.monotonic()
    statuses = asyncio.run(_burst(server.url))
    _cancelled(server.url, 16)
    reload = _reload(http)
    zero = _scaled_to_zero(http)
    return {
        "seconds": round(time.monotonic() - t0, 1),
        "statuses": statuses,
        "reload_statuses": reload,
        "scaled_to_zero": zero,
        **snapshot(server),
    }


def run(minutes: float = 5.0) -> dict[str, object]:
    """The whole soak; one JSON-ready dict."""
    started = time.monotonic()
    cycles: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="smss-soak-") as tmp,
        running_server(Path(tmp) / "platform", SERVE_ARGS) as server,
        httpx.Client(base_url=server.url, timeout=120.0) as http,
    ):
        for name in ("mlp", "cnn", "behavior"):
            server.wait_for_model(name)
        while not cycles or time.monotonic() - started < minutes * 60.0:
            cycles.append({"cycle": len(cycles) + 1, **cycle(server, http)})
    first, last = cycles[0], cycles[-1]
    keys = ("processes", "pss_mb", "rss_mb", "fds", "threads", "shm_segments", "log_bytes")
    return {
        "minutes": minutes,
        "cycles": len(cycles),
        "errors": sum(n for c in cycles for s, n in c["statuses"].items() if s != "200"),
        "growth": {k: {"first": first[k], "last": last[k]} for k in keys},
        "per_cycle": cycles,
    }
