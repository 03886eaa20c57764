"""The tiers of readiness measured: what a start from each tier costs, and what each holds.

Part of ``smss bench cold-start`` (:mod:`smss.bench.coldstart`). For one deployed
model on a running platform (``fixed`` keep-alive, so that only the benchmark moves
it), for each tier (``standby``, ``resident``, ``cold``, ``no_runtime``) and ``TRIES``
times: scale it to zero, put it in the tier (``POST /v1/functions/{name}/tier``),
let the node settle (``AT_ZERO_S``: a template forks its spare once idle), measure
what the tier holds, then time one request. Per tier:

* ``start_ms``: the median request minus the warm median (the latency a start from the
  tier adds; ``cold_ms`` and ``samples_ms`` are the requests themselves);
* ``resident_mb``: the PSS of the processes the tier keeps (template and spares, the
  runtime's zygote) without the weight segments they map, plus the segments' size, read
  from ``/proc`` of this machine while the function has no instance;
* ``own_mb``: the same without the zygote, which the runtime's other functions share;
* ``private_mb``: the pages only its template and spares map (no share of the pages
  they share with the zygote), plus the segments: what one more function in the tier
  adds to a node whatever else runs (the simulator's default footprints).

The ``no_runtime`` tries stop the runtime's zygote, so the other functions of the
runtime lose their templates too: measure one model at a time.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Protocol

#: Tiers in the order measured (each from the state the last request left: warm).
TIERS = ("standby", "resident", "cold", "no_runtime")


class Platform(Protocol):
    """What the benchmark needs of the platform (``coldstart._Platform``)."""

    def infer_ms(self, name: str, body: bytes, headers: dict[str, str]) -> float: ...

    def to_zero(self, name: str) -> None: ...

    def get(self, path: str) -> Any: ...

    def post(self, path: str, body: object) -> Any: ...


def _rollup(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def own_kb(pid: int) -> int:
    """PSS less the shared memory (weight segments) the process maps, in kB (0: gone)."""
    fields = _rollup(pid)
    return max(fields.get("Pss", 0) - fields.get("Pss_Shmem", 0), 0)


def private_kb(pid: int) -> int:
    """The pages only this process maps, in kB: what it adds to the node."""
    fields = _rollup(pid)
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out.extend(int(x) for x in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return out


def held_mb(p: Platform, name: str, runtime: str) -> tuple[float, float, float]:
    """(resident_mb, own_mb, private_mb) of ``name`` now (module docstring)."""
    store = p.get("/v1/weights")["local"]
    own_kbs = private_kbs = 0
    for key, t in store["templates"].items():
        if key.partition("@")[0] == name:
            pids = [t["pid"], *children(t["pid"])]
            own_kbs += sum(own_kb(pid) for pid in pids)
            private_kbs += sum(private_kb(pid) for pid in pids)
    segments_mb = sum(
        size for key, size in (store.get("segments") or {}).items() if key.partition("@")[0] == name
    )
    zygote = store.get("zygotes", {}).get(runtime)
    zygote_mb = own_kb(zygote["pid"]) / 1024 if zygote else 0.0
    own = own_kbs / 1024 + segments_mb
    return round(own + zygote_mb, 1), round(own, 1), round(private_kbs / 1024 + segments_mb, 1)


def measure_tiers(
    p: Platform,
    name: str,
    runtime: str,
    request: tuple[bytes, dict[str, str]],
    warm_ms: float,
    tries: int,
    settle_s: float,
) -> dict[str, dict[str, Any]]:
    """Per tier: ``start_ms``, ``cold_ms``, ``samples_ms``, ``resident_mb``, ``own_mb``,
    ``private_mb``."""
    body, headers = request
    out: dict[str, dict[str, Any]] = {}
    for tier in TIERS:
        samples: list[float] = []
        held: list[float] = []
        own: list[float] = []
        private: list[float] = []
        for _ in range(tries):
            p.to_zero(name)
            p.post(f"/v1/functions/{name}/tier", {"tier": tier})
            time.sleep(settle_s)
            total, mine, alone = held_mb(p, name, runtime)
            held.append(total)
            own.append(mine)
            private.append(alone)
            samples.append(p.infer_ms(name, body, headers))
        cold = statistics.median(samples)
        out[tier] = {
            "start_ms": round(cold - warm_ms, 2),
            "cold_ms": round(cold, 2),
            "samples_ms": [round(s, 1) for s in samples],
            "resident_mb": statistics.median(held),
            "own_mb": statistics.median(own),
            "private_mb": statistics.median(private),
        }
    p.to_zero(name)
    return out
