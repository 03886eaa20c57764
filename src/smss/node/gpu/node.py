"""The node agent's GPUs: owners, weight stores, standbys and spares, per GPU.

:class:`GpuNode` starts instances placed on a CUDA device (the placement's
``gpu_index``), each as a process of its own:

* each GPU in use has one **owner** (:mod:`smss.node.gpu.owner`) holding one copy of
  each model's weights there, and a :class:`~smss.node.gpu.store.GpuWeightStore`
  keeping them within a budget (stepping down LRU to the host store, then disk);
* each GPU keeps ``standbys`` **standby** processes ready (context made, libraries
  warm; one pool per MPS thread percentage in use where MPS runs): a start binds one
  to the model and the pool is refilled in the background;
* after a start, with ``spares``, a standby is bound to the same model ahead of
  demand and rehearsed (a **spare**): the next start of that model on that GPU is
  one message. A spare is dropped when its model's weights step down.

Where a start's time goes is returned with it (``phases``, milliseconds):
``owner`` (an owner had to start), ``host`` (the weights came from the file into the
host store), ``upload`` (host segment to the GPU), ``standby`` (no standby was ready:
a fresh process, torch, CUDA context, libraries), ``attach`` (opening the GPU copy by
CUDA IPC), ``build`` (the user's class and its ``load()``), ``warm`` (one call on
zeros), ``serve`` (listening), and ``spare`` (1 when a spare took the start).

Background work (refills, spares) runs as tasks this object owns: they are awaited
by :meth:`settled` and cancelled by :meth:`close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from smss.errors import StartFailed
from smss.inventory import Allocation, AllocationKind, Capacity, NodeInventory
from smss.node.gpu import proto
from smss.node.gpu.device import SHM_DIR
from smss.node.gpu.procs import OwnerProcess, Standby
from smss.node.gpu.shares import GpuShare, mps_running, mps_thread_percentage, process_env, share_of
from smss.node.gpu.store import GpuWeightStore, HostSource
from smss.node.worker import WorkerConfig

log = logging.getLogger(__name__)
MIB = 1 << 20


@dataclass(frozen=True)
class GpuSettings:
    """``backend``: ``cuda``, or ``host`` (the same processes on host shared memory:
    CPU-only machines, tests). ``weight_budget``: the share of each GPU's memory its
    resident weights may take. ``standbys``: processes kept ready per GPU."""

    backend: proto.Backend = "cuda"
    weight_budget: float = 0.5
    standbys: int = 1
    spares: bool = True
    start_timeout_s: float = 120.0


@dataclass(frozen=True)
class GpuStart:
    """A started GPU instance: its ``pid``, where its start's time went, and what to
    call when it exits (gives its weights back)."""

    pid: int
    phases: dict[str, float]
    release: Callable[[], None]


@dataclass
class _Gpu:
    index: int
    memory_mb: int
    owner: OwnerProcess | None = None
    store: GpuWeightStore | None = None
    standbys: dict[int | None, list[Standby]] = field(default_factory=dict)
    #: Spares by function key.
    spares: dict[str, Standby] = field(default_factory=dict)
    #: Pids of the instances serving on this GPU (they die with its owner's memory).
    instances: set[int] = field(default_factory=set)
    #: Keys whose spare is being bound (one spare per model and GPU).
    preparing: set[str] = field(default_factory=set)
    owner_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class GpuNode:
    def __init__(
        self,
        inventory: NodeInventory,
        run_dir: Path,
        log_dir: Path,
        settings: GpuSettings = GpuSettings(),
        *,
        mps: bool | None = None,
    ) -> None:
        self._node = inventory.node
        self._run_dir = run_dir
        self._log_dir = log_dir
        self.settings = settings
        self.mps = mps_running() if mps is None else mps
        self._gpus = {
            d.index: _Gpu(d.index, d.total.gpu_memory_mb) for d in inventory.devices if d.kind == "cuda"
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._topping_up: set[tuple[int, int | None]] = set()
        self._closed = False
        self._names = 0

    def gpus(self) -> list[int]:
        return sorted(self._gpus)

    # ------------------------------------------------------------ start

    async def start(
        self, config: WorkerConfig, gpu_index: int, key: str, host: HostSource | None
    ) -> GpuStart:
        """Start an instance of ``config.spec`` on GPU ``gpu_index``. ``key`` names the
        model's weights (as in the host store); ``host`` fetches their host segment on
        a GPU miss (None: the model has no weights)."""
        gpu = self._gpus.get(gpu_index)
        if gpu is None:
            raise StartFailed(f"this node has no GPU {gpu_index}")
        spec = config.spec
        share = share_of(spec.resources, gpu.memory_mb)
        threads = mps_thread_percentage(share) if self.mps else None
        phases: dict[str, float] = {}
        spare = gpu.spares.get(key)
        if spare is not None and spare.alive() and spare.threads == threads:
            del gpu.spares[key]
            return await self._serve_spare(gpu, spare, config, key, share, host, phases)
        t0 = time.perf_counter()
        store = await self._store(gpu, phases)
        weights = None
        if host is not None:
            acquired = await store.acquire(key, host)
            weights = acquired.weights
            if not acquired.hit:
                phases["host"] = acquired.host_ms
                phases["upload"] = acquired.upload_ms
        release = _once(lambda: store.release(key)) if host is not None else _noop
        try:
            standby = await self._standby(gpu, threads, phases)
            phases["acquire"] = (time.perf_counter() - t0) * 1000
            pid = await self._bind_and_serve(standby, config, weights, share, phases)
        except BaseException:
            release()
            raise
        self._track(gpu, pid)
        if self.settings.spares and not self._closed:
            self._spawn(self._prepare_spare(gpu, config, key, share, threads, host))
        return GpuStart(pid, phases, self._on_exit(gpu, pid, release))

    async def _serve_spare(
        self,
        gpu: _Gpu,
        spare: Standby,
        config: WorkerConfig,
        key: str,
        share: GpuShare,
        host: HostSource | None,
        phases: dict[str, float],
    ) -> GpuStart:
        store = gpu.store
        release = _once(lambda: store.release(key)) if store is not None and host is not None else _noop
        t0 = time.perf_counter()
        try:
            serving = await spare.serve(config, self.settings.start_timeout_s)
        except BaseException:
            release()
            await spare.process.kill()
            raise
        phases["serve"] = (time.perf_counter() - t0) * 1000
        phases["spare"] = 1.0
        self._track(gpu, serving.pid)
        if not self._closed:
            self._spawn(self._prepare_spare(gpu, config, key, share, spare.threads, host))
        return GpuStart(serving.pid, phases, self._on_exit(gpu, serving.pid, release))

    async def _bind_and_serve(
        self,
        standby: Standby,
        config: WorkerConfig,
        weights: proto.SharedWeights | None,
        share: GpuShare,
        phases: dict[str, float],
    ) -> int:
        timeout = self.settings.start_timeout_s
        try:
            bound = await standby.bind(config, weights, share.memory_mb, False, timeout)
            phases.update(attach=bound.attach_ms, build=bound.build_ms, warm=bound.warm_ms)
            t0 = time.perf_counter()
            serving = await standby.serve(config, timeout)
            phases["serve"] = (time.perf_counter() - t0) * 1000
        except BaseException:
            await standby.process.kill()
            raise
        return serving.pid

    def _on_exit(self, gpu: _Gpu, pid: int, release: Callable[[], None]) -> Callable[[], None]:
        def exited() -> None:
            gpu.instances.discard(pid)
            release()

        return _once(exited)

    def _track(self, gpu: _Gpu, pid: int) -> None:
        gpu.instances.add(pid)

    # ------------------------------------------------------------ owners

    async def _store(self, gpu: _Gpu, phases: dict[str, float]) -> GpuWeightStore:
        if gpu.owner is not None and gpu.owner.alive() and gpu.store is not None:
            return gpu.store
        async with gpu.owner_lock:
            if gpu.owner is not None and gpu.owner.alive() and gpu.store is not None:
                return gpu.store
            if gpu.owner is not None:
                self._owner_lost(gpu)
            t0 = time.perf_counter()
            config = proto.OwnerConfig(gpu.index, self.settings.backend, self._prefix(gpu), gpu.memory_mb)
            owner = await OwnerProcess.start(
                config, process_env(gpu.index, None), self._log_dir, self.settings.start_timeout_s
            )
            phases["owner"] = (time.perf_counter() - t0) * 1000
            budget = int(self.settings.weight_budget * owner.ready.total_mb * MIB)
            gpu.owner = owner
            gpu.store = GpuWeightStore(gpu.index, owner, budget)
            self._spawn(self._watch_owner(gpu, owner), watcher=True)
            return gpu.store

    async def _watch_owner(self, gpu: _Gpu, owner: OwnerProcess) -> None:
        await owner.process.exited.wait()
        if not self._closed and gpu.owner is owner:
            self._owner_lost(gpu)

    def _owner_lost(self, gpu: _Gpu) -> None:
        """The owner died: every buffer on the GPU with it. Its instances and spares
        viewed that memory, so they are stopped (and replaced on demand)."""
        log.error("the owner of GPU %d died: stopping the instances that used its weights", gpu.index)
        for pid in list(gpu.instances):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for spare in gpu.spares.values():
            spare.process.signal(signal.SIGKILL)
        gpu.spares.clear()
        if gpu.store is not None:
            gpu.store.forget()
        dead = gpu.owner.process.pid if gpu.owner is not None else None
        gpu.owner, gpu.store = None, None
        self._sweep(gpu, dead)

    def _prefix(self, gpu: _Gpu) -> str:
        return f"{self._run_dir.name}-gpu{gpu.index}"

    def _sweep(self, gpu: _Gpu, owner_pid: int | None) -> None:
        """What a dead owner may leave in ``/dev/shm``: the host backend's buffers, and
        torch's files of CUDA IPC reference counts (``torch_<pid>_*``; the driver frees
        the GPU memory itself)."""
        patterns = [f"{self._prefix(gpu)}-*"] if self.settings.backend == "host" else []
        if owner_pid is not None:
            patterns.append(f"torch_{owner_pid}_*")
        for pattern in patterns:
            for path in SHM_DIR.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ------------------------------------------------------------ standbys

    async def _standby(self, gpu: _Gpu, threads: int | None, phases: dict[str, float]) -> Standby:
        pool = gpu.standbys.setdefault(threads, [])
        while pool:
            standby = pool.pop(0)
            if standby.alive():
                self._refill(gpu, threads)
                return standby
        t0 = time.perf_counter()
        standby = await self._new_standby(gpu, threads)
        phases["standby"] = (time.perf_counter() - t0) * 1000
        phases.update(
            standby_import=standby.ready.import_ms,
            standby_init=standby.ready.init_ms,
            standby_warm=standby.ready.warm_ms,
        )
        self._refill(gpu, threads)
        return standby

    async def _new_standby(self, gpu: _Gpu, threads: int | None) -> Standby:
        self._names += 1
        config = proto.StandbyConfig(gpu.index, self.settings.backend, gpu.memory_mb)
        return await Standby.start(
            config,
            threads,
            process_env(gpu.index, threads),
            self._log_dir,
            self.settings.start_timeout_s,
            f"gpu{gpu.index}-standby-{self._names}",
        )

    def _refill(self, gpu: _Gpu, threads: int | None) -> None:
        if not self._closed:
            self._spawn(self._top_up(gpu, threads))

    async def _top_up(self, gpu: _Gpu, threads: int | None) -> None:
        """Start the standbys the pool lacks, side by side (each is seconds of imports
        and CUDA initialisation, mostly waiting on one core)."""
        if (gpu.index, threads) in self._topping_up:
            return
        self._topping_up.add((gpu.index, threads))
        try:
            pool = gpu.standbys.setdefault(threads, [])
            while (missing := self.settings.standbys - len([s for s in pool if s.alive()])) > 0:
                if self._closed:
                    return
                started = await asyncio.gather(
                    *(self._new_standby(gpu, threads) for _ in range(missing)), return_exceptions=True
                )
                failed = [s for s in started if isinstance(s, BaseException)]
                for standby in started:
                    if isinstance(standby, Standby):
                        if self._closed:
                            await standby.process.kill()
                        else:
                            pool.append(standby)
                if failed:  # tried again at the next start, not in a loop here
                    log.warning("GPU %d: %d standbys failed: %s", gpu.index, len(failed), failed[0])
                    return
        finally:
            self._topping_up.discard((gpu.index, threads))

    async def _prepare_spare(
        self,
        gpu: _Gpu,
        config: WorkerConfig,
        key: str,
        share: GpuShare,
        threads: int | None,
        host: HostSource | None,
    ) -> None:
        """Bind a standby to ``key`` ahead of its next start, and rehearse it."""
        existing = gpu.spares.get(key)
        if (existing is not None and existing.alive()) or key in gpu.preparing:
            return
        gpu.preparing.add(key)
        try:
            await self._bind_spare(gpu, config, key, share, threads, host)
        finally:
            gpu.preparing.discard(key)

    async def _bind_spare(
        self,
        gpu: _Gpu,
        config: WorkerConfig,
        key: str,
        share: GpuShare,
        threads: int | None,
        host: HostSource | None,
    ) -> None:
        pool = gpu.standbys.setdefault(threads, [])
        standby = next((s for s in pool if s.alive()), None)
        if standby is not None:
            pool.remove(standby)
        else:
            standby = await self._new_standby(gpu, threads)
        store = gpu.store
        if host is not None and store is None:
            await standby.process.kill()
            return
        try:
            weights = (
                (await store.acquire(key, host)).weights if store is not None and host is not None else None
            )
        except BaseException:
            await standby.process.kill()
            raise
        try:
            spare_config = msgspec.structs.replace(config, instance_id=f"{config.spec.name}-spare")
            await standby.bind(spare_config, weights, share.memory_mb, True, self.settings.start_timeout_s)
        except BaseException:
            if store is not None and host is not None:
                store.release(key)
            await standby.process.kill()
            raise
        if self._closed or gpu.store is not store:
            if store is not None and host is not None:
                store.release(key)
            await standby.process.kill()
            return
        standby.bound_to = key
        gpu.spares[key] = standby
        self._watch_spare(gpu, key, standby, store if host is not None else None)
        self._refill(gpu, threads)

    def _watch_spare(self, gpu: _Gpu, key: str, spare: Standby, store: GpuWeightStore | None) -> None:
        """A spare holds one use of its weights until it serves (then its instance does) or dies."""

        async def watch() -> None:
            await spare.process.exited.wait()
            if gpu.spares.get(key) is spare:
                del gpu.spares[key]
                if store is not None:
                    store.release(key)

        self._spawn(watch(), watcher=True)

    # ------------------------------------------------------------ resident, evict

    def resident(self) -> list[Allocation]:
        """Each GPU's resident weights (their size) and spares (their context and
        warm-up), as allocations on that GPU."""
        out = []
        for gpu in self._gpus.values():
            if gpu.store is not None:
                for e in gpu.store.entries():
                    out.append(
                        _allocation(
                            f"gpu-weights:{gpu.index}:{e.key}",
                            e.key,
                            "weights",
                            self._node,
                            gpu.index,
                            e.nbytes,
                        )
                    )
            for key, spare in gpu.spares.items():
                mb = spare.ready.context_mb or 0
                out.append(
                    _allocation(f"gpu-spare:{gpu.index}:{key}", key, "spare", self._node, gpu.index, mb * MIB)
                )
        return out

    async def step_down(self, function: str) -> bool:
        """Drop ``function``'s GPU copies (and spares) where no instance uses them."""
        dropped = False
        for gpu in self._gpus.values():
            for key in [k for k in gpu.spares if _function(k) == function]:
                spare = gpu.spares.pop(key)
                await spare.process.kill()
                if gpu.store is not None:
                    gpu.store.release(key)
            if gpu.store is not None:
                for e in [e for e in gpu.store.entries() if _function(e.key) == function]:
                    dropped = await gpu.store.step_down(e.key) or dropped
        return dropped

    def step_down_soon(self, function: str) -> bool:
        """:meth:`step_down` in the background (for a caller that cannot wait); whether
        any GPU holds something of ``function`` to drop."""
        held = any(
            _function(k) == function
            for g in self._gpus.values()
            for k in [*g.spares, *(e.key for e in (g.store.entries() if g.store else []) if e.users == 0)]
        )
        if held and not self._closed:
            self._spawn(self._step_down(function))
        return held

    async def _step_down(self, function: str) -> None:
        await self.step_down(function)

    def stats(self) -> dict[str, object]:
        return {
            f"cuda:{g.index}": {
                "backend": self.settings.backend,
                "mps": self.mps,
                "owner_pid": g.owner.process.pid if g.owner is not None else None,
                "weights": g.store.stats() if g.store is not None else None,
                "standbys": sum(len([s for s in pool if s.alive()]) for pool in g.standbys.values()),
                "spares": sorted(g.spares),
                "instances": len(g.instances),
            }
            for g in self._gpus.values()
        }

    # ------------------------------------------------------------ tasks

    def _spawn(self, coro: Coroutine[Any, Any, None], *, watcher: bool = False) -> None:
        """Run ``coro`` as a task of this object; ``watcher``: one that waits for an
        exit, which :meth:`settled` does not wait for."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        if watcher:
            self._watchers.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._watchers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("GPU background work failed: %s", task.exception())

    async def settled(self) -> None:
        """Wait until the background work started so far (refills, spares) is done."""
        while pending := [t for t in self._tasks if not t.done() and t not in self._watchers]:
            await asyncio.wait(pending)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for gpu in self._gpus.values():
            stops = [s.process.stop(2.0) for pool in gpu.standbys.values() for s in pool]
            stops += [s.process.stop(2.0) for s in gpu.spares.values()]
            await asyncio.gather(*stops, return_exceptions=True)
            gpu.standbys.clear()
            gpu.spares.clear()
            dead = None
            if gpu.owner is not None:
                await gpu.owner.process.stop(5.0)
                dead = gpu.owner.process.pid
            gpu.owner, gpu.store = None, None
            self._sweep(gpu, dead)


def _function(key: str) -> str:
    return key.partition("@")[0]


def _allocation(
    alloc_id: str, key: str, kind: AllocationKind, node: str, gpu: int, nbytes: int
) -> Allocation:
    mb = math.ceil(nbytes / MIB)
    return Allocation(alloc_id, _function(key), kind, node, Capacity(), Capacity(gpu_memory_mb=mb), gpu)


def _noop() -> None:
    return None


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            fn()

    return call
