"""``smss bench peers`` for a person: the measured points, the ratios and the burst, as tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(console: Console, report: dict[str, Any]) -> None:
    table = Table("system", "model", "body", "clients", "rps", "p50 ms", "p99 ms", "errors", title="points")
    for r in report["results"]:
        table.add_row(
            r["system"],
            r["model"],
            r["body"],
            str(r["concurrency"]),
            _num(r["rps"]),
            _num(r["p50_ms"], 2),
            _num(r["p99_ms"], 2),
            str(r["errors"]),
        )
    console.print(table)
    for c in report["comparison"]:
        ratios = Table(
            "peer",
            "smss rps / peer's",
            "smss p99 / peer's",
            title=f"{c['model']} at {c['concurrency']} clients",
        )
        for key in c:
            if key.startswith("smss_vs_") and key.endswith("_rps"):
                peer = key[len("smss_vs_") : -len("_rps")]
                ratios.add_row(peer, _num(c[key], 2), _num(c[f"smss_vs_{peer}_p99_ratio"], 2))
        console.print(ratios)
    for b in report["bursty"]:
        if not b["p99_ms"]:
            continue
        clients = " -> ".join(map(str, b["clients"] or []))
        burst = Table(
            "system", "p99 ms", "p99 ms per phase", "errors", title=f"{b['model']}: {clients} clients"
        )
        for system, p99 in b["p99_ms"].items():
            phases = ", ".join(_num(p, 1) for p in b["phase_p99_ms"][system])
            burst.add_row(system, _num(p99, 1), phases, str(b["errors"][system]))
        console.print(burst)
    for name, entry in report["systems"].items():
        errors = [entry["error"]] if entry.get("error") else []
        errors += [f"{m}: {e['error']}" for m, e in (entry.get("models") or {}).items() if e.get("error")]
        for e in errors:
            console.print(f"[yellow]{name}[/yellow]: {e}", highlight=False)
    console.print(report["settings"]["note"], highlight=False)
