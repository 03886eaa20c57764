"""``smss bench peers --plot FILE.png``: the comparison as bar charts, one column per model.

Rows: requests per second at the comparison concurrency, p99 there (log scale),
and p99 over the bursty phase (log scale); one bar per system that was measured.
Needs matplotlib (the ``plots`` extra).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from smss.bench.peers.report import SYSTEMS

COLOURS = {
    "smss": "#1f77b4",
    "ray_serve": "#ff7f0e",
    "kserve": "#2ca02c",
    "mlserver": "#d62728",
    "container": "#9467bd",
    "container_per_core": "#8c564b",
}


def _bars(ax: Any, values: dict[str, float | None], ylabel: str, title: str, log: bool) -> None:
    names = [s for s in SYSTEMS if values.get(s) is not None]
    heights = [float(values[s]) for s in names]  # type: ignore[arg-type]
    bars = ax.bar(range(len(names)), heights, color=[COLOURS[s] for s in names])
    ax.set_xticks(range(len(names)), [s.replace("_", "\n") for s in names], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log and heights and min(heights) > 0:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        # bars on a log axis start a decade or so below the lowest, so that heights compare
        ax.set_yscale("log")
        ax.set_ylim(bottom=10 ** math.floor(math.log10(min(heights) / 2)), top=max(heights) * 2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.bar_label(bars, labels=[f"{h:,.0f}" if h >= 10 else f"{h:.2f}" for h in heights], fontsize=7)
    if not names:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)


def draw(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["settings"]["models"]
    at = report["comparison"][0]["concurrency"] if report["comparison"] else None
    fig, axes = plt.subplots(3, len(models), figsize=(5.5 * len(models), 10), squeeze=False)
    for col, model in enumerate(models):
        points = [
            r
            for r in report["results"]
            if r["model"] == model and r["body"] == "json" and r["concurrency"] == at
        ]
        rps = {r["system"]: r["rps"] for r in points}
        p99 = {r["system"]: r["p99_ms"] for r in points}
        bursts = [b["p99_ms"] for b in report["bursty"] if b["model"] == model]
        burst: dict[str, float | None] = bursts[0] if bursts else {}
        _bars(axes[0][col], rps, "requests / s", f"{model}: throughput at {at} clients", log=False)
        _bars(axes[1][col], p99, "p99 latency (ms)", f"{model}: p99 at {at} clients", log=True)
        _bars(axes[2][col], burst, "p99 latency (ms)", f"{model}: p99 over 1 -> 32 -> 1 clients", log=True)
    fig.suptitle("smss bench peers\nV2 JSON bodies; the same cores, threads and load generator", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
