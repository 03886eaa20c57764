"""Pricing: the arithmetic, the always-on baseline, and the price file's checks."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from smss.control.cost import (
    ContainerSize,
    PriceTable,
    container_size,
    function_cost,
    load_prices,
    parse_prices,
    report,
)
from smss.control.metering import FunctionUsage
from smss.errors import InvalidSpec
from smss.spec import FunctionSpec, Resources, Scaling, TensorSpec

PRICES = PriceTable(
    usd_per_gb_second=0.001, usd_per_vcpu_second=0.01, usd_per_gpu_second=0.1, usd_per_million_requests=2.0
)
SIZE = Resources(cpu=2.0, memory_mb=2048, gpu=0.5)


def usage(**kw: float) -> FunctionUsage:
    alive = kw.get("alive_s", 100.0)
    return FunctionUsage(
        alive_s=alive,
        busy_s=kw.get("busy_s", 40.0),
        invocations=int(kw.get("invocations", 500_000)),
        cpu_s=alive * SIZE.cpu,
        memory_gb_s=alive * SIZE.memory_mb / 1024,
        gpu_s=alive * SIZE.gpu,
        peak_concurrency=int(kw.get("peak", 5)),
        peak_instances=3,
        instances_started=4,
        resources=SIZE,
    )


def test_serverless_cost_is_usage_times_prices() -> None:
    c = function_cost(usage(), PRICES, period_s=1000.0, size=ContainerSize(SIZE, concurrency=2))
    assert c.cpu_usd == pytest.approx(200 * 0.01)
    assert c.memory_usd == pytest.approx(200 * 0.001)
    assert c.gpu_usd == pytest.approx(50 * 0.1)
    assert c.request_usd == pytest.approx(0.5 * 2.0)
    assert c.cost_usd == pytest.approx(2.0 + 0.2 + 5.0 + 1.0)


def test_containers_are_sized_for_the_peak() -> None:
    c = function_cost(usage(peak=5), PRICES, period_s=1000.0, size=ContainerSize(SIZE, concurrency=2))
    assert c.containers == 3  # ceil(5 / 2)
    per_second = 2.0 * 0.01 + 2.0 * 0.001 + 0.5 * 0.1  # no per-request charge
    assert c.container_cost_usd == pytest.approx(3 * 1000.0 * per_second)
    assert c.cost_ratio == pytest.approx(c.cost_usd / c.container_cost_usd)


def test_a_function_never_invoked_needs_no_container() -> None:
    c = function_cost(usage(peak=0, invocations=0), PRICES, 1000.0, ContainerSize(SIZE, 1))
    assert c.containers == 0
    assert c.container_cost_usd == 0.0
    assert c.cost_ratio is None


def test_without_a_size_one_container_like_the_latest_instance() -> None:
    c = function_cost(usage(peak=7), PRICES, period_s=10.0, size=None)
    assert c.containers == 1
    assert c.container_cost_usd == pytest.approx(10.0 * (0.02 + 0.002 + 0.05))


def _spec(name: str, concurrency: int) -> FunctionSpec:
    t = TensorSpec("x", "FP32", (-1,))
    return FunctionSpec(
        name=name,
        inputs=(t,),
        outputs=(t,),
        entrypoint="m.py:M",
        scaling=Scaling(concurrency=concurrency),
        resources=SIZE,
    )


def test_report_per_function_and_in_total() -> None:
    usages = {"a": usage(peak=4), "b": usage(alive_s=10.0, peak=1, invocations=0)}
    r = report(usages, PRICES, 100.0, {"a": _spec("a", 4), "b": ContainerSize(SIZE, 1)})
    assert list(r.functions) == ["a", "b"]
    assert container_size(_spec("a", 4)) == ContainerSize(SIZE, 4)
    assert r.functions["a"].containers == 1
    assert r.functions["b"].containers == 1
    assert r.total.containers == 2
    assert r.total.cost_usd == pytest.approx(r.functions["a"].cost_usd + r.functions["b"].cost_usd)
    assert r.total.container_cost_usd == pytest.approx(
        r.functions["a"].container_cost_usd + r.functions["b"].container_cost_usd
    )
    assert r.total.cost_ratio == pytest.approx(r.total.cost_usd / r.total.container_cost_usd)
    assert r.total.invocations == 500_000
    data = msgspec.json.decode(msgspec.json.encode(r))
    assert data == r.to_builtins()
    assert data["total"]["containers"] == 2


def test_report_refuses_a_bad_period() -> None:
    with pytest.raises(InvalidSpec, match="period"):
        report({}, PRICES, -1.0, {})
    assert report({}, PRICES, 0.0, {}).total.cost_ratio is None


def test_default_prices_are_public_list_prices() -> None:
    p = load_prices(None)
    assert p == PriceTable()
    assert p.usd_per_vcpu_second * 3600 == pytest.approx(0.04048)  # Fargate vCPU-hour
    assert p.usd_per_gb_second * 3600 == pytest.approx(0.004445)  # Fargate GB-hour
    assert p.usd_per_million_requests == 0.20  # Lambda requests
    assert 0 < p.usd_per_gpu_second < 0.001


def test_price_file_overrides_some_keys(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("usd_per_gb_second = 0.5\nusd_per_million_requests = 0\n")
    p = load_prices(path)
    assert p.usd_per_gb_second == 0.5
    assert p.usd_per_million_requests == 0.0
    assert p.usd_per_vcpu_second == PriceTable().usd_per_vcpu_second


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("usd_per_gb_second = -1", "finite number >= 0"),
        ("usd_per_gb_second = nan", "finite number >= 0"),
        ("usd_per_gb_second = inf", "finite number >= 0"),
        ("usd_per_gb_sec = 1", "unknown keys \\['usd_per_gb_sec'\\]"),
        ("[prices]\nusd_per_gb_second = 1", "unknown keys"),
        ('usd_per_gb_second = "cheap"', "must be a number"),
        ("usd_per_gb_second = true", "must be a number"),
        ("usd_per_gb_second = ", "not valid TOML"),
    ],
)
def test_bad_price_files_are_refused(text: str, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match) as info:
        parse_prices(text, "p.toml")
    assert "p.toml" in info.value.message


def test_a_missing_price_file_is_an_invalid_spec(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="cannot read"):
        load_prices(tmp_path / "nope.toml")


def test_integers_are_prices_too() -> None:
    p = parse_prices("usd_per_gpu_second = 1")
    assert p.usd_per_gpu_second == 1.0
    assert isinstance(p.usd_per_gpu_second, float)
    assert math.isfinite(p.usd_per_gpu_second)
