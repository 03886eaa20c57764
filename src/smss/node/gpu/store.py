"""One GPU's weight store: which models' weights its owner holds, within a budget.

The agent's bookkeeping of a GPU's resident weights, the GPU tier above the node's
host weight store (:class:`smss.node.weightstore.WeightStore`) and the file:

* **acquire** a model's weights for one more process on this GPU (an instance or a
  spare): a hit asks the owner for a handle (no copy); a miss first makes room, then
  has the owner copy the model's host segment to the GPU (the host store loads the
  file first if the host copy is gone too);
* **step down** least recently used first, and only a model no process on this GPU
  uses: the GPU copy is dropped and the host segment stays (itself evicted LRU by the
  host store, leaving the file);
* never more than ``budget_bytes`` resident unless every resident model is in use
  (then a warning, as the host store does): a model's weights stay on the GPU after
  its instances scale to zero until room is needed.

The same object runs over any :class:`OwnerPort`: the owner process on CUDA, the
owner process on the host backend (CPU-only machines), or a fake in unit tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from smss.node.gpu import proto

log = logging.getLogger(__name__)

#: Where a model's weights come from on a GPU miss: its host segment (path and size),
#: and what to call once the owner has copied it (the host store's release).
HostSource = Callable[[], Awaitable[tuple[Path, int, Callable[[], None]]]]


class OwnerPort(Protocol):
    async def load(self, key: str, segment: Path) -> proto.Loaded: ...

    async def share(self, key: str) -> proto.SharedWeights: ...

    async def evict(self, key: str) -> None: ...


@dataclass
class GpuEntry:
    key: str
    nbytes: int
    load_ms: float
    users: int = 0
    last_used: float = 0.0


@dataclass(frozen=True)
class Acquired:
    """A model's weights for one process: the owner's handle; ``hit`` when they were
    already on the GPU, else how long the host copy (``host_ms``) and the copy to
    the GPU (``upload_ms``) took."""

    weights: proto.SharedWeights
    hit: bool
    host_ms: float = 0.0
    upload_ms: float = 0.0


class GpuWeightStore:
    def __init__(self, gpu: int, owner: OwnerPort, budget_bytes: int) -> None:
        self.gpu = gpu
        self.budget_bytes = budget_bytes
        self._owner = owner
        self._entries: OrderedDict[str, GpuEntry] = OrderedDict()
        # One load at a time: two first starts of one model load it once.
        self._misses = asyncio.Lock()
        self.hits = 0
        self.misses = 0
        self.step_downs = 0

    def get(self, key: str) -> GpuEntry | None:
        return self._entries.get(key)

    def entries(self) -> list[GpuEntry]:
        return list(self._entries.values())

    def resident_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    async def acquire(self, key: str, host: HostSource) -> Acquired:
        """``key``'s weights for one more user (give it back with :meth:`release`)."""
        entry = self._entries.get(key)
        if entry is None:
            async with self._misses:
                entry = self._entries.get(key)
                if entry is None:
                    return await self._load(key, host)
        self._use(entry)
        try:
            weights = await self._owner.share(key)
        except BaseException:
            self.release(key)
            raise
        self.hits += 1
        return Acquired(weights, True)

    async def _load(self, key: str, host: HostSource) -> Acquired:
        self.misses += 1
        t0 = time.perf_counter()
        segment, size, release_host = await host()
        try:
            t1 = time.perf_counter()
            await self._make_room(size)
            loaded = await self._owner.load(key, segment)
        finally:
            release_host()
        entry = GpuEntry(key, loaded.nbytes, loaded.load_ms)
        self._entries[key] = entry
        self._use(entry)
        try:
            weights = await self._owner.share(key)
        except BaseException:
            self.release(key)
            raise
        upload_ms = (time.perf_counter() - t1) * 1000
        log.info(
            "GPU %d: loaded the weights of %s (%d bytes) in %.1f ms", self.gpu, key, loaded.nbytes, upload_ms
        )
        return Acquired(weights, False, (t1 - t0) * 1000, upload_ms)

    def _use(self, entry: GpuEntry) -> None:
        entry.users += 1
        entry.last_used = time.monotonic()
        self._entries.move_to_end(entry.key)

    def release(self, key: str) -> None:
        """One user of ``key`` on this GPU is gone (an instance exited, a spare was let go)."""
        entry = self._entries.get(key)
        if entry is not None and entry.users > 0:
            entry.users -= 1

    async def step_down(self, key: str) -> bool:
        """Drop ``key``'s GPU copy if no process here uses it (its host copy stays)."""
        entry = self._entries.get(key)
        if entry is None or entry.users > 0:
            return False
        del self._entries[key]
        self.step_downs += 1
        log.info("GPU %d: weights of %s step down to host memory", self.gpu, key)
        await self._owner.evict(key)
        return True

    def forget(self) -> None:
        """The owner is gone, and with it every copy on this GPU."""
        self._entries.clear()

    async def _make_room(self, needed: int) -> None:
        for key in list(self._entries):
            if self.resident_bytes() + needed <= self.budget_bytes:
                return
            await self.step_down(key)
        if self.resident_bytes() + needed > self.budget_bytes:
            log.warning(
                "GPU %d weight store over budget: %d + %d > %d bytes (every resident model is in use)",
                self.gpu,
                self.resident_bytes(),
                needed,
                self.budget_bytes,
            )

    def stats(self) -> dict[str, object]:
        return {
            "entries": len(self._entries),
            "bytes": self.resident_bytes(),
            "budget_bytes": self.budget_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "step_downs": self.step_downs,
            "models": {e.key: {"bytes": e.nbytes, "users": e.users} for e in self._entries.values()},
        }
