"""Invocation traces (``traces/`` in the repository): CSV in, numpy arrays out.

A trace is a CSV file with a header row naming at least ``t_ms`` (arrival, ms from the
start), ``function`` (an id of 1-64 characters) and ``duration_ms`` (execution time,
ms); ``cluster`` (an integer) is optional and other columns are ignored. Rows must be
sorted by ``t_ms``. Every problem is an :class:`~smss.errors.InvalidSpec` naming the
file and, where it can, the row (data rows counted from 1, blank lines skipped).

Reading is numpy's C parser in chunks of lines, so memory stays bounded by the arrays
(about 24 bytes an invocation) however long the trace: about a million rows a second.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import numpy.typing as npt

from smss.errors import InvalidSpec

REQUIRED = ("t_ms", "function", "duration_ms")
_MAX_NAME = 64
_CHUNK = 250_000
_F64 = npt.NDArray[np.float64]
_I32 = npt.NDArray[np.int32]
_I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Trace:
    """Arrays of one trace, one entry per invocation, in arrival order.

    ``function`` holds indices into ``functions`` (names in order of first appearance);
    ``cluster`` is -1 where the trace has no cluster column."""

    t_ms: npt.NDArray[np.float64]
    function: npt.NDArray[np.int32]
    duration_ms: npt.NDArray[np.float64]
    cluster: npt.NDArray[np.int64]
    functions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.t_ms)

    @property
    def span_s(self) -> float:
        return float(self.t_ms[-1]) / 1000.0 if len(self.t_ms) else 0.0

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[float, str, float]]) -> Trace:
        """A trace from ``(t_ms, function, duration_ms)`` rows, checked like a file's."""
        ids: dict[str, int] = {}
        t: list[float] = []
        f: list[int] = []
        d: list[float] = []
        for t_ms, name, duration_ms in rows:
            if not 1 <= len(name) <= _MAX_NAME:
                raise InvalidSpec(f"trace: function id must be 1-{_MAX_NAME} characters, got {name!r}")
            t.append(t_ms)
            f.append(ids.setdefault(name, len(ids)))
            d.append(duration_ms)
        ta, da = np.asarray(t, dtype=np.float64), np.asarray(d, dtype=np.float64)
        _check("<rows>", ta, da)
        return cls(ta, np.asarray(f, dtype=np.int32), da, np.full(len(t), -1, dtype=np.int64), tuple(ids))


def read_trace(path: Path | str) -> Trace:
    path = Path(path)
    try:
        with path.open("r", encoding="utf-8", newline="") as fh:
            return _read(path, fh)
    except OSError as e:
        raise InvalidSpec(f"trace {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise InvalidSpec(f"trace {path}: not UTF-8 text ({e.reason})") from None


def _read(path: Path, fh: TextIO) -> Trace:
    header = fh.readline().removeprefix("\ufeff")
    columns = [c.strip() for c in header.strip().split(",")]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise InvalidSpec(
            f"trace {path}: header {header.strip()!r} lacks column(s) {', '.join(missing)}; "
            f"need {', '.join(REQUIRED)} (and optionally cluster)"
        )
    has_cluster = "cluster" in columns
    usecols = [columns.index(c) for c in (*REQUIRED, *(["cluster"] if has_cluster else []))]
    dtype = [("t", "f8"), ("f", f"U{_MAX_NAME + 1}"), ("d", "f8"), ("c", "i8")][: len(usecols)]
    ids: dict[str, int] = {}  # names numbered in order of first appearance
    parts: list[tuple[_F64, _I32, _F64, _I64]] = []
    row = 1  # of the chunk's first row (1-based, blank lines not counted)
    while chunk := list(itertools.islice(fh, _CHUNK)):
        lines = [x for x in chunk if not x.isspace()]
        if not lines:
            continue
        try:
            rows = np.loadtxt(lines, delimiter=",", usecols=usecols, dtype=dtype, ndmin=1, comments=None)
        except ValueError as e:
            raise InvalidSpec(f"trace {path}: rows {row}-{row + len(lines) - 1}: {e}") from None
        names = rows["f"]
        length = np.char.str_len(names)
        bad = (length == 0) | (length > _MAX_NAME)
        if bad.any():
            raise InvalidSpec(
                f"trace {path}: row {row + int(np.argmax(bad))}: function id must be 1-{_MAX_NAME} characters"
            )
        # A dict is several times faster than np.unique's sort of fixed-width strings.
        f = np.fromiter(
            (ids.setdefault(x, len(ids)) for x in names.tolist()), dtype=np.int32, count=len(rows)
        )
        cluster = rows["c"].copy() if has_cluster else np.full(len(rows), -1, dtype=np.int64)
        parts.append((rows["t"].copy(), f, rows["d"].copy(), cluster))
        row += len(lines)
    if not parts:
        empty = np.zeros(0)
        return Trace(empty, np.zeros(0, np.int32), empty, np.zeros(0, np.int64), ())
    t, function, d, cluster = (np.concatenate(col) for col in zip(*parts, strict=True))
    _check(path, t, d)
    return Trace(t, function.astype(np.int32), d, cluster.astype(np.int64), tuple(ids))


def _check(path: Path | str, t: _F64, d: _F64) -> None:
    def row_of(mask: npt.NDArray[np.bool_]) -> int:
        return int(np.argmax(mask)) + 1

    bad = ~np.isfinite(t) | (t < 0)
    if bad.any():
        raise InvalidSpec(f"trace {path}: row {row_of(bad)}: t_ms must be a finite number >= 0")
    bad = ~np.isfinite(d) | (d < 0)
    if bad.any():
        raise InvalidSpec(f"trace {path}: row {row_of(bad)}: duration_ms must be a finite number >= 0")
    back = np.diff(t) < 0
    if back.any():
        raise InvalidSpec(
            f"trace {path}: row {row_of(back) + 1}: rows must be sorted by t_ms "
            f"({t[np.argmax(back) + 1]} comes after {t[np.argmax(back)]})"
        )


def peak_concurrency(trace: Trace) -> npt.NDArray[np.int64]:
    """Per function, the most invocations in progress at once if each ran from its
    arrival for its duration with no wait: the concurrency the trace offers, which
    always-on containers must serve without queueing. A request ending exactly when
    another arrives does not overlap it."""
    n = len(trace)
    peaks = np.zeros(len(trace.functions), dtype=np.int64)
    if n == 0:
        return peaks
    times = np.concatenate([trace.t_ms, trace.t_ms + trace.duration_ms])
    steps = np.concatenate([np.ones(n, dtype=np.int64), -np.ones(n, dtype=np.int64)])
    funcs = np.concatenate([trace.function, trace.function])
    order = np.lexsort((steps, times, funcs))  # by function, then time, ends first
    # The running sum crosses function blocks, but each function's steps sum to zero,
    # so within its block the sum is that function's own concurrency.
    np.maximum.at(peaks, funcs[order], np.cumsum(steps[order]))
    return peaks
