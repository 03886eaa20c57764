"""The meter on virtual time: lifetimes add up, busy time is a union, snapshots round-trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.control.metering import FunctionUsage, Meter, UsageSnapshot, decode_snapshot
from smss.spec import Resources

SMALL = Resources(cpu=0.5, memory_mb=512, gpu=0.25)

# One instance: (function, start, lifetime or None = still alive, requests as (offset, length))
_instance = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.floats(0, 1000, allow_nan=False),
    st.one_of(st.none(), st.floats(0, 500, allow_nan=False)),
    st.lists(st.tuples(st.floats(0, 600, allow_nan=False), st.floats(0, 100, allow_nan=False)), max_size=6),
)


Instances = list[tuple[str, float, float | None, list[tuple[float, float]]]]


def _replay(instances: Instances) -> tuple[Meter, dict[str, int]]:
    """Feed every event in time order, as the controller would; also answer how many
    requests each function got."""
    events: list[tuple[float, int, str, str]] = []
    requests_of: dict[str, int] = {}
    for n, (fn, start, life, requests) in enumerate(instances):
        iid = f"i{n}"
        end = None if life is None else start + life
        events.append((start, 0, "start", f"{iid}/{fn}"))
        for offset, length in requests:
            t0 = start + offset
            t1 = t0 + length
            if end is not None and t1 > end:
                continue  # requests finish before their instance stops
            requests_of[fn] = requests_of.get(fn, 0) + 1
            events.append((t0, 1, "req+", f"{iid}/{fn}"))
            events.append((t1, 0, "req-", f"{iid}/{fn}"))
        if end is not None:
            events.append((end, 2, "stop", f"{iid}/{fn}"))
    events.sort(key=lambda e: (e[0], e[1]))
    meter = Meter()
    for t, _, kind, key in events:
        iid, fn = key.split("/")
        if kind == "start":
            meter.instance_started(iid, fn, SMALL, t)
        elif kind == "stop":
            meter.instance_stopped(iid, t)
        elif kind == "req+":
            meter.request_started(fn, iid, t)
        else:
            meter.request_finished(fn, iid, t)
    return meter, requests_of


@settings(max_examples=200, deadline=None)
@given(st.lists(_instance, max_size=12))
def test_alive_seconds_are_the_sum_of_instance_lifetimes(instances: Instances) -> None:
    meter, requests_of = _replay(instances)
    now = 2000.0  # after every start and stop
    usage = meter.usage(now)
    for fn in {i[0] for i in instances}:
        lifetimes = [
            (life if life is not None else now - start) for f, start, life, _ in instances if f == fn
        ]
        u = usage[fn]
        assert u.alive_s == pytest.approx(sum(lifetimes), rel=1e-9, abs=1e-6)
        assert u.memory_gb_s == pytest.approx(u.alive_s * 0.5, rel=1e-9, abs=1e-6)
        assert u.cpu_s == pytest.approx(u.alive_s * 0.5, rel=1e-9, abs=1e-6)
        assert u.gpu_s == pytest.approx(u.alive_s * 0.25, rel=1e-9, abs=1e-6)
        assert 0 <= u.busy_s <= u.alive_s + 1e-6
        assert u.instances_started == len(lifetimes)
        assert 1 <= u.peak_instances <= len(lifetimes)
        assert u.invocations == requests_of.get(fn, 0)
        assert (u.peak_concurrency > 0) == (u.invocations > 0)


def test_busy_time_is_the_union_of_requests_in_flight() -> None:
    meter = Meter()
    meter.instance_started("i", "f", SMALL, 0.0)
    meter.request_started("f", "i", 1.0)
    meter.request_started("f", "i", 2.0)  # overlaps the first
    meter.request_finished("f", "i", 3.0)
    meter.request_finished("f", "i", 4.0)  # busy 1..4
    meter.request_started("f", "i", 6.0)
    meter.request_finished("f", "i", 7.0)  # busy 6..7
    meter.instance_stopped("i", 10.0)
    u = meter.usage(20.0)["f"]
    assert u.alive_s == 10.0
    assert u.busy_s == 4.0
    assert u.idle_s == 6.0
    assert u.invocations == 3
    assert u.peak_concurrency == 2
    assert u.peak_instances == 1


def test_live_instances_count_up_to_now() -> None:
    meter = Meter()
    meter.instance_started("i", "f", Resources(memory_mb=2048), 5.0)
    meter.request_started("f", "i", 6.0)
    u = meter.usage(10.0)["f"]
    assert (u.alive_s, u.busy_s, u.memory_gb_s) == (5.0, 4.0, 10.0)
    assert meter.in_flight("f") == 1


def test_peaks_count_instances_and_requests_of_one_function() -> None:
    meter = Meter()
    for n in range(3):
        meter.instance_started(f"i{n}", "f", SMALL, float(n))
        meter.request_started("f", f"i{n}", float(n))
    meter.instance_started("g0", "g", SMALL, 0.0)
    for n in range(3):
        meter.request_finished("f", f"i{n}", 10.0)
        meter.instance_stopped(f"i{n}", 10.0)
    meter.instance_started("i9", "f", SMALL, 11.0)
    usage = meter.usage(12.0)
    assert (usage["f"].peak_instances, usage["f"].peak_concurrency, usage["f"].instances_started) == (3, 3, 4)
    assert (usage["g"].peak_instances, usage["g"].invocations) == (1, 0)


def test_stopping_with_requests_in_flight_ends_them() -> None:
    meter = Meter()
    meter.instance_started("i", "f", SMALL, 0.0)
    meter.request_started("f", "i", 1.0)
    meter.instance_stopped("i", 3.0)  # crashed or killed mid-request
    meter.request_finished("f", "i", 5.0)  # the late answer changes nothing
    meter.instance_stopped("i", 6.0)  # a second stop is ignored
    u = meter.usage(10.0)["f"]
    assert (u.alive_s, u.busy_s, u.invocations) == (3.0, 2.0, 1)
    assert meter.in_flight("f") == 0


def test_time_never_runs_backwards_for_an_instance() -> None:
    meter = Meter()
    meter.instance_started("i", "f", SMALL, 10.0)
    meter.request_started("f", "i", 12.0)
    meter.request_finished("f", "i", 11.0)  # reported out of order: taken as 12
    meter.instance_stopped("i", 9.0)  # taken as 12
    u = meter.usage(20.0)["f"]
    assert (u.alive_s, u.busy_s) == (2.0, 0.0)


def test_unknown_instances_count_invocations_only() -> None:
    meter = Meter()
    meter.request_started("f", "ghost", 1.0)
    meter.request_finished("f", "ghost", 2.0)
    u = meter.usage(3.0)["f"]
    assert (u.invocations, u.alive_s, u.busy_s) == (1, 0.0, 0.0)


def test_an_instance_is_metered_once() -> None:
    meter = Meter()
    meter.instance_started("i", "f", SMALL, 0.0)
    with pytest.raises(ValueError, match="already metered"):
        meter.instance_started("i", "f", SMALL, 1.0)


def test_snapshot_round_trips_as_json_and_seeds_a_new_meter() -> None:
    meter = Meter()
    meter.instance_started("i", "f", SMALL, 0.0)
    meter.request_started("f", "i", 1.0)
    meter.request_finished("f", "i", 2.0)
    snap = meter.snapshot(4.0)
    assert isinstance(snap, UsageSnapshot)
    assert decode_snapshot(snap.to_json()) == snap
    builtins = snap.to_builtins()
    assert builtins["at"] == 4.0
    assert builtins["functions"]["f"]["alive_s"] == 4.0  # type: ignore[index]

    resumed = Meter(base=snap)  # after a restart: totals carry over, instances do not
    resumed.instance_started("j", "f", SMALL, 100.0)
    u = resumed.usage(101.0)["f"]
    assert (u.alive_s, u.invocations, u.instances_started) == (5.0, 1, 2)
    assert u == FunctionUsage(
        alive_s=5.0,
        busy_s=1.0,
        invocations=1,
        cpu_s=2.5,
        memory_gb_s=2.5,
        gpu_s=1.25,
        peak_concurrency=1,
        peak_instances=1,
        instances_started=2,
        resources=SMALL,
    )
