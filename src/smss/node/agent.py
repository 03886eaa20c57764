"""The node agent: one per machine; owns its devices, weight store, zygotes and instances.

Instances are local processes. Implements :class:`smss.ports.ClusterBackend` and
:class:`smss.ports.TierBackend` (stepping a function's template, weights and its
runtime's zygote up and down: :mod:`smss.control.tiers`). Two start modes:

* ``fork`` (default): the cold-start path of DESIGN.md. The model's weights are
  put in the node's :class:`WeightStore` (once; cached across scale-to-zero),
  the runtime's zygote forks a template that attaches them and builds the
  model (once per resident model), and each instance is a fork of that
  template. Exits are watched by pidfd.
* ``exec``: a fresh ``python -m smss.node.worker`` per instance that imports
  everything and loads its weights from the file: the container-style start,
  kept for comparison and for systems without ``fork``.

Either way each instance listens on its own Unix socket in a private run
directory, and an unexpected exit is reported through the exit callback at
once, unless the platform itself stopped the instance.

With a ``state_file`` and an ``adopt_window_s`` (fork mode), the zygotes, templates
and instances outlive a killed agent by that window, and the next agent on the same
state file takes them over (:meth:`NodeAgent.recover`, :mod:`smss.node.roster`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import msgspec

from smss.errors import CorruptWeights, StartFailed, StorageUnavailable
from smss.inventory import Allocation, AllocationKind, Capacity, NodeInventory, Tier
from smss.node.devices import discover
from smss.node.gpu.node import GpuNode, GpuSettings
from smss.node.memory import Reading, ResidentReadings
from smss.node.roster import InstanceEntry, Roster, start_time
from smss.node.rundir import claim_run_dir
from smss.node.weightstore import WeightStore
from smss.node.worker import Ready, WorkerConfig
from smss.node.zygotes import ZygotePool, watch_exit
from smss.ports import (
    ExitCallback,
    InstanceInfo,
    ResidentReading,
    RunningInstance,
    StartedInstance,
    StartTimings,
)
from smss.spec import FunctionSpec, Runtime

log = logging.getLogger(__name__)

NODE = "local"
StartMode = Literal["fork", "exec"]


@dataclass
class _Instance:
    info: InstanceInfo
    weights_key: str | None
    exited: asyncio.Event
    cancel_watch: Callable[[], None]
    process: asyncio.subprocess.Process | None = None
    stopping: bool = False
    entry: InstanceEntry | None = None
    #: The generation of the segment it uses (a dropped segment's users release nothing).
    weights_generation: int | None = None
    #: A GPU instance: gives its use of the GPU copy of its weights back.
    release: Callable[[], None] | None = None


def default_weight_budget(inventory: NodeInventory) -> int:
    """A quarter of the node's host memory capacity (what ``--memory`` caps, less the
    platform's reserve), so resident weights never crowd out the instances."""
    return max(int(inventory.cpu.capacity.memory_mb * (1 << 20)) // 4, 64 << 20)


class NodeAgent:
    def __init__(
        self,
        log_dir: Path,
        *,
        start_timeout_s: float = 120.0,
        weight_budget_bytes: int | None = None,
        mode: StartMode = "fork",
        spares: bool = True,
        inventory: NodeInventory | None = None,
        state_file: Path | None = None,
        adopt_window_s: float = 0.0,
        gpu: GpuSettings | None = None,
    ) -> None:
        """``state_file``: where the run directory is recorded for the next agent
        (``<data>/node.json``); ``adopt_window_s``: how long this node's processes
        outlive a killed agent, waiting to be adopted (0: they die with it); ``gpu``:
        how instances placed on this node's CUDA devices start (:mod:`smss.node.gpu`)."""
        self._inventory = inventory or discover(NODE)
        #: This node's name: its inventory's (``local`` on one machine; a Ray node id on a cluster).
        self.node = self._inventory.node
        self._log_dir = log_dir
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self._state_file = state_file
        self._run_dir = claim_run_dir(state_file)
        self._roster = Roster(self._run_dir)
        self._start_timeout_s = start_timeout_s
        self.mode = mode
        self.store = WeightStore(
            weight_budget_bytes or default_weight_budget(self._inventory), prefix=self._run_dir.name
        )
        self.store.on_evict = self._evicted
        # spares: each template keeps its next instance forked and rehearsed (smss.node.spare).
        lingers = adopt_window_s > 0 and mode == "fork" and state_file is not None
        self.zygotes = ZygotePool(
            self._run_dir,
            log_dir,
            prepare_timeout_s=start_timeout_s,
            spares=spares,
            linger_s=adopt_window_s if lingers else None,
        )
        # The store is not thread-safe: misses load one at a time, or two concurrent cold
        # starts of one model both load it and the first segment is orphaned in /dev/shm.
        self._store_misses = asyncio.Lock()
        self._instances: dict[str, _Instance] = {}
        self._on_exit: ExitCallback = lambda _id, _code: None
        self._readings = ResidentReadings()
        self.gpus = GpuNode(
            self._inventory,
            self._run_dir,
            log_dir,
            gpu or GpuSettings(spares=spares, start_timeout_s=start_timeout_s),
        )

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._on_exit = callback

    def nodes(self) -> list[str]:
        return [self.node]

    def inventory(self) -> list[NodeInventory]:
        return [self._inventory]

    def resident(self) -> list[Allocation]:
        """Weight segments (their size), templates and spares (their PSS, as last
        read off the event loop), as allocations of host memory on this node."""
        out = []
        for key in list(self.store.keys()):
            seg = self.store.get(key)
            if seg is not None:
                out.append(_resident(self.node, f"weights:{key}", key, "weights", seg.size))
        templates = self.zygotes.templates()
        readings = self._read()
        for t in templates:
            reading = readings.get(t.pid)
            pss = reading.pss if reading else 0
            out.append(_resident(self.node, f"template:{t.key}", t.key, "template", pss))
            for k, (_, spare_pss) in enumerate(reading.spares if reading else ()):
                out.append(_resident(self.node, f"spare:{t.key}:{k}", t.key, "spare", spare_pss))
        return out + self.gpus.resident()

    def running(self) -> list[RunningInstance]:
        """The instances this agent runs now (fork mode), with what each was started from."""
        return [
            RunningInstance(inst.info, inst.entry.artifact_dir)
            for inst in self._instances.values()
            if inst.entry is not None and not inst.stopping
        ]

    def socket_of(self, instance_id: str) -> str | None:
        """The Unix socket path of one of this node's instances (None: no such instance)."""
        inst = self._instances.get(instance_id)
        if inst is None or inst.stopping:
            return None
        scheme, _, path = inst.info.address.partition(":")
        return path if scheme == "unix" else None

    def pids(self) -> dict[str, int]:
        return {iid: inst.info.pid for iid, inst in self._instances.items()}

    def weight_cache(self) -> dict[str, object]:
        stats = dataclasses.asdict(self.store.stats())
        stats["templates"] = {
            t.key: {
                "pid": t.pid,
                "weights_address": t.prepared.weights_address,
                "weights_bytes": t.prepared.weights_bytes,
            }
            for t in self.zygotes.templates()
        }
        stats["segments"] = {
            key: round(seg.size / (1 << 20), 3)
            for key in list(self.store.keys())
            if (seg := self.store.get(key))
        }
        running = {rt: self.zygotes.zygote_pid(rt) for rt in get_args(Runtime)}
        stats["zygotes"] = {rt: {"pid": pid} for rt, pid in running.items() if pid is not None}
        stats["gpus"] = self.gpus.stats()
        return {self.node: stats}

    def evict_weights(self, function: str) -> bool:
        evicted = self.gpus.step_down_soon(function)
        for key in list(self.store.keys()):
            if key.partition("@")[0] == function:
                evicted = self.store.evict(key) or evicted
        return evicted

    def _evicted(self, key: str) -> None:
        self.zygotes.discard(key)

    # ------------------------------------------------------------ tiers (ports.TierBackend)

    def holdings(self) -> dict[str, Tier]:
        out: dict[str, Tier] = {}
        for key in list(self.store.keys()):
            out[_function_of(key)] = Tier.RESIDENT
        for t in self.zygotes.templates():
            out[_function_of(t.key)] = Tier.STANDBY
        return out

    def runtimes(self) -> list[str]:
        return self.zygotes.runtimes()

    async def step(self, spec: FunctionSpec, artifact_dir: Path, to: Tier) -> None:
        if self.mode == "exec":
            return  # nothing is kept resident: every instance loads its own
        key = f"{spec.name}@{artifact_dir.name}"
        if to >= Tier.STANDBY:
            await self._build(spec, artifact_dir, key)
            return
        if any(inst.info.function == spec.name for inst in self._instances.values()):
            log.info("not releasing what %s holds: an instance of it runs", spec.name)
            return
        for t in self.zygotes.templates():
            if _function_of(t.key) == spec.name:
                self.zygotes.discard(t.key)
        if to == Tier.RESIDENT:
            if spec.weights is not None and self.store.get(key) is None:
                async with self._store_misses:
                    seg, _ = await asyncio.to_thread(self.store.acquire, key, artifact_dir / spec.weights)
                self.store.release(key, seg.generation)
            return
        for k in list(self.store.keys()):
            if _function_of(k) == spec.name:
                self.store.evict(k)

    async def _build(self, spec: FunctionSpec, artifact_dir: Path, key: str) -> None:
        """The function's template, built ahead of demand (weights read first)."""
        segment = generation = None
        if spec.weights is not None:
            async with self._store_misses:
                seg, _ = await asyncio.to_thread(self.store.acquire, key, artifact_dir / spec.weights)
            segment, generation = seg.path, seg.generation
        config = WorkerConfig(
            instance_id=f"{spec.name}-template",
            spec=spec,
            artifact_dir=str(artifact_dir),
            socket_path=str(self._run_dir / f"{spec.name}-template.sock"),
            threads=max(1, int(spec.resources.cpu)),
        )
        try:
            await self.zygotes.prepare(key, config, segment)
        finally:
            if spec.weights is not None:
                self.store.release(key, generation)

    async def set_spares(self, function: str, spares: int) -> None:
        await self.zygotes.set_spares(function, spares)

    async def stop_runtime(self, runtime: str) -> bool:
        return await self.zygotes.stop_runtime(runtime)

    def readings(self) -> list[ResidentReading]:
        out = []
        for key in list(self.store.keys()):
            seg = self.store.get(key)
            if seg is not None:
                out.append(ResidentReading(f"weights:{key}", _function_of(key), seg.size / (1 << 20)))
        readings = self._read()
        for t in self.zygotes.templates():
            reading = readings.get(t.pid)
            if reading is None:
                continue
            owner = _function_of(t.key)
            out.append(ResidentReading(f"template:{t.key}", owner, reading.pss / (1 << 20)))
            for spare_pid, pss in reading.spares:
                out.append(ResidentReading(f"spare:{t.key}:{spare_pid}", owner, pss / (1 << 20)))
        for runtime in self.zygotes.runtimes():
            zygote = self.zygotes.zygote_pid(runtime)
            reading = readings.get(zygote) if zygote is not None else None
            if reading is not None:
                out.append(
                    ResidentReading(f"zygote:{runtime}", f"runtime:{runtime}", reading.pss / (1 << 20))
                )
        me = readings.get(os.getpid())
        if me is not None:
            out.append(ResidentReading(f"platform:{os.getpid()}", "platform", me.pss / (1 << 20)))
        return out

    def _read(self) -> dict[int, Reading]:
        """The last readings of the templates (and their spares), zygotes and this process."""
        zygotes = [pid for r in self.zygotes.runtimes() if (pid := self.zygotes.zygote_pid(r)) is not None]
        return self._readings.latest(
            [t.pid for t in self.zygotes.templates()],
            {inst.info.pid for inst in self._instances.values()},
            [*zygotes, os.getpid()],
        )

    # ------------------------------------------------------------ start

    async def start_instance(
        self, spec: FunctionSpec, artifact_dir: Path, where: Allocation | None = None
    ) -> StartedInstance:
        if where is not None and where.node != self.node:
            raise StartFailed(f"this node is {self.node!r}, not {where.node!r}")
        if spec.resources.on_gpu and (where is None or where.gpu_index is None):
            raise StartFailed(f"{spec.name} runs on a GPU but was placed on none")
        instance_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        cpu = where.cpu.cpu if where is not None else spec.resources.cpu
        config = WorkerConfig(
            instance_id=instance_id,
            spec=spec,
            artifact_dir=str(artifact_dir),
            socket_path=str(self._run_dir / f"{instance_id}.sock"),
            threads=max(1, int(cpu)),
        )
        if where is not None and where.gpu_index is not None:
            return await self._start_gpu(config, artifact_dir, where.gpu_index)
        if self.mode == "exec":
            return await self._start_exec(config)
        return await self._start_fork(config, artifact_dir)

    async def _start_gpu(self, config: WorkerConfig, artifact_dir: Path, gpu_index: int) -> StartedInstance:
        """An instance on a GPU (:mod:`smss.node.gpu`): its weights come from the GPU's
        copy, else from the host store's segment, else from the file."""
        spec = config.spec
        key = f"{spec.name}@{artifact_dir.name}"
        t0 = time.perf_counter()

        async def host() -> tuple[Path, int, Callable[[], None]]:
            source = artifact_dir / str(spec.weights)
            async with self._store_misses:
                seg, _ = await asyncio.to_thread(self.store.acquire, key, source)
            return seg.path, seg.size, lambda: self.store.release(key, seg.generation)

        try:
            started = await self.gpus.start(config, gpu_index, key, host if spec.weights else None)
        except CorruptWeights as e:
            log.error("weights of %s: %s", key, e.message)
            self.store.drop(key)
            raise
        info = self._info(config, started.pid)
        inst = _Instance(info, None, asyncio.Event(), lambda: None, release=started.release)
        inst.cancel_watch = watch_exit(started.pid, lambda: self._exited(inst, None))
        self._instances[info.id] = inst
        total = (time.perf_counter() - t0) * 1000
        phases = started.phases
        load = sum(phases.get(k, 0.0) for k in ("host", "upload", "build", "warm"))
        log.info("instance %s started on GPU %d in %.1f ms (%s)", info.id, gpu_index, total, _fmt(phases))
        return StartedInstance(
            info, StartTimings(spawn_ms=phases.get("serve", 0.0), load_ms=load, total_ms=total, phases=phases)
        )

    async def _start_fork(self, config: WorkerConfig, artifact_dir: Path) -> StartedInstance:
        spec = config.spec
        key = f"{spec.name}@{artifact_dir.name}"
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        segment = None
        weights_key = None
        generation = None
        if spec.weights is not None:
            source = artifact_dir / spec.weights
            cached = self.store.get(key)
            if cached is not None and cached.path.exists():  # a hit: no thread hop on the cold path
                seg, hit = self.store.acquire(key, source)
            else:
                async with self._store_misses:
                    seg, hit = await asyncio.to_thread(self.store.acquire, key, source)
            segment, weights_key, generation = seg.path, key, seg.generation
            if not hit:
                phases["weights"] = (time.perf_counter() - t0) * 1000
        try:
            t1 = time.perf_counter()
            zygote_starts = self.zygotes.zygote_starts
            template, warm = await self.zygotes.prepare(key, config, segment)
            if not warm:
                prepare_ms = (time.perf_counter() - t1) * 1000
                phases["prepare"] = prepare_ms
                phases["build"] = template.prepared.build_ms
                phases["warm"] = template.prepared.warm_ms
                if self.zygotes.zygote_starts != zygote_starts:
                    phases["zygote"] = prepare_ms - template.prepared.build_ms - template.prepared.warm_ms
            t2 = time.perf_counter()
            try:
                spawned = await self.zygotes.spawn(template, config)
            except StartFailed:
                # The template died since it was prepared: prepare a fresh one once. It may
                # have bound the instance's socket before dying, which would fail the retry.
                self.zygotes.discard(key)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(config.socket_path)
                template, _ = await self.zygotes.prepare(key, config, segment)
                spawned = await self.zygotes.spawn(template, config)
            phases["fork"] = spawned.fork_ms
            phases["spare"] = 1.0 if spawned.spare else 0.0
            phases["spawn_call"] = (time.perf_counter() - t2) * 1000
        except BaseException as e:
            if weights_key is not None:
                self.store.release(weights_key, generation)
                if isinstance(e, CorruptWeights):
                    # Not served again: the next start reloads the weights file (the
                    # instances that map the segment keep their mappings).
                    log.error("weights of %s: %s", key, e.message)
                    self.store.drop(weights_key)
            raise
        info = self._info(config, spawned.pid)
        entry = InstanceEntry(
            info,
            start_time(spawned.pid) or 0,
            str(artifact_dir),
            weights_key,
            str(artifact_dir / spec.weights) if spec.weights is not None else None,
        )
        self._roster.put(entry)
        inst = _Instance(
            info, weights_key, asyncio.Event(), lambda: None, entry=entry, weights_generation=generation
        )
        inst.cancel_watch = watch_exit(spawned.pid, lambda: self._exited(inst, None))
        self._instances[info.id] = inst
        total = (time.perf_counter() - t0) * 1000
        load = phases.get("weights", 0.0) + phases.get("build", 0.0) + phases.get("warm", 0.0)
        timings = StartTimings(spawn_ms=phases["spawn_call"], load_ms=load, total_ms=total, phases=phases)
        log.info("instance %s forked in %.1f ms (%s)", info.id, total, _fmt(phases))
        return StartedInstance(info, timings)

    async def _start_exec(self, config: WorkerConfig) -> StartedInstance:
        t0 = time.perf_counter()
        with (self._log_dir / f"{config.instance_id}.log").open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smss.node.worker",
                msgspec.json.encode(config).decode(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(config.threads)},
            )
        spawned = time.perf_counter()
        ready = await self._await_ready(process, config.instance_id)
        info = self._info(config, process.pid)
        inst = _Instance(info, None, asyncio.Event(), lambda: None, process)
        self._instances[info.id] = inst
        waiter = asyncio.get_running_loop().create_task(process.wait())
        waiter.add_done_callback(lambda t: self._exited(inst, t.result() if not t.cancelled() else None))

        def cancel_watch() -> None:  # the instance holds its watcher, as it holds a pidfd watch
            waiter.cancel()

        inst.cancel_watch = cancel_watch
        total = (time.perf_counter() - t0) * 1000
        phases = {"spawn": (spawned - t0) * 1000, "load": ready.load_ms}
        return StartedInstance(
            info, StartTimings(spawn_ms=phases["spawn"], load_ms=ready.load_ms, total_ms=total, phases=phases)
        )

    def _info(self, config: WorkerConfig, pid: int) -> InstanceInfo:
        return InstanceInfo(
            id=config.instance_id,
            function=config.spec.name,
            node=self.node,
            address=f"unix:{config.socket_path}",
            pid=pid,
            started_at=time.time(),
        )

    async def _await_ready(self, process: asyncio.subprocess.Process, instance_id: str) -> Ready:
        if process.stdout is None:
            raise StartFailed("worker has no stdout")
        try:
            line = await asyncio.wait_for(process.stdout.readline(), self._start_timeout_s)
        except TimeoutError:
            line = b""
        except asyncio.CancelledError:
            await _kill(process)
            raise
        try:
            ready = msgspec.json.decode(line, type=Ready) if line else None
        except msgspec.DecodeError:
            ready = None
        if ready is None or not ready.ok:
            await _kill(process)
            reason = (
                ready.error
                if ready
                else f"no ready signal within {self._start_timeout_s:.0f} s or exited early"
            )
            raise StartFailed(f"instance {instance_id} failed to start: {reason}")
        return ready

    # ------------------------------------------------------------ exit and stop

    def _exited(self, inst: _Instance, code: int | None) -> None:
        if inst.exited.is_set():
            return
        inst.exited.set()
        self._instances.pop(inst.info.id, None)
        if inst.entry is not None:
            self._roster.drop(inst.entry)
        if inst.weights_key is not None:
            self.store.release(inst.weights_key, inst.weights_generation)
        if inst.release is not None:
            inst.release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inst.info.address.partition(":")[2])
        if not inst.stopping:
            log.warning("instance %s exited unexpectedly (code %s)", inst.info.id, code)
            self._on_exit(inst.info.id, code if code is None or code >= 0 else None)

    async def stop_instance(self, instance_id: str, grace_s: float) -> None:
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        inst.stopping = True
        _signal(inst.info.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(inst.exited.wait(), grace_s)
        except TimeoutError:
            _signal(inst.info.pid, signal.SIGKILL)
            await inst.exited.wait()

    async def close(self) -> None:
        await asyncio.gather(*(self.stop_instance(i, 2.0) for i in list(self._instances)))
        await self.gpus.close()
        await self.zygotes.close()
        await self._readings.close()
        self.store.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)
        if self._state_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._state_file.unlink()

    # ------------------------------------------------------------ adoption

    async def recover(self) -> list[RunningInstance]:
        """Take over what a killed agent of this state file left running: its zygotes
        and templates (reconnected), and its instances (watched, and returned for the
        controller to adopt or stop). An instance whose weights file is gone (its
        function was redeployed or deleted) is stopped here."""
        await self.zygotes.adopt()
        found: list[RunningInstance] = []
        for entry in self._roster.entries():
            if not isinstance(entry, InstanceEntry):
                continue
            if start_time(entry.info.pid) != entry.started:
                self._roster.drop(entry)
                continue
            inst = self._watch_adopted(entry)
            if entry.weights_key is not None and entry.weights_source is not None:
                # Counted as a user of its template's weights, so they are not evicted under it.
                try:
                    async with self._store_misses:
                        await asyncio.to_thread(
                            self.store.acquire, entry.weights_key, Path(entry.weights_source)
                        )
                except (OSError, StorageUnavailable) as e:
                    log.warning("instance %s: its weights are gone (%s); stopping it", entry.info.id, e)
                    await self.stop_instance(entry.info.id, 0.0)
                    continue
                if inst.exited.is_set():  # it exited meanwhile, and released nothing
                    self.store.release(entry.weights_key)
                    continue
                inst.weights_key = entry.weights_key
            log.info("found instance %s (pid %d) still running", entry.info.id, entry.info.pid)
            found.append(RunningInstance(entry.info, entry.artifact_dir))
        return found

    def _watch_adopted(self, entry: InstanceEntry) -> _Instance:
        inst = _Instance(entry.info, None, asyncio.Event(), lambda: None, entry=entry)
        inst.cancel_watch = watch_exit(entry.info.pid, lambda: self._exited(inst, None))
        self._instances[entry.info.id] = inst
        return inst


def _function_of(key: str) -> str:
    """The function a weight-store or template key (``NAME@ARTIFACTS``) belongs to."""
    return key.partition("@")[0]


def _resident(node: str, alloc_id: str, key: str, kind: AllocationKind, size: int) -> Allocation:
    function = _function_of(key)
    return Allocation(alloc_id, function, kind, node, Capacity(memory_mb=-(-size // (1 << 20))))


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


def _fmt(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items())
