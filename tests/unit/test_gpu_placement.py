"""Placement on GPUs, with each model's one copy of its weights per GPU: properties over
random inventories and runs (hypothesis), and the refusals of what can never fit."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smss.control.placement import ClusterState, NoFit, Placement, gpu_need
from smss.inventory import Allocation, Capacity, Device, NodeInventory

HOST = Capacity(cpu=64.0, memory_mb=1 << 20)
FUNCTIONS = ("a", "b", "c", "d")


@st.composite
def gpu_nodes(draw: st.DrawFn, min_gpus: int = 1) -> list[NodeInventory]:
    out = []
    for k in range(draw(st.integers(1, 3))):
        devices = [Device("cpu", 0, "cpu", HOST, HOST)]
        for g in range(draw(st.integers(min_gpus, 3))):
            cap = Capacity(gpu=1.0, gpu_memory_mb=draw(st.sampled_from([8192, 16384, 24576])))
            devices.append(Device("cuda", g, "gpu", cap, cap))
        out.append(NodeInventory(f"n{k}", tuple(devices)))
    return out


#: (function, need, weights): a function always asks for the same share and has the same weights.
SHAPES = {
    f: (
        Capacity(cpu=0.5, memory_mb=256, gpu=gpu, gpu_memory_mb=mem),
        Capacity(gpu_memory_mb=weights),
    )
    for f, gpu, mem, weights in (
        ("a", 0.25, 1024, 3072),
        ("b", 0.0, 2048, 512),
        ("c", 0.5, 0, 6144),
        ("d", 0.1, 512, 45),
    )
}


def weights_id(node: str, gpu: int, function: str) -> str:
    return f"gpu-weights:{node}:{gpu}:{function}"


def locality_of(state: ClusterState, function: str) -> dict[tuple[str, int | None], int]:
    return {
        (a.node, a.gpu_index): 1
        for a in state.allocations()
        if a.function == function and a.kind == "weights" and a.gpu_index is not None
    }


def start(state: ClusterState, function: str, n: int) -> Placement | NoFit:
    """What the controller and the agent do for one start: place it with its weights, then
    record the instance and, on a GPU that lacked them, the one copy of its weights."""
    need, weights = SHAPES[function]
    where = state.place(function, need, locality_of(state, function), weights=weights)
    if isinstance(where, Placement):
        assert where.gpu_index is not None
        state.add(where.allocation(f"{function}-{n}", function, need))
        wid = weights_id(where.node, where.gpu_index, function)
        if wid not in state:
            state.add(Allocation(wid, function, "weights", where.node, Capacity(), weights, where.gpu_index))
    return where


def stop(state: ClusterState, instance: str) -> None:
    """An instance stops; a GPU's copy of the weights stays (it steps down only to make room)."""
    state.remove(instance)


def assert_not_over_committed(state: ClusterState) -> None:
    for report in state.reports():
        if report.kind == "cuda":
            assert report.allocated.gpu_memory_mb <= report.capacity.gpu_memory_mb, report
            assert report.allocated.gpu <= report.capacity.gpu + 1e-9, report


@settings(max_examples=200, deadline=None)
@given(gpu_nodes(), st.lists(st.tuples(st.sampled_from(FUNCTIONS), st.booleans()), max_size=60), st.data())
def test_gpu_memory_is_never_over_committed_counting_one_copy_of_weights_per_gpu(
    inventory: list[NodeInventory], steps: list[tuple[str, bool]], data: st.DataObject
) -> None:
    state = ClusterState(inventory)
    running: list[str] = []
    for n, (function, stop_one) in enumerate(steps):
        if stop_one and running:
            stop(state, running.pop(data.draw(st.integers(0, len(running) - 1))))
        where = start(state, function, n)
        if isinstance(where, Placement):
            running.append(f"{function}-{n}")
        assert_not_over_committed(state)


@settings(max_examples=200, deadline=None)
@given(gpu_nodes(min_gpus=2), st.sampled_from(FUNCTIONS), st.data())
def test_the_gpu_that_holds_the_weights_is_chosen_whenever_the_instance_fits_there(
    inventory: list[NodeInventory], function: str, data: st.DataObject
) -> None:
    state = ClusterState(inventory)
    need, weights = SHAPES[function]
    inv = data.draw(st.sampled_from(inventory))
    gpu = data.draw(st.sampled_from([d.index for d in inv.devices if d.kind == "cuda"]))
    state.add(
        Allocation(
            weights_id(inv.node, gpu, function), function, "weights", inv.node, Capacity(), weights, gpu
        )
    )
    # Other functions fill the cluster a little, maybe that GPU too.
    for n in range(data.draw(st.integers(0, 6))):
        start(state, data.draw(st.sampled_from([f for f in FUNCTIONS if f != function])), n)
    where = state.place(function, need, locality_of(state, function), weights=weights)
    free = state.free(inv.node, "cuda", gpu)
    device = inv.device("cuda", gpu)
    assert device is not None
    share = gpu_need(need, device)  # a fraction alone also takes that much of its memory
    fits_there = free.gpu_memory_mb >= share.gpu_memory_mb and free.gpu + 1e-9 >= share.gpu
    if fits_there:
        assert isinstance(where, Placement)
        assert (where.node, where.gpu_index) == (inv.node, gpu)


