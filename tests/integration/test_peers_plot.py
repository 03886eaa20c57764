"""``smss bench peers --plot``: the comparison drawn as bar charts into a PNG of the expected
size, from a report as the bench assembles it (systems missing or failed included)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest

from smss.bench.peers import report

if os.environ.get("CI") == "true":  # in CI a missing plots extra fails, it does not skip
    import matplotlib  # noqa: F401
else:
    pytest.importorskip("matplotlib")
from smss.bench.peers.plot import draw


def _system(rps: float, p99: float) -> dict[str, Any]:
    point = {"rps": rps, "p50_ms": p99 / 3, "p90_ms": p99 / 2, "p99_ms": p99, "errors": 0}
    burst = {
        "phases": [{"clients": c, "p99_ms": p99} for c in (1, 32, 1)],
        "total": {"p99_ms": p99, "errors": 0},
    }
    model = {"points": {"json": {"1": point, "32": point}}, "bursty": burst}
    return {"models": {"mlp": model, "cnn": model}}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_writes_a_png_of_the_expected_size(tmp_path: Path) -> None:
    systems = {
        "smss": _system(6000, 20),
        "kserve": _system(800, 60),
        "container": _system(3000, 22),
        "mlserver": {"error": "not set up: run smss bench peers --setup"},
    }
    assembled = report.assemble(systems, ["mlp", "cnn"], [1, 32], {"models": ["mlp", "cnn"]})
    out = tmp_path / "peers.png"
    draw(assembled, out)
    assert _png_size(out) == (1100, 1000)  # one 5.5-inch column per model, 10 inches tall, 100 dpi
