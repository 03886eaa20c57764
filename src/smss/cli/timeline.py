"""Render a run's log for a person: the timeline, per-stage durations, where and why it failed."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def render_run(console: Console, run: dict[str, Any]) -> None:
    console.print(
        f"[bold]run {run['run_id']}[/bold]  workflow {run['workflow']}  "
        f"session {run.get('session') or '-'}  status [bold]{run['status']}[/bold]"
    )
    events = run.get("events", [])
    t0 = events[0]["ts"] if events else 0.0
    table = Table("seq", "+ms", "event", "stage", "attempt", "detail")
    for e in events:
        table.add_row(
            str(e["seq"]),
            f"{(e['ts'] - t0) * 1000:.1f}",
            e["type"],
            e.get("stage") or "",
            str(e.get("attempt", "")),
            _detail(e),
        )
    console.print(table)
    durations = [(e["stage"], e.get("duration_ms", 0.0)) for e in events if e["type"] == "StageCompleted"]
    if durations:
        console.print("stage durations: " + ", ".join(f"{s} {ms:.1f} ms" for s, ms in durations))
    failures = [e for e in events if e["type"] == "StageFailed"]
    if run["status"] == "failed" and failures:
        last = failures[-1]
        console.print(
            f"[red]failed at stage {last['stage']!r}, attempt {last['attempt']}, "
            f"instance {last.get('instance') or '?'} on node {last.get('node') or '?'}: "
            f"{last['error_type']}: {last['message']}[/red]"
        )
        if last.get("traceback"):
            console.print(last["traceback"], highlight=False, markup=False)
    if run.get("error") and run["status"] != "failed":
        console.print(f"[yellow]{run['error']}[/yellow]")


def _detail(e: dict[str, Any]) -> str:
    kind = e["type"]
    if kind == "StageStarted":
        return (
            f"{e['function']} state v{e['state_version']}"
            if e.get("state_version") is not None
            else e["function"]
        )
    if kind == "StageCompleted":
        state = f", state -> v{e['state_version']}" if e.get("state_version") is not None else ""
        return f"{e.get('instance') or ''} {e.get('duration_ms', 0):.1f} ms{state}"
    if kind == "StageFailed":
        return f"{e['error_type']}: {e['message'][:80]} ({e.get('instance') or '?'})"
    if kind in ("RunFailed", "RunParked"):
        return e.get("message") or e.get("reason") or ""
    if kind == "RunStarted" and e.get("replay_of"):
        return f"replay of {e['replay_of']}"
    return ""
