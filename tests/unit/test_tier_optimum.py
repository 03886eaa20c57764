"""The tiered policy's windows on hand-made idle-time histograms."""

from __future__ import annotations

import math

import numpy as np

from smss.control.cost import PriceTable
from smss.control.tier_optimum import BINS, MAX_SPARES, Curve, Prices, bin_of, optimise, shared_lambda
from smss.control.tiered import LatencyObjective, TieredKeepAlive
from smss.control.tiers import Tier, TierProfile
from smss.spec import Resources

P = PriceTable()


def prices(objective_ms: float = 10.0, profile: TierProfile | None = None) -> Prices:
    rate = 1.0 * P.usd_per_vcpu_second + 0.5 * P.usd_per_gb_second
    return Prices(
        profile or TierProfile(), rate, P.usd_per_gb_second / 1024, P.usd_per_vcpu_second, objective_ms
    )


def histogram(gaps: list[float], prior: float = 0.0) -> np.ndarray:
    h = np.zeros(BINS)
    for g in gaps:
        h[bin_of(g)] += 1
    h[-1] += prior
    return h


NO_SURPLUS = np.zeros((MAX_SPARES, BINS))


def test_with_a_lax_objective_a_rarely_called_function_steps_down() -> None:
    # Idle 10 minutes between calls: the template and weights are not worth holding
    # when a 250 ms start is within the objective.
    w = optimise(histogram([600.0] * 50), NO_SURPLUS, prices(objective_ms=5000.0), 0.005, 0.25)
    assert w.warm_s < 1.0
    assert w.standby_s < 600.0
    assert w.resident_s < 600.0


def test_with_a_strict_objective_it_stays_in_standby_unless_its_idle_times_allow() -> None:
    # 50 calls and one unknown: stepping down would make that one slow, 2 % > 0.5 %.
    w = optimise(histogram([600.0] * 50, prior=1.0), NO_SURPLUS, prices(), 0.005, 0.25)
    assert math.isinf(w.standby_s)
    # 2000 calls 1 s apart: after a few seconds idle, stepping down bets on a gap it never saw.
    w = optimise(histogram([1.0] * 2000, prior=1.0), NO_SURPLUS, prices(), 0.005, 0.25)
    assert 1.0 < w.standby_s < 60.0
    assert w.standby_s <= w.resident_s <= w.cold_s


def test_a_function_called_every_100_ms_keeps_its_instance_through_the_spare_refill() -> None:
    # A restart within the refill time would fork without a spare: slower than 10 ms.
    w = optimise(histogram([0.1] * 1000, prior=1.0), NO_SURPLUS, prices(), 0.005, 0.25)
    assert w.warm_s >= 0.1


def test_spares_cover_the_longest_burst_seen() -> None:
    surplus = np.zeros((MAX_SPARES, BINS))
    surplus[2, bin_of(5.0)] = 40  # third arrivals of bursts, 5 s after the last third
    curve = Curve(histogram([5.0] * 400, prior=1.0), surplus, prices(), 0.25)
    windows, _ = curve.solve(shared_lambda([curve], 0.005))
    assert windows.spares >= 3


def test_one_price_for_a_slow_arrival_spends_the_budget_where_it_saves_most() -> None:
    # A busy function with a long tail and a quiet one: a shared lambda lets the
    # platform's slow arrivals go where a step down saves the most memory.
    busy = Curve(histogram([1.0] * 5000 + [900.0] * 20, prior=1.0), NO_SURPLUS, prices(), 0.25)
    quiet = Curve(histogram([900.0] * 30, prior=1.0), NO_SURPLUS, prices(), 0.25)
    lam = shared_lambda([busy, quiet], 0.005)
    slow = busy.solve(lam)[1] + quiet.solve(lam)[1]
    assert slow <= 0.005 * (busy.arrivals + quiet.arrivals) - 2 + 1e-9


def test_the_policy_answers_per_tier_by_the_time_since_the_last_call() -> None:
    # Ten minutes between calls and any start within the objective: nothing is worth
    # holding between calls (a start from no runtime, 1.8 s of an instance, costs less
    # than ten minutes of a zygote), so it steps all the way down at once.
    lax = TieredKeepAlive(600.0, objective=LatencyObjective(ms=5000.0))
    lax.describe("f", Resources(), 0.0)
    assert lax.tier_target("f", 0.0).ensure == Tier.STANDBY  # deployed: built ahead
    t = 0.0
    for _ in range(300):
        t += 600.0
        lax.on_invocation("f", t)
    assert lax.windows("f").cold_s == 0.0
    assert lax.tier_target("f", t + 1.0).keep == Tier.NO_RUNTIME
    # Called every second, with the strict default objective: standby, then down.
    strict = TieredKeepAlive(600.0)
    strict.describe("g", Resources(), 0.0)
    t = 0.0
    for _ in range(3000):
        t += 1.0
        strict.on_invocation("g", t)
    w = strict.windows("g")
    early = strict.tier_target("g", t + 0.5 * w.standby_s)
    assert early.keep == Tier.STANDBY
    assert early.ensure == Tier.NO_RUNTIME  # called before: nothing is built ahead
    assert early.until == t + w.standby_s
    assert strict.tier_target("g", t + w.cold_s + 1.0).keep == Tier.NO_RUNTIME
