"""Trace files: the columns, the order, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smss.errors import InvalidSpec
from smss.sim.trace import Trace, peak_concurrency, read_trace

SHARED = Path(__file__).resolve().parents[2] / "traces"  # the sample traces shipped in the repository


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.csv"
    path.write_text(text)
    return path


def test_reads_columns_and_numbers_functions_in_order_of_first_appearance(tmp_path: Path) -> None:
    path = write(tmp_path, "t_ms,function,duration_ms,cluster\n1.5,zeta,10,3\n2,alpha,20,4\n\n3,zeta,30,3\n")
    trace = read_trace(path)
    assert len(trace) == 3
    assert trace.functions == ("zeta", "alpha")
    assert trace.function.tolist() == [0, 1, 0]
    assert trace.t_ms.tolist() == [1.5, 2.0, 3.0]
    assert trace.duration_ms.tolist() == [10.0, 20.0, 30.0]
    assert trace.cluster.tolist() == [3, 4, 3]
    assert trace.span_s == pytest.approx(0.003)


def test_columns_may_come_in_any_order_and_cluster_is_optional(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "function,extra,duration_ms,t_ms\nf,x,5,0\ng,y,6,7\n"))
    assert trace.functions == ("f", "g")
    assert trace.t_ms.tolist() == [0.0, 7.0]
    assert trace.cluster.tolist() == [-1, -1]


def test_an_empty_trace_has_no_rows(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "t_ms,function,duration_ms\n"))
    assert len(trace) == 0
    assert trace.functions == ()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("time,function,duration_ms\n0,f,1\n", "lacks column\\(s\\) t_ms"),
        ("t_ms,function,duration_ms\n5,f,1\n4,f,1\n", "row 2: rows must be sorted by t_ms"),
        ("t_ms,function,duration_ms\n0,f,-1\n", "row 1: duration_ms must be"),
        ("t_ms,function,duration_ms\n-3,f,1\n", "row 1: t_ms must be"),
        ("t_ms,function,duration_ms\n0,f,abc\n", "rows 1-1"),
        ("t_ms,function,duration_ms\n0,f\n", "rows 1-1"),
        ("t_ms,function,duration_ms\n0,,1\n", "function id must be 1-64"),
        (f"t_ms,function,duration_ms\n0,{'x' * 65},1\n", "function id must be 1-64"),
    ],
)
def test_bad_traces_are_refused_clearly(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match):
        read_trace(write(tmp_path, text))


def test_a_missing_file_is_an_invalid_spec(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="cannot read"):
        read_trace(tmp_path / "nope.csv")


def test_from_rows_checks_like_a_file() -> None:
    assert Trace.from_rows([(0.0, "f", 1.0), (1.0, "g", 1.0)]).functions == ("f", "g")
    with pytest.raises(InvalidSpec, match="sorted"):
        Trace.from_rows([(5.0, "f", 1.0), (1.0, "f", 1.0)])


def test_peak_concurrency_is_the_most_overlapping_invocations() -> None:
    trace = Trace.from_rows(
        [(0, "a", 10), (5, "a", 10), (8, "b", 1), (10, "a", 1), (15, "a", 5), (20, "b", 0)]
    )
    # a: [0,10) [5,15) [10,11) [15,20): at most 2 at once (an end and a start at 10 do not overlap)
    assert peak_concurrency(trace).tolist() == [2, 1]


def test_reads_the_shared_dev_trace() -> None:
    trace = read_trace(SHARED / "azure_like_dev_30min.csv")
    assert len(trace) == 23_590
    assert len(trace.functions) == 87
    assert trace.functions[0] == "f000"
    assert np.all(np.diff(trace.t_ms) >= 0)


def test_an_orcbench_trace_is_converted_to_the_platforms_format(tmp_path: Path) -> None:
    from smss.sim.orcbench import convert

    raw = tmp_path / "raw.csv"
    raw.write_text(
        "Logical Time Clock (minutes), Function ID, Runtime (ms), Model"
        "0.5, bbb, 56.5, 0-model\n0.25, aaa, 0.2, 18-model\n1.0, bbb, 10, 3-model\n"
    )
    trace = convert(raw, tmp_path / "out.csv")
    assert trace.functions == ("f000", "f001")  # in order of first appearance, by time
    assert trace.t_ms.tolist() == [15_000.0, 30_000.0, 60_000.0]
    assert trace.duration_ms.tolist() == [1.0, 56.5, 10.0]  # at least 1 ms
    assert trace.function.tolist() == [0, 1, 1]


def test_a_file_that_is_not_an_orcbench_trace_is_refused(tmp_path: Path) -> None:
    from smss.sim.orcbench import convert

    raw = tmp_path / "raw.csv"
    raw.write_text("t_ms,function,duration_ms\n1,f,1\n")
    with pytest.raises(InvalidSpec, match="not an OrcBench trace"):
        convert(raw, tmp_path / "out.csv")
