"""The output of ``smss bench peers``, assembled from what each system's run measured.

Pure: dicts in, dicts out (no I/O), so that the ratios are tested without a server.

What a run hands in, per system (see :mod:`smss.bench.peers.runner`)::

    {"version": ..., "error"?: ..., "models": {MODEL: {
        "settings": {...}, "startup_s": ..., "output_check": {...}, "error"?: ...,
        "points": {"json" | "binary": {"CONCURRENCY": {"rps", "p50_ms", "p90_ms", "p99_ms", "errors", ...}}},
        "bursty"?: {"phases": [{"clients", "p99_ms", ...}, ...], "total": {...}}}}}

What comes out: ``results``, one row per system, model, body and concurrency
(``rps``, ``p50_ms``, ``p99_ms``, ``errors``, ...); ``comparison``, per model
at the comparison concurrency (32) on the JSON bodies every system takes,
``smss_vs_<peer>_rps`` (SMSS's rps over the peer's) and
``smss_vs_<peer>_p99_ratio`` (SMSS's p99 over the peer's: below 1 is better);
``bursty``, per model, each system's p99 over the 1 -> 32 -> 1 clients phase;
``systems``, each system's version, settings, start-up time and errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: In the order they run and are shown.
SYSTEMS = ("smss", "ray_serve", "kserve", "mlserver", "container", "container_per_core")
PEERS = SYSTEMS[1:]
#: The concurrency the comparison is made at when it was measured (else the highest measured).
COMPARE_AT = 32

Run = Mapping[str, Any]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def rows(systems: Mapping[str, Run]) -> list[dict[str, Any]]:
    """One row per system, model, body and concurrency measured."""
    out = []
    for system, run in systems.items():
        for model, measured in (run.get("models") or {}).items():
            for body, points in (measured.get("points") or {}).items():
                for concurrency in sorted(points, key=int):
                    point = points[concurrency]
                    out.append(
                        {
                            "system": system,
                            "model": model,
                            "body": body,
                            "concurrency": int(concurrency),
                            "rps": point.get("rps"),
                            "p50_ms": point.get("p50_ms"),
                            "p90_ms": point.get("p90_ms"),
                            "p99_ms": point.get("p99_ms"),
                            "errors": point.get("errors"),
                            "statuses": point.get("statuses", {}),
                        }
                    )
    return out


def _find(table: Iterable[dict[str, Any]], system: str, model: str, concurrency: int) -> dict[str, Any]:
    for row in table:
        if (row["system"], row["model"], row["body"], row["concurrency"]) == (
            system,
            model,
            "json",
            concurrency,
        ):
            return row
    return {}


def compare_at(concurrency: Iterable[int]) -> int:
    levels = list(concurrency)
    return COMPARE_AT if COMPARE_AT in levels else max(levels)


def comparison(table: list[dict[str, Any]], model: str, concurrency: int) -> dict[str, Any]:
    """SMSS against each peer on ``model`` at ``concurrency``, JSON bodies (None where
    either side was not measured)."""
    mine = _find(table, "smss", model, concurrency)
    out: dict[str, Any] = {"model": model, "concurrency": concurrency, "body": "json"}
    for peer in PEERS:
        theirs = _find(table, peer, model, concurrency)
        out[f"smss_vs_{peer}_rps"] = ratio(mine.get("rps"), theirs.get("rps"))
    for peer in PEERS:
        theirs = _find(table, peer, model, concurrency)
        out[f"smss_vs_{peer}_p99_ratio"] = ratio(mine.get("p99_ms"), theirs.get("p99_ms"))
    return out


def bursty(systems: Mapping[str, Run], model: str) -> dict[str, Any]:
    """Each system's p99 (and per phase) over the bursty phase of ``model``."""
    out: dict[str, Any] = {"model": model, "clients": None, "p99_ms": {}, "phase_p99_ms": {}, "errors": {}}
    for system, run in systems.items():
        measured = ((run.get("models") or {}).get(model) or {}).get("bursty")
        if not measured:
            continue
        out["clients"] = [p["clients"] for p in measured["phases"]]
        out["p99_ms"][system] = measured["total"].get("p99_ms")
        out["phase_p99_ms"][system] = [p.get("p99_ms") for p in measured["phases"]]
        out["errors"][system] = measured["total"].get("errors")
    return out


def _system_entry(run: Run) -> dict[str, Any]:
    entry: dict[str, Any] = {k: v for k, v in run.items() if k != "models"}
    models = {}
    for model, measured in (run.get("models") or {}).items():
        models[model] = {k: v for k, v in measured.items() if k not in ("points", "bursty")}
        if measured.get("bursty"):
            models[model]["bursty"] = measured["bursty"]
    if models:
        entry["models"] = models
    return entry


def assemble(
    systems: Mapping[str, Run], models: list[str], concurrency: list[int], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The bench's one JSON object."""
    table = rows(systems)
    at = compare_at(concurrency)
    return {
        "bench": "peers",
        "settings": dict(settings),
        "results": table,
        "comparison": [comparison(table, model, at) for model in models],
        "bursty": [bursty(systems, model) for model in models],
        "systems": {name: _system_entry(run) for name, run in systems.items()},
    }
