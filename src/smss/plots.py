"""Figures written by ``--plot FILE.png``: timelines of a simulation or a replay, and
bar charts of a benchmark's comparisons. Needs the ``plots`` extra (matplotlib),
imported only when a figure is drawn; without it :class:`~smss.errors.InvalidSpec`
says how to install it. Drawn off screen (Agg), one PNG per figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from smss.errors import InvalidSpec
from smss.sim.timeline import Timeline

TIER_COLORS = {
    "warm": "#16a34a",
    "standby": "#2563eb",
    "resident": "#9333ea",
    "cold": "#64748b",
    "no_runtime": "#94a3b8",
}
DPI = 100


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InvalidSpec("--plot needs matplotlib: pip install 'smss[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _minutes(t: Timeline) -> list[float]:
    return [x / 60 for x in t.t_s]


def timeline_figure(
    path: Path, title: str, timeline: Timeline, simulated: Timeline | None = None, *, live_label: str = "live"
) -> Path:
    """Instances, functions by tier, cold starts, memory held and cost against always-on
    containers over time, one panel each on a shared time axis. With ``simulated`` (a
    replay), the simulator's series are drawn dashed beside the live ones."""
    plt = _pyplot()
    fig, axes = plt.subplots(5, 1, figsize=(10, 13), sharex=True, constrained_layout=True)
    x = _minutes(timeline)
    main = live_label if simulated is not None else "simulated"
    ax = axes[0]
    ax.plot(x, timeline.instances, color="#2563eb", label=main)
    if simulated is not None:
        ax.plot(_minutes(simulated), simulated.instances, "--", color="#ea580c", label="simulated")
    ax.set_ylabel("instances alive")
    ax.set_title("Instances")
    ax.legend(loc="upper right")

    ax = axes[1]
    held = [n for n, series in timeline.tiers.items() if any(series)]  # tiers some function was in
    names = [n for n in TIER_COLORS if n in held] + [n for n in held if n not in TIER_COLORS]
    ax.stackplot(
        x,
        [timeline.tiers[n] for n in names],
        labels=[f"{n} ({main})" for n in names],
        colors=[TIER_COLORS.get(n, "#cbd5e1") for n in names],
        alpha=0.8,
    )
    if simulated is not None and "warm" in simulated.tiers:
        ax.plot(_minutes(simulated), simulated.tiers["warm"], "--", color="#111827", label="warm (simulated)")
    ax.set_ylabel("functions")
    ax.set_title("Functions by tier of readiness")
    ax.legend(loc="upper right", fontsize=8, ncol=2)

    ax = axes[2]
    width = (x[1] - x[0]) if len(x) > 1 else 1.0
    ax.bar(x, timeline.cold_starts, width=width, align="edge", color="#dc2626", alpha=0.7, label=main)
    if simulated is not None:
        ax.step(_minutes(simulated), simulated.cold_starts, where="post", color="#111827", label="simulated")
    ax.set_ylabel("cold starts per bucket")
    ax.set_title(f"Cold starts ({sum(timeline.cold_starts):.0f} in all)")
    ax.legend(loc="upper right")

    ax = axes[3]
    for kind, series in timeline.memory_gb.items():
        ax.plot(x, series, label=f"{kind} ({main})")
    if simulated is not None:
        for kind, series in simulated.memory_gb.items():
            ax.plot(_minutes(simulated), series, "--", label=f"{kind} (simulated)")
    ax.set_ylabel("memory held (GiB)")
    ax.set_title("Memory held (declared, per instance; live: also what is kept resident)")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[4]
    ax.plot(x, timeline.cost_usd, color="#111827", label=f"SMSS ({main})")
    ax.plot(x, timeline.container_cost_usd, "--", color="#dc2626", label="always-on containers")
    if simulated is not None:
        ax.plot(_minutes(simulated), simulated.cost_usd, ":", color="#ea580c", label="SMSS (simulated)")
    ax.set_ylabel("cost, cumulative (US$)")
    ax.set_xlabel("time since the start (minutes)")
    ax.set_title("Cost against always-on containers")
    ax.legend(loc="upper left")
    fig.suptitle(title)
    return _save(fig, path, plt)


def bar_figure(
    path: Path,
    title: str,
    groups: Sequence[str],
    bars: Mapping[str, Sequence[float | None]],
    *,
    ylabel: str,
    log: bool = False,
) -> Path:
    """A grouped bar chart: one group per entry of ``groups``, one bar per key of
    ``bars`` (its values in group order; None: no bar), each labelled with its value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups) + 3), 5), constrained_layout=True)
    n = max(len(bars), 1)
    width = 0.8 / n
    for i, (label, values) in enumerate(bars.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        kept = [(xv, v) for xv, v in zip(xs, values, strict=True) if v is not None]
        if not kept:
            continue
        rects = ax.bar([k[0] for k in kept], [k[1] for k in kept], width=width, label=label)
        ax.bar_label(rects, labels=[_value(k[1]) for k in kept], fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=8, frameon=False)
    return _save(fig, path, plt)


def _value(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def cold_start_figure(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``smss bench cold-start``: per model, a container-style start against SMSS's
    cold starts (weights cached and not), a warm request and Ray Serve's cold start."""
    keys = {
        "container-style start": "naive_ms",
        "SMSS cold, weights not cached": "cold_uncached_ms",
        "SMSS cold, weights cached": "cold_ms",
        "warm request": "warm_ms",
        "Ray Serve cold": "ray_serve_cold_ms",
    }
    bars = {label: [r.get(key) for r in rows] for label, key in keys.items()}
    bars = {k: v for k, v in bars.items() if any(x is not None for x in v)}
    return bar_figure(
        path,
        "Cold start: first request latency",
        [str(r["model"]) for r in rows],
        bars,
        ylabel="latency (ms, log scale)",
        log=True,
    )


def _save(fig: Any, path: Path, plt: Any) -> Path:
    path = Path(path)
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as e:
        raise InvalidSpec(f"cannot write the plot to {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path