@settings(max_examples=200, deadline=None)
@given(gpu_nodes(), st.sampled_from(FUNCTIONS), st.data())
def test_a_start_that_waits_for_capacity_is_placed_once_enough_frees(
    inventory: list[NodeInventory], function: str, data: st.DataObject
) -> None:
    state = ClusterState(inventory)
    need, weights = SHAPES[function]
    if isinstance(state.place(function, need, weights=weights), NoFit):
        return  # it could never fit here (refused at once, as the next tests check)
    others = [f for f in FUNCTIONS if f != function]
    running = []
    for n in range(200):  # fill every GPU with other functions
        other = others[n % len(others)]
        if isinstance(start(state, other, n), Placement):
            running.append(f"{other}-{n}")
    need, weights = SHAPES[function]
    where = state.place(function, need, locality_of(state, function), weights=weights)
    if isinstance(where, Placement):
        return  # it fit among them
    assert not where.never  # possible on an empty cluster: only "not now"
    # Instances stop (and their functions' weights step down) until it fits.
    data.draw(st.randoms()).shuffle(running)
    while not isinstance(where, Placement):
        assert running, "everything stopped and it still did not fit"
        gone = state.remove(running.pop())
        assert gone is not None
        if not any(a.function == gone.function and a.kind == "instance" for a in state.allocations()):
            for a in [a for a in state.allocations() if a.function == gone.function and a.kind == "weights"]:
                state.remove(a.id)
        where = state.place(function, need, locality_of(state, function), weights=weights)
    assert_not_over_committed(state)


def one_gpu(memory_mb: int) -> ClusterState:
    cap = Capacity(gpu=1.0, gpu_memory_mb=memory_mb)
    return ClusterState(
        [NodeInventory("n", (Device("cpu", 0, "cpu", HOST, HOST), Device("cuda", 0, "g", cap, cap)))]
    )


def test_a_need_no_gpu_could_hold_with_its_weights_is_refused_as_never() -> None:
    state = one_gpu(8192)
    need = Capacity(cpu=1.0, memory_mb=512, gpu_memory_mb=4096)
    assert isinstance(state.place("m", need, weights=Capacity(gpu_memory_mb=2048)), Placement)
    never = state.place("m", need, weights=Capacity(gpu_memory_mb=6000))
    assert isinstance(never, NoFit)
    assert never.never
    assert never.resource == "gpu_memory_mb"
    assert "GPU memory" in never.message("m")


def test_a_gpu_need_on_a_cluster_without_gpus_is_refused_naming_the_gpu() -> None:
    state = ClusterState.uniform(2, 8.0, 16384)
    where = state.place("m", Capacity(cpu=1.0, memory_mb=512, gpu=0.25))
    assert isinstance(where, NoFit)
    assert where.never
    assert where.resource == "gpu"


def test_instances_of_one_model_share_its_weights_so_more_fit_than_with_a_copy_each() -> None:
    """8 GiB GPU, 3 GiB of weights, 1 GiB per instance: 5 instances with one shared copy,
    2 if each instance brought its own copy."""
    need, weights = Capacity(cpu=0.1, memory_mb=64, gpu_memory_mb=1024), Capacity(gpu_memory_mb=3072)
    shared = one_gpu(8192)
    n = 0
    while isinstance(shared.place("m", need, locality_of(shared, "m"), weights=weights), Placement):
        SHAPES["m"] = (need, weights)
        start(shared, "m", n)
        n += 1
    del SHAPES["m"]
    alone = one_gpu(8192)
    k = 0
    while isinstance(where := alone.place("m", need + weights), Placement):
        alone.add(where.allocation(f"m-{k}", "m", need + weights))
        k += 1
    assert (n, k) == (5, 2)


def test_a_gpu_holding_the_weights_beats_one_whose_node_holds_a_host_copy() -> None:
    cap = Capacity(gpu=1.0, gpu_memory_mb=16384)
    inv = NodeInventory(
        "n",
        (
            Device("cpu", 0, "cpu", HOST, HOST),
            Device("cuda", 0, "g", cap, cap),
            Device("cuda", 1, "g", cap, cap),
        ),
    )
    state = ClusterState([inv])
    need = Capacity(cpu=1.0, memory_mb=512, gpu_memory_mb=1024)
    where = state.place("m", need, {("n", None): 2, ("n", 1): 1}, weights=Capacity(gpu_memory_mb=512))
    assert isinstance(where, Placement)
    assert where.gpu_index == 1
