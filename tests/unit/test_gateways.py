"""Gateways' load, merged for the controller: demand, instance views, deltas, expiry."""

from __future__ import annotations

from smss.control.gateways import FunctionLoad, GatewayLoads, GatewayReport, InstanceLoad
from smss.control.scaling import InstanceView


def _report(gw: str, seq: int, *insts: InstanceLoad, queued: int = 0, arrivals: int = 0) -> GatewayReport:
    return GatewayReport(gw, f"node-{gw}", seq, (FunctionLoad("mlp", 1, queued, arrivals, tuple(insts)),))


def test_demand_is_summed_over_gateways() -> None:
    loads = GatewayLoads()
    loads.update(_report("a", 1, InstanceLoad("i1", 2, None), queued=3), now=10.0)
    loads.update(_report("b", 1, InstanceLoad("i1", 1, None), InstanceLoad("i2", 0, 4.0)), now=10.0)
    assert loads.demand("mlp") == (3, 3)
    assert loads.demand("other") == (0, 0)


def test_an_instance_busy_anywhere_is_busy_and_idle_since_the_latest_finish() -> None:
    loads = GatewayLoads()
    loads.update(_report("a", 1, InstanceLoad("i1", 0, 5.0), InstanceLoad("i2", 1, None)), now=100.0)
    loads.update(_report("b", 1, InstanceLoad("i1", 0, 2.0)), now=100.0)
    views = [InstanceView("i1", 0, 90.0), InstanceView("i2", 0, 90.0), InstanceView("i3", 0, 50.0)]
    merged = {v.id: v for v in loads.merge("mlp", views)}
    assert merged["i1"] == InstanceView("i1", 0, 98.0)  # gateway b finished on it 2 s ago
    assert merged["i2"] == InstanceView("i2", 1, None)
    assert merged["i3"] == InstanceView("i3", 0, 50.0)  # no gateway has seen it


def test_changes_count_new_arrivals_starts_and_finishes_once() -> None:
    loads = GatewayLoads()
    first = loads.update(_report("a", 1, InstanceLoad("i1", 1, None, started=3, finished=2), arrivals=3), 1.0)
    assert first.arrivals == {"mlp": 3}
    assert first.started == {("mlp", "i1"): 3}
    assert first.finished == {("mlp", "i1"): 2}
    again = loads.update(_report("a", 1, InstanceLoad("i1", 0, 0.0, started=9, finished=9)), 2.0)
    assert not again.demand_changed  # the same sequence number: ignored
    later = loads.update(_report("a", 2, InstanceLoad("i1", 0, 0.0, started=4, finished=4), arrivals=4), 2.0)
    assert later.arrivals == {"mlp": 1}
    assert later.started == {("mlp", "i1"): 1}
    assert later.finished == {("mlp", "i1"): 2}


def test_a_silent_gateway_expires_and_its_requests_finish() -> None:
    loads = GatewayLoads(stale_after_s=3.0)
    loads.update(_report("a", 1, InstanceLoad("i1", 2, None, started=5, finished=3), queued=1), now=0.0)
    assert not loads.expire(now=2.0).finished
    gone = loads.expire(now=4.0)
    assert gone.finished == {("mlp", "i1"): 2}
    assert loads.demand("mlp") == (0, 0)
    assert loads.gateways() == []
