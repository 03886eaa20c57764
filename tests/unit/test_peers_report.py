"""``smss bench peers``: the output assembled from what each system measured (no servers),
the placement every system gets, and the load generator's phase syntax."""

from __future__ import annotations

from typing import Any

import pytest

from smss.bench.loadgen import Phase, parse_phases
from smss.bench.peers import report
from smss.bench.peers.common import ModelInfo
from smss.bench.peers.launch import Placement
from smss.bench.peers.venvs import NOT_SET_UP


def _point(rps: float, p99: float, errors: int = 0) -> dict[str, Any]:
    return {"rps": rps, "p50_ms": p99 / 4, "p90_ms": p99 / 2, "p99_ms": p99, "errors": errors, "statuses": {}}


def _burst(p99s: list[float], total: float) -> dict[str, Any]:
    return {
        "phases": [{"clients": c, "p99_ms": p} for c, p in zip([1, 32, 1], p99s, strict=True)],
        "total": {"p99_ms": total, "errors": 0},
    }


def _system(
    points: dict[str, dict[str, dict[str, Any]]], burst: dict[str, Any] | None = None
) -> dict[str, Any]:
    model: dict[str, Any] = {"settings": {"workers": 1}, "startup_s": 1.0, "points": points}
    if burst:
        model["bursty"] = burst
    return {"version": {"x": "1"}, "models": {"mlp": model}}


SYSTEMS: dict[str, Any] = {
    "smss": _system(
        {
            "json": {"1": _point(1000, 2.0), "32": _point(6000, 20.0)},
            "binary": {"1": _point(1200, 1.5), "32": _point(9000, 10.0)},
        },
        _burst([2.0, 30.0, 2.0], 25.0),
    ),
    "kserve": _system({"json": {"1": _point(500, 4.0), "32": _point(1500, 80.0)}}, _burst([4, 90, 4], 85.0)),
    "container": _system({"json": {"1": _point(2000, 1.0), "32": _point(3000, 10.0)}}),
    "mlserver": {"error": NOT_SET_UP},
    "ray_serve": {"version": None, "models": {"mlp": {"settings": {}, "error": "TimeoutError: no answer"}}},
}


def _assembled() -> dict[str, Any]:
    return report.assemble(SYSTEMS, ["mlp"], [1, 32], {"duration_s": 1.0})


def test_one_row_per_system_model_body_and_concurrency() -> None:
    rows = _assembled()["results"]
    keys = {(r["system"], r["model"], r["body"], r["concurrency"]) for r in rows}
    assert keys == {
        ("smss", "mlp", "json", 1),
        ("smss", "mlp", "json", 32),
        ("smss", "mlp", "binary", 1),
        ("smss", "mlp", "binary", 32),
        ("kserve", "mlp", "json", 1),
        ("kserve", "mlp", "json", 32),
        ("container", "mlp", "json", 1),
        ("container", "mlp", "json", 32),
    }
    for row in rows:
        assert {"rps", "p50_ms", "p99_ms", "errors"} <= row.keys()


def test_the_comparison_is_smss_over_each_peer_at_32_clients_on_json_bodies() -> None:
    (c,) = _assembled()["comparison"]
    assert (c["model"], c["concurrency"], c["body"]) == ("mlp", 32, "json")
    # rps: SMSS's over the peer's; p99: SMSS's over the peer's (below 1: SMSS's tail is lower).
    assert c["smss_vs_kserve_rps"] == 4.0
    assert c["smss_vs_kserve_p99_ratio"] == 0.25
    assert c["smss_vs_container_rps"] == 2.0
    assert c["smss_vs_container_p99_ratio"] == 2.0
    # not measured (not set up, failed, not chosen): null, never a guess
    for peer in ("ray_serve", "mlserver", "container_per_core"):
        assert c[f"smss_vs_{peer}_rps"] is None
        assert c[f"smss_vs_{peer}_p99_ratio"] is None


def test_every_ratio_field_is_named_as_the_issue_names_it() -> None:
    (c,) = _assembled()["comparison"]
    peers = ("ray_serve", "kserve", "mlserver", "container", "container_per_core")
    assert set(c) == {"model", "concurrency", "body"} | {
        f"smss_vs_{p}_{suffix}" for p in peers for suffix in ("rps", "p99_ratio")
    }


def test_without_smss_there_is_no_ratio() -> None:
    others = {k: v for k, v in SYSTEMS.items() if k != "smss"}
    (c,) = report.assemble(others, ["mlp"], [1, 32], {})["comparison"]
    assert all(v is None for k, v in c.items() if k.startswith("smss_vs_"))


def test_the_comparison_falls_back_to_the_highest_concurrency_measured() -> None:
    assert report.compare_at([1, 8, 32]) == 32
    assert report.compare_at([1, 8]) == 8
    (c,) = report.assemble(SYSTEMS, ["mlp"], [1], {})["comparison"]
    assert c["concurrency"] == 1
    assert c["smss_vs_container_rps"] == 0.5


def test_ratio_of_nothing_or_of_zero_is_none() -> None:
    assert report.ratio(None, 1.0) is None
    assert report.ratio(1.0, None) is None
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(1.0, 3.0) == 0.333


def test_bursty_gives_each_measured_systems_p99() -> None:
    (b,) = _assembled()["bursty"]
    assert b["model"] == "mlp"
    assert b["clients"] == [1, 32, 1]
    assert b["p99_ms"] == {"smss": 25.0, "kserve": 85.0}
    assert b["phase_p99_ms"]["smss"] == [2.0, 30.0, 2.0]


def test_systems_keep_their_settings_and_errors() -> None:
    systems = _assembled()["systems"]
    assert systems["mlserver"] == {"error": "not set up: run smss bench peers --setup"}
    assert systems["ray_serve"]["models"]["mlp"]["error"] == "TimeoutError: no answer"
    assert systems["kserve"]["models"]["mlp"]["settings"] == {"workers": 1}
    assert "points" not in systems["kserve"]["models"]["mlp"]  # those are the rows
    assert systems["kserve"]["models"]["mlp"]["bursty"]["total"]["p99_ms"] == 85.0


def _info(max_instances: int) -> ModelInfo:
    return ModelInfo("m", "m.py", "M", "m.safetensors", "x", (1, 4), "y", 8, 2.0, 8, max_instances)


def test_placement_keeps_the_last_core_for_the_load_generator() -> None:
    p = Placement.of([3, 0, 2, 1])
    assert p.server_cores == (0, 1, 2)
    assert p.loadgen_core == 3
    assert p.taskset() == ["taskset", "-c", "0,1,2"]
    assert p.loadgen_taskset() == ["taskset", "-c", "3"]
    assert p.max_instances(_info(4)) == 3  # at most one per server core
    assert p.max_instances(_info(2)) == 2  # and no more than the model's spec
    assert p.env()["OMP_NUM_THREADS"] == "1"
    assert p.describe()["shared_core"] is False


def test_one_core_is_shared() -> None:
    p = Placement.of([5])
    assert (p.server_cores, p.loadgen_core) == ((5,), 5)
    assert p.describe()["shared_core"] is True


def test_phases_parse() -> None:
    assert parse_phases("32:3:warmup,1:10,32:2.5") == [
        Phase(32, 3.0, record=False),
        Phase(1, 10.0),
        Phase(32, 2.5),
    ]
    for bad in ("", "0:1", "1:0", "1:1:later", "x:1"):
        with pytest.raises(ValueError):  # noqa: PT011 (each is a different bad input)
            parse_phases(bad)
