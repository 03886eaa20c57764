"""Placement properties over random inventories of nodes, devices and functions."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from smss.control.placement import ClusterState, NoFit, Placement, gpu_need
from smss.inventory import Allocation, Capacity, Device, NodeInventory

cpus = st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0])
mems = st.sampled_from([512, 1024, 2048, 4096, 8192])


@st.composite
def nodes(draw: st.DrawFn) -> list[NodeInventory]:
    out = []
    for k in range(draw(st.integers(1, 4))):
        host = Capacity(cpu=draw(cpus), memory_mb=draw(mems))
        devices = [Device("cpu", 0, "cpu", host, host)]
        for g in range(draw(st.integers(0, 2))):
            cap = Capacity(gpu=1.0, gpu_memory_mb=draw(st.sampled_from([8192, 16384, 81920])))
            devices.append(Device("cuda", g, "gpu", cap, cap))
        out.append(NodeInventory(f"n{k}", tuple(devices)))
    return out


needs = st.builds(
    Capacity,
    cpu=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0]),
    memory_mb=st.sampled_from([128, 256, 512, 1024, 4096]),
    gpu=st.sampled_from([0.0, 0.0, 0.25, 0.5]),
    gpu_memory_mb=st.sampled_from([0, 0, 1024, 4096]),
)


def fits_empty(inv: NodeInventory, need: Capacity) -> bool:
    host = inv.cpu.capacity
    if host.cpu + 1e-9 < need.cpu or host.memory_mb < need.memory_mb:
        return False
    if need.gpu <= 0 and need.gpu_memory_mb <= 0:
        return True
    # A fraction alone also takes that fraction of the GPU's memory (gpu_need).
    return any(
        d.kind == "cuda"
        and d.capacity.gpu + 1e-9 >= need.gpu
        and d.capacity.gpu_memory_mb >= gpu_need(need, d).gpu_memory_mb
        for d in inv.devices
    )


def assert_not_overcommitted(state: ClusterState) -> None:
    for report in state.reports():
        for r in ("cpu", "memory_mb", "gpu", "gpu_memory_mb"):
            assert report.allocated.get(r) <= report.capacity.get(r) + 1e-9, (report.node, report.kind, r)


@settings(max_examples=200, deadline=None)
@given(nodes(), st.lists(needs, min_size=1, max_size=30))
def test_placing_never_over_commits_and_places_whenever_something_fits(
    inventory: list[NodeInventory], asks: list[Capacity]
) -> None:
    state = ClusterState(inventory)
    for k, need in enumerate(asks):
        where = state.place(f"f{k % 3}", need)
        if isinstance(where, Placement):
            state.add(where.allocation(f"i{k}", f"f{k % 3}", need))
        else:
            assert not where.never or not any(fits_empty(inv, need) for inv in inventory)
            if not where.never:  # not now: then truly no node has that much free
                assert not any(_fits_now(state, inv, need) for inv in inventory)
        assert_not_overcommitted(state)


def _fits_now(state: ClusterState, inv: NodeInventory, need: Capacity) -> bool:
    free = state.free(inv.node)
    if free.cpu + 1e-9 < need.cpu or free.memory_mb < need.memory_mb:
        return False
    if need.gpu <= 0 and need.gpu_memory_mb <= 0:
        return True
    return any(
        d.kind == "cuda"
        and state.free(inv.node, "cuda", d.index).gpu + 1e-9 >= need.gpu
        and state.free(inv.node, "cuda", d.index).gpu_memory_mb >= gpu_need(need, d).gpu_memory_mb
        for d in inv.devices
    )


@settings(max_examples=200, deadline=None)
@given(nodes(), needs)
def test_an_impossible_need_is_refused_as_never_and_a_possible_one_is_placed(
    inventory: list[NodeInventory], need: Capacity
) -> None:
    state = ClusterState(inventory)
    where = state.place("f", need)
    possible = any(fits_empty(inv, need) for inv in inventory)
    assert isinstance(where, Placement) == possible
    if not possible:
        assert isinstance(where, NoFit)
        assert where.never
        assert where.resource in ("cpu", "memory_mb", "gpu", "gpu_memory_mb")
        assert where.resource in where.message("f")


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 4), needs.filter(lambda n: n.gpu == 0 and n.gpu_memory_mb == 0), st.data())
def test_locality_to_resident_weights_is_preferred_when_it_fits(
    count: int, need: Capacity, data: st.DataObject
) -> None:
    state = ClusterState.uniform(count, 8.0, 16384)
    near = data.draw(st.integers(0, count - 1))
    where = state.place("f", need, {(f"node-{near}", None): 1})
    assert isinstance(where, Placement)
    assert where.node == f"node-{near}"


def test_best_fit_picks_the_fullest_node_that_fits() -> None:
    state = ClusterState.uniform(3, 4.0, 8192)
    state.add(Allocation("x", "g", "instance", "node-1", Capacity(cpu=3.0, memory_mb=1024)))
    state.add(Allocation("y", "g", "instance", "node-2", Capacity(cpu=2.0, memory_mb=1024)))
    where = state.place("f", Capacity(cpu=1.0, memory_mb=512))
    assert isinstance(where, Placement)
    assert where.node == "node-1"
    where = state.place("f", Capacity(cpu=2.0, memory_mb=512))
    assert isinstance(where, Placement)
    assert where.node == "node-2"


def test_room_is_made_by_evicting_idle_instances_of_other_functions_longest_idle_first() -> None:
    state = ClusterState.uniform(1, 2.0, 8192)
    state.add(Allocation("old", "g", "instance", "node-0", Capacity(cpu=1.0, memory_mb=512)))
    state.add(Allocation("new", "h", "instance", "node-0", Capacity(cpu=1.0, memory_mb=512)))
    state.add(Allocation("mine", "f", "instance", "node-0", Capacity(cpu=0.0, memory_mb=512)))
    idle = {"old": 10.0, "new": 20.0, "mine": 0.0}
    where = state.place("f", Capacity(cpu=1.0, memory_mb=512), evictable=lambda a: idle.get(a.id))
    assert isinstance(where, Placement)
    assert where.evict == ("old",)  # never its own function's, the longest idle first
    busy = state.place("f", Capacity(cpu=1.0, memory_mb=512), evictable=lambda a: None)
    assert isinstance(busy, NoFit)
    assert not busy.never
    assert busy.resource == "cpu"


def test_resident_memory_counts_against_the_node() -> None:
    state = ClusterState.uniform(1, 4.0, 2048)
    state.add(Allocation("weights:m", "m", "weights", "node-0", Capacity(memory_mb=1800)))
    where = state.place("f", Capacity(cpu=1.0, memory_mb=512))
    assert isinstance(where, NoFit)
    assert where.resource == "memory_mb"
    assert not where.never
    made = state.place("f", Capacity(cpu=1.0, memory_mb=512), evictable=lambda a: math.inf)
    assert isinstance(made, Placement)
    assert made.evict == ("weights:m",)


def test_a_gpu_need_goes_on_a_gpu_with_room() -> None:
    host = Capacity(cpu=8.0, memory_mb=16384)
    g0 = Capacity(gpu=1.0, gpu_memory_mb=8192)
    inv = NodeInventory(
        "n",
        (Device("cpu", 0, "cpu", host, host), Device("cuda", 0, "a", g0, g0), Device("cuda", 1, "b", g0, g0)),
    )
    state = ClusterState([inv])
    need = Capacity(cpu=1.0, memory_mb=512, gpu=0.5, gpu_memory_mb=6000)
    first = state.place("f", need)
    assert isinstance(first, Placement)
    state.add(first.allocation("i1", "f", need))
    second = state.place("f", need)
    assert isinstance(second, Placement)
    assert second.gpu_index != first.gpu_index  # 6000 + 6000 MiB do not fit one 8 GiB GPU
    state.add(second.allocation("i2", "f", need))
    third = state.place("f", need)
    assert isinstance(third, NoFit)
    assert third.resource == "gpu_memory_mb"
