"""The GPU weight store over a fake owner (no processes, no device), and the tensor views
every backend builds from a model's one buffer (here on a CPU storage, the way the CUDA
backend does on an opened IPC storage)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.node.gpu import proto
from smss.node.gpu.layout import Layout, plan
from smss.node.gpu.store import GpuWeightStore
from smss.safetensors_header import parse_image

SIZES = {"a": 60, "b": 60, "c": 30, "d": 10}


class FakeOwner:
    """An owner that records what it holds; ``share`` hands out a made-up handle."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.loads: list[str] = []
        self.evictions: list[str] = []

    async def load(self, key: str, segment: Path) -> proto.Loaded:
        assert segment == Path(f"/dev/shm/seg-{key}")
        self.held.add(key)
        self.loads.append(key)
        return proto.Loaded(SIZES[key], 1.0)

    async def share(self, key: str) -> proto.SharedWeights:
        assert key in self.held
        return proto.SharedWeights(proto.HostHandle(f"/dev/shm/buf-{key}", SIZES[key]), Layout((), 0))

    async def evict(self, key: str) -> None:
        self.held.discard(key)
        self.evictions.append(key)


class HostStore:
    """The host tier as the store sees it: a segment per key, and its users."""

    def __init__(self) -> None:
        self.fetches: list[str] = []
        self.users: dict[str, int] = {}

    def source(self, key: str) -> Callable[[], object]:
        async def fetch() -> tuple[Path, int, Callable[[], None]]:
            self.fetches.append(key)
            self.users[key] = self.users.get(key, 0) + 1

            def release() -> None:
                self.users[key] -= 1

            return Path(f"/dev/shm/seg-{key}"), SIZES[key], release

        return fetch


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_one_load_for_many_users_and_the_host_copy_is_let_go_once_copied() -> None:
    owner, host = FakeOwner(), HostStore()
    store = GpuWeightStore(0, owner, budget_bytes=100)

    async def main() -> None:
        first = await store.acquire("a", host.source("a"))  # type: ignore[arg-type]
        second = await store.acquire("a", host.source("a"))  # type: ignore[arg-type]
        assert (first.hit, second.hit) == (False, True)

    run(main())
    assert owner.loads == ["a"]
    assert host.fetches == ["a"]
    assert host.users == {"a": 0}  # evictable by the host store's own LRU
    entry = store.get("a")
    assert entry is not None
    assert entry.users == 2


def test_concurrent_first_starts_of_a_model_load_it_once() -> None:
    owner, host = FakeOwner(), HostStore()
    store = GpuWeightStore(0, owner, budget_bytes=100)

    async def main() -> None:
        got = await asyncio.gather(*(store.acquire("c", host.source("c")) for _ in range(5)))  # type: ignore[arg-type]
        assert sorted(a.hit for a in got) == [False, True, True, True, True]

    run(main())
    assert owner.loads == ["c"]


def test_weights_stay_after_their_users_go_and_step_down_lru_only_when_room_is_needed() -> None:
    owner, host = FakeOwner(), HostStore()
    store = GpuWeightStore(0, owner, budget_bytes=100)

    async def main() -> None:
        await store.acquire("c", host.source("c"))  # type: ignore[arg-type]
        await store.acquire("a", host.source("a"))  # type: ignore[arg-type]
        store.release("c")
        store.release("a")
        assert {e.key for e in store.entries()} == {"a", "c"}  # scaled to zero: still resident
        await store.acquire("c", host.source("c"))  # type: ignore[arg-type]  # c is now the most recent
        store.release("c")
        await store.acquire("b", host.source("b"))  # type: ignore[arg-type]  # needs 60 of 100: a goes

    run(main())
    assert owner.evictions == ["a"]
    assert {e.key for e in store.entries()} == {"b", "c"}


def test_weights_in_use_never_step_down_and_then_the_budget_gives() -> None:
    owner, host = FakeOwner(), HostStore()
    store = GpuWeightStore(0, owner, budget_bytes=100)

    async def main() -> None:
        await store.acquire("a", host.source("a"))  # type: ignore[arg-type]
        assert not await store.step_down("a")
        await store.acquire("b", host.source("b"))  # type: ignore[arg-type]

    run(main())
    assert owner.evictions == []
    assert store.resident_bytes() == 120  # over budget: every resident model is in use


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(SIZES)), st.booleans()), max_size=40))
def test_the_owner_holds_exactly_the_stores_entries_and_every_model_in_use(
    steps: list[tuple[str, bool]],
) -> None:
    owner, host = FakeOwner(), HostStore()
    store = GpuWeightStore(0, owner, budget_bytes=100)
    users: dict[str, int] = {}

    async def main() -> None:
        for key, release in steps:
            if release and users.get(key):
                store.release(key)
                users[key] -= 1
            else:
                got = await store.acquire(key, host.source(key))  # type: ignore[arg-type]
                users[key] = users.get(key, 0) + 1
                if not got.hit:  # a load makes room first: only models in use exceed the budget
                    in_use = sum(SIZES[k] for k, n in users.items() if n)
                    assert store.resident_bytes() <= max(100, in_use)
            assert owner.held == {e.key for e in store.entries()}
            assert {k for k, n in users.items() if n} <= owner.held

    run(main())


def test_tensor_views_of_one_buffer_equal_the_files_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load, save

    from smss.node.gpu.device import copy_into, tensors_from

    tensors = {
        "odd": torch.arange(7, dtype=torch.uint8),  # shifts everything after it in the file
        "w": torch.randn(3, 5),
        "h": torch.randn(4, dtype=torch.float64),
        "bf": torch.randn(2, 3).to(torch.bfloat16),
        "n": torch.tensor(5, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
    }
    image = save(tensors)
    layout = plan(parse_image(image))
    buffer = bytearray(layout.nbytes)
    copy_into(memoryview(buffer), memoryview(image), layout)
    # As the CUDA backend opens an IPC storage: a uint8 tensor set to the whole storage.
    storage = torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()
    base = torch.empty((0,), dtype=torch.uint8)
    base.set_(storage, 0, (storage.nbytes(),), (1,))
    views = tensors_from(base, layout)
    want = load(image)
    assert set(views) == set(want)
    for name, t in want.items():
        assert views[name].dtype == t.dtype
        assert views[name].shape == t.shape
        assert torch.equal(views[name], t), name
        if views[name].numel():
            offset = views[name].data_ptr() - storage.data_ptr()
            assert 0 <= offset < storage.nbytes()  # a view of the buffer: no copy
            assert offset % 256 == 0  # aligned as a device allocation's base is
    assert np.frombuffer(buffer, dtype=np.uint8).size == layout.nbytes
