"""Traces generated with OrcBench (``orcbench trace``) in the platform's trace format.

OrcBench writes ``Logical Time Clock (minutes), Function ID, Runtime (ms), Model``
rows (its header has no line break before the first row); this writes the CSV that
:func:`smss.sim.trace.read_trace` reads: ``t_ms,function,duration_ms,cluster``,
functions renamed ``f000``, ``f001``, ... in order of first appearance, rows sorted
by time, durations at least 1 ms, the cluster from the model's ``N-model`` name.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from smss.errors import InvalidSpec
from smss.sim.trace import Trace, read_trace

_HEADER = "Logical Time Clock (minutes), Function ID, Runtime (ms), Model"
_CLUSTER = re.compile(r"^(\d+)-model$")


def convert(raw: Path, out: Path) -> Trace:
    """Convert OrcBench's ``raw`` trace to ``out``; the trace as read back."""
    try:
        text = raw.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidSpec(f"{raw}: cannot read it ({e.strerror or e})") from None
    if not text.startswith(_HEADER):
        raise InvalidSpec(f"{raw}: not an OrcBench trace (it must start with {_HEADER!r})")
    rows: list[tuple[float, str, float, int]] = []
    for n, line in enumerate(text[len(_HEADER) :].splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            raise InvalidSpec(f"{raw}: row {n} has {len(parts)} fields, not 4")
        try:
            t_ms, duration = float(parts[0]) * 60_000.0, max(float(parts[2]), 1.0)
        except ValueError:
            raise InvalidSpec(f"{raw}: row {n} has a time or runtime that is not a number") from None
        match = _CLUSTER.match(parts[3])
        rows.append((t_ms, parts[1], duration, int(match.group(1)) if match else -1))
    rows.sort(key=lambda r: r[0])
    names: dict[str, str] = {}
    with out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["t_ms", "function", "duration_ms", "cluster"])
        for t_ms, function, duration, cluster in rows:
            name = names.setdefault(function, f"f{len(names):03d}")
            writer.writerow([f"{t_ms:.3f}", name, f"{duration:.3f}", cluster])
    return read_trace(out)
