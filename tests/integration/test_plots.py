"""``--plot``: the figures are PNG files of the expected size, drawn from series that add
up to the figures printed beside them."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from smss.sim.config import SimConfig
from smss.sim.simulator import simulate
from smss.sim.timeline import BUCKETS, Sample, from_samples, simulate_recorded, tier_of

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT / "traces" / "azure_like_small_20min.csv"


def _matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("matplotlib is missing: the plots extra is part of .[all]")
        pytest.skip("matplotlib is not installed (pip install 'smss[plots]')")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def test_the_recorded_timeline_adds_up_to_the_figures() -> None:
    config = SimConfig(policy="fixed:60")
    out, timeline = simulate_recorded(TRACE, config)
    plain = simulate(TRACE, config)
    assert {k: v for k, v in out.items() if "wall" not in k} == {
        k: v for k, v in plain.items() if "wall" not in k
    }
    assert len(timeline.t_s) == BUCKETS
    assert sum(timeline.cold_starts) == out["cold_starts"]
    assert timeline.cost_usd[-1] == pytest.approx(out["cost_usd"], rel=1e-3)
    assert timeline.container_cost_usd[-1] == pytest.approx(out["container_cost_usd"], rel=1e-6)
    assert max(timeline.instances) >= 1
    functions = int(out["functions"])  # type: ignore[call-overload]
    assert all(
        w + c == functions for w, c in zip(timeline.tiers["warm"], timeline.tiers["cold"], strict=True)
    )


def test_simulate_plot_writes_a_png(tmp_path: Path) -> None:
    _matplotlib()
    path = tmp_path / "sim.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smss.cli",
            "simulate",
            str(TRACE),
            "--policy",
            "hybrid",
            "--json",
            "--plot",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("{")  # stdout holds the JSON only
    assert png_size(path) == (1000, 1300)
    assert path.stat().st_size > 20_000  # drawn, not blank


def test_a_live_timeline_from_samples(tmp_path: Path) -> None:
    fn = {"name": "f", "generation": 1, "instances": [], "starting": 0}
    warm = {**fn, "instances": [{"id": "f-1"}]}
    placed = [
        {"kind": "instance", "cpu": {"memory_mb": 512}, "gpu": {"gpu_memory_mb": 0}},
        {"kind": "template", "cpu": {"memory_mb": 20}, "gpu": {"gpu_memory_mb": 0}},
    ]
    store = {"local": {"models": ["f@g1"], "templates": {"f@g1": {"pid": 1}}}}
    samples = [
        Sample(0.0, [fn], [], {}, {"total": {"cost_usd": 1.0}}),
        Sample(5.0, [warm], [{"placed": placed}], store, {"total": {"cost_usd": 1.5}}),
        Sample(8.0, [fn], [{"placed": placed[1:]}], store, {"total": {"cost_usd": 1.75}}),
    ]
    timeline = from_samples(samples, [4.9, 5.1], period_s=10.0, container_cost_usd=2.0)
    assert sum(timeline.cold_starts) == 2
    assert (timeline.instances[0], timeline.instances[110], timeline.instances[-1]) == (0, 1, 0)
    assert (timeline.tiers["cold"][0], timeline.tiers["warm"][110]) == (1, 1)
    assert timeline.tiers["standby"][-1] == 1
    assert timeline.memory_gb["instances"][110] == 0.5
    assert timeline.cost_usd[-1] == 0.75  # since the replay began
    assert timeline.container_cost_usd[-1] == pytest.approx(2.0)
    _matplotlib()
    from smss import plots

    path = plots.timeline_figure(tmp_path / "replay.png", "replay", timeline, timeline)
    assert png_size(path) == (1000, 1300)


def test_a_reported_tier_wins_over_the_derived_one() -> None:
    fn = {"name": "f", "generation": 2, "instances": [], "starting": 0}
    assert tier_of(fn, {}) == "cold"
    assert tier_of(fn, {"n": {"models": ["f@g2"], "templates": {}}}) == "resident"
    assert tier_of({**fn, "tier": "standby"}, {}) == "standby"


def test_cold_start_bars(tmp_path: Path) -> None:
    _matplotlib()
    from smss import plots

    rows = [
        {
            "model": "cnn",
            "naive_ms": 2500.0,
            "cold_ms": 9.0,
            "cold_uncached_ms": 40.0,
            "warm_ms": 2.0,
            "ray_serve_cold_ms": None,
        },
        {
            "model": "cnn_large",
            "naive_ms": 4000.0,
            "cold_ms": 12.0,
            "cold_uncached_ms": 300.0,
            "warm_ms": 5.0,
            "ray_serve_cold_ms": None,
        },
    ]
    path = plots.cold_start_figure(tmp_path / "cold.png", rows)
    width, height = png_size(path)
    assert (width, height) == (740, 500)
    assert path.stat().st_size > 10_000
