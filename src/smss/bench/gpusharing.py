"""``smss bench gpu-sharing``: two-layer GPU sharing on one GPU, as one JSON object.

Measured at the node (the node agent's own start path and the instance's socket, as
the gateway reaches it), for ``cnn`` (11M parameters) and ``cnn_large`` (~100M), each
declared ``device="cuda"`` with a ``gpu_memory`` share; the first request is batch 1.

Per model (``models``):

* ``cold_ms`` (median of ``tries``): a start after scale to zero, from a GPU-resident
  copy, as the platform runs by default (spares on): the model's spare, a standby
  bound to the GPU copy and rehearsed ahead, is handed the start; then its first
  request. ``cold_resident_ms``: the same without spares: a ready standby opens the
  GPU copy by CUDA IPC, builds the model, warms it, serves;
* ``cold_host_ms``: the GPU copy stepped down, the weights in host shared memory (the
  owner copies them to the GPU, then a standby binds);
* ``cold_disk_ms``: both copies gone: the file (its pages dropped from the page cache
  with ``posix_fadvise``) is read into host shared memory, then as above;
* ``naive_ms``: a container-style start: a new process, ``import torch``, CUDA
  initialisation, the file loaded onto the GPU, the first batch, over a socket;
* ``warm_ms``: the same request to a warm instance after ``AT_ZERO_S`` idle (as the
  cold tries meet the machine), ``warm_back_to_back_ms`` in a stream of 20;
* ``start_ms`` = cold - warm per tier; ``speedup`` = (naive - warm) / (cold - warm);
* ``phases_ms``: where each tier's last start went (:mod:`smss.node.gpu.node`), and
  ``first_start_ms`` with its phases: the very first start, which also paid for the
  GPU's owner and a standby (interpreter, ``import torch``, CUDA context, libraries).

``instances_per_gpu`` (per model): 8 instances on the GPU with sharing (one copy of
the weights) and without (8 functions of the same model, each its own copy), the GPU
memory each run takes (device memory in use, NVML, less before the run; the owner and
the standby pool are in both), and how many instances of that size fit the GPU.

``throughput``: 4 models (``cnn``, ``cnn_large`` and a second function of each), one
instance each on the GPU, closed-loop clients sending batches of 8 for ``seconds``:
all 4 at once (sharing the GPU) vs each alone for a quarter of the time (one at a time).

``goals`` checks the issue's targets on these figures. Figures are one run's; a GPU
shared with other work, or a small machine, moves them.

``--backend host`` runs the same on the CPU path (host shared memory, a pretend GPU):
a smoke test of the harness; its figures say nothing about GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from smss.inventory import Allocation, Capacity, Device, NodeInventory
from smss.node.agent import NodeAgent
from smss.node.channel import UnixChannel
from smss.node.devices import discover, probe_gpus
from smss.node.gpu.node import GpuSettings
from smss.node.gpu.proto import Backend
from smss.node.gpu.shares import process_env
from smss.ports import InstanceInfo, StartedInstance
from smss.spec import FunctionSpec, Resources

TRIES = 5
AT_ZERO_S = 1.0
MODELS = ("cnn", "cnn_large")
#: The share each instance declares (its CUDA context and activations; the weights are apart).
SHARE_MB = {"cnn": 1536, "cnn_large": 1536}
#: Where the pretend GPU of ``--backend host`` ends.
HOST_GPU_MB = 16384
GPU = 0
MIN_START_MS = 0.1


class Function(msgspec.Struct, frozen=True):
    spec: FunctionSpec
    directory: str

    @property
    def path(self) -> Path:
        return Path(self.directory)


def run(
    backend: Backend = "cuda",
    tries: int = TRIES,
    instances: int = 8,
    seconds: float = 20.0,
    logs: Path | None = None,
) -> dict[str, Any]:
    """The benchmark's JSON object. ``logs``: where the GPU processes' logs go (kept),
    else a temporary directory."""
    inventory = _inventory(backend)
    if inventory is None:
        return {
            "error": "no CUDA GPU: NVML and nvidia-smi find none (run on a GPU machine, or --backend host)"
        }
    if backend == "cuda" and importlib.util.find_spec("torch") is None:
        return {"error": "torch is not installed"}
    device = next(d for d in inventory.devices if d.kind == "cuda" and d.index == GPU)
    out: dict[str, Any] = {
        "backend": backend,
        "device": {"name": device.name, "memory_mb": device.total.gpu_memory_mb, "index": GPU},
        "tries": tries,
    }
    with tempfile.TemporaryDirectory(prefix="smss-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        functions = _install(tmp)
        out["models"] = {
            name: {"weights_mb": _mb(_weights(f).stat().st_size)} for name, f in functions.items()
        }
        for name, f in functions.items():
            out["models"][name].update(_guard(lambda f=f: _naive(f, backend, tmp, tries)))
        asyncio.run(
            _on_the_node(out, functions, inventory, backend, tmp, logs or tmp, tries, instances, seconds)
        )
    out["goals"] = _goals(out)
    return out


async def _on_the_node(
    out: dict[str, Any],
    functions: dict[str, Function],
    inventory: NodeInventory,
    backend: Backend,
    tmp: Path,
    logs: Path,
    tries: int,
    instances: int,
    seconds: float,
) -> None:
    """Everything measured through a node agent; each agent logs under ``logs``."""
    for name, f in functions.items():
        row = out["models"][name]
        row.update(await _aguard(_tiers(f, inventory, backend, logs / f"tiers-{name}", tries)))
        row.update(await _aguard(_spares(f, inventory, backend, logs / f"spares-{name}", tries)))
        _speedups(row)
    out["instances_per_gpu"] = {
        name: await _aguard(_density(f, inventory, backend, tmp / f"density-{name}", logs, instances))
        for name, f in functions.items()
    }
    out["throughput"] = await _aguard(_throughput(functions, inventory, backend, tmp, logs, seconds))


# ------------------------------------------------------------------ set-up


def _inventory(backend: Backend) -> NodeInventory | None:
    inventory = discover("local")
    if backend == "host":
        cap = Capacity(gpu=1.0, gpu_memory_mb=HOST_GPU_MB)
        cpu = inventory.cpu
        return NodeInventory("local", (cpu, Device("cuda", GPU, "pretend GPU (host memory)", cap, cap)))
    if inventory.device("cuda", GPU) is None:
        return None
    return inventory


def _install(tmp: Path) -> dict[str, Function]:
    from smss.demo import models
    from smss.demo.generate import ensure_artifact
    from smss.packaging import package_class

    out = {}
    for name in MODELS:
        art = ensure_artifact(tmp / "weights", name)
        package = package_class(art.source, getattr(models, art.class_name), art.weights)
        resources = Resources(cpu=1.0, memory_mb=1024, gpu_memory_mb=SHARE_MB[name], device="cuda")
        out[name] = _lay_out(msgspec.structs.replace(package.spec, resources=resources), package, tmp / name)
    return out


def _lay_out(spec: FunctionSpec, package: Any, directory: Path) -> Function:
    directory.mkdir(parents=True)
    (directory / spec.entrypoint.partition(":")[0]).write_text(package.source)
    if spec.weights is not None:
        shutil.copyfile(package.weights, directory / spec.weights)
    return Function(spec, str(directory))


def _copy(f: Function, name: str, tmp: Path) -> Function:
    """Another function of the same model (its own name, so its own copy of the weights)."""
    directory = tmp / name / "g1"
    shutil.copytree(f.path, directory)
    return Function(msgspec.structs.replace(f.spec, name=name), str(directory))


def _weights(f: Function) -> Path:
    return f.path / str(f.spec.weights)


def _agent(inventory: NodeInventory, backend: Backend, logs: Path, **settings: Any) -> NodeAgent:
    options: dict[str, Any] = {"backend": backend, "spares": False, "start_timeout_s": 300.0, **settings}
    return NodeAgent(logs, inventory=inventory, gpu=GpuSettings(**options))


def _where(f: Function, n: int) -> Allocation:
    r = f.spec.resources
    return Allocation(
        f"{f.spec.name}#bench{n}",
        f.spec.name,
        "instance",
        "local",
        Capacity(cpu=r.cpu, memory_mb=r.memory_mb),
        Capacity(gpu=r.gpu, gpu_memory_mb=r.gpu_memory_mb),
        GPU,
    )


def _image(batch: int = 1) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, 3, 64, 64), dtype=np.float32)


# ------------------------------------------------------------------ requests


async def _request_ms(info: InstanceInfo, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    channel = await UnixChannel.connect(info)
    try:
        await channel.infer({"image": x}, ("logits",))
    finally:
        await channel.close()
    return (time.perf_counter() - t0) * 1000


async def _cold(agent: NodeAgent, f: Function, n: int) -> tuple[float, StartedInstance]:
    """A start and its first request, ms."""
    t0 = time.perf_counter()
    started = await agent.start_instance(f.spec, f.path, _where(f, n))
    await _request_ms(started.info, _image())
    return (time.perf_counter() - t0) * 1000, started


async def _settle(agent: NodeAgent) -> None:
    await agent.gpus.settled()
    await asyncio.sleep(AT_ZERO_S)


def _drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def _tiers(
    f: Function, inventory: NodeInventory, backend: Backend, logs: Path, tries: int
) -> dict[str, Any]:
    """The tiers without spares: resident (GPU copy), host, disk; and warm."""
    agent = _agent(inventory, backend, logs)
    x = _image()
    try:
        first_ms, inst = await _cold(agent, f, 0)
        first_phases = dict(inst.timings.phases)
        await _settle(agent)
        b2b = statistics.median([await _request_ms(inst.info, x) for _ in range(20)])
        samples: dict[str, list[float]] = {"warm": [], "resident": [], "host": [], "disk": []}
        phases: dict[str, dict[str, float]] = {}
        n = 1
        for tier in ("resident", "host", "disk"):
            for _ in range(tries):
                await asyncio.sleep(AT_ZERO_S)
                samples["warm"].append(await _request_ms(inst.info, x))
                await agent.stop_instance(inst.info.id, 10.0)
                if tier == "host":
                    await agent.gpus.step_down(f.spec.name)
                elif tier == "disk":
                    agent.evict_weights(f.spec.name)
                    await agent.gpus.settled()
                    _drop_page_cache(_weights(f))
                await _settle(agent)
                ms, inst = await _cold(agent, f, n)
                n += 1
                samples[tier].append(ms)
                phases[tier] = _rounded(inst.timings.phases)
        await agent.stop_instance(inst.info.id, 10.0)
    finally:
        await agent.close()
    return {
        "warm_ms": _median(samples["warm"]),
        "warm_back_to_back_ms": round(b2b, 2),
        "cold_resident_ms": _median(samples["resident"]),
        "cold_host_ms": _median(samples["host"]),
        "cold_disk_ms": _median(samples["disk"]),
        "samples_ms": {k: [round(v, 2) for v in vs] for k, vs in samples.items()},
        "first_start_ms": round(first_ms, 1),
        "phases_ms": {"first": _rounded(first_phases), **phases},
    }


async def _spares(
    f: Function, inventory: NodeInventory, backend: Backend, logs: Path, tries: int
) -> dict[str, Any]:
    """The default platform: spares on; ``cold_ms`` from the GPU copy through the spare."""
    agent = _agent(inventory, backend, logs, spares=True)
    x = _image()
    cold: list[float] = []
    warm: list[float] = []
    phases: dict[str, float] = {}
    try:
        _, inst = await _cold(agent, f, 0)
        for n in range(1, tries + 1):
            await _settle(agent)
            warm.append(await _request_ms(inst.info, x))
            await agent.stop_instance(inst.info.id, 10.0)
            await _settle(agent)
            ms, inst = await _cold(agent, f, n)
            cold.append(ms)
            phases = _rounded(inst.timings.phases)
        await agent.stop_instance(inst.info.id, 10.0)
    finally:
        await agent.close()
    return {
        "cold_ms": _median(cold),
        "warm_spares_ms": _median(warm),
        "samples_ms_spare": [round(c, 2) for c in cold],
        "phases_ms_spare": phases,
    }


def _speedups(row: dict[str, Any]) -> None:
    warm = row.get("warm_ms")
    naive = row.get("naive_ms")
    if not isinstance(warm, float):
        return
    for tier, key in (
        ("spare", "cold_ms"),
        ("resident", "cold_resident_ms"),
        ("host", "cold_host_ms"),
        ("disk", "cold_disk_ms"),
    ):
        cold = row.get(key)
        if isinstance(cold, float):
            start = cold - warm
            row.setdefault("start_ms", {})[tier] = round(start, 2)
            if isinstance(naive, float):
                row.setdefault("speedup", {})[tier] = round((naive - warm) / max(start, MIN_START_MS), 1)


# ------------------------------------------------------------------ naive


def _naive(f: Function, backend: Backend, tmp: Path, tries: int) -> dict[str, Any]:
    file_name, _, class_name = f.spec.entrypoint.partition(":")
    device = "cuda:0" if backend == "cuda" else "cpu"
    env = {**os.environ, **(process_env(GPU, None) if backend == "cuda" else {})}
    times = [
        asyncio.run(
            _naive_once(f.path / file_name, class_name, _weights(f), tmp / f"naive-{k}.sock", device, env)
        )
        for k in range(tries)
    ]
    return {"naive_ms": _median(times)}


async def _naive_once(
    source: Path, class_name: str, weights: Path, sock: Path, device: str, env: dict[str, str]
) -> float:
    """A new process to its first answer, ms (:mod:`smss.bench.naive`)."""
    from smss.node import ipc

    x = _image()
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smss.bench.naive",
        str(source),
        class_name,
        str(weights),
        str(sock),
        device,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    try:
        await asyncio.wait_for(proc.stdout.readline(), 300)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        metas, buffers = ipc.tensor_metas({"image": x})
        ipc.write_frame(writer, ipc.Infer(1, metas, ("logits",)), buffers)
        await ipc.read_frame(reader)
        elapsed = (time.perf_counter() - t0) * 1000
        writer.close()
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return elapsed


# ------------------------------------------------------------------ density


def _gpu_used_mb() -> int | None:
    """Device memory in use on the GPU (NVML / nvidia-smi: no CUDA context here)."""
    gpu = next((g for g in probe_gpus() if g.index == GPU), None)
    if gpu is None or gpu.free_mb is None:
        return None
    return gpu.total_mb - gpu.free_mb


async def _density(
    f: Function, inventory: NodeInventory, backend: Backend, tmp: Path, logs: Path, instances: int
) -> dict[str, Any]:
    device = inventory.device("cuda", GPU)
    assert device is not None
    total = device.total.gpu_memory_mb
    out: dict[str, Any] = {"instances": instances}
    for mode in ("with_sharing", "without_sharing"):
        if mode == "with_sharing":
            fns = [f] * instances
        else:
            fns = [_copy(f, f"{f.spec.name}_own{k}", tmp / mode) for k in range(instances)]
        await asyncio.sleep(AT_ZERO_S)  # the last run's processes' memory is given back
        before = _gpu_used_mb() if backend == "cuda" else 0
        agent = _agent(inventory, backend, logs / f"{tmp.name}-{mode}", standbys=min(instances, 8))
        try:
            for k, fn in enumerate(fns):
                await agent.start_instance(fn.spec, fn.path, _where(fn, k))
            await agent.gpus.settled()
            after = _gpu_used_mb() if backend == "cuda" else None
            resident = sum(a.gpu.gpu_memory_mb for a in agent.gpus.resident() if a.kind == "weights")
        finally:
            await agent.close()
        used = None if after is None or before is None else after - before
        per = used / instances if used else None
        out[mode] = {
            "gpu_used_mb": used,
            "per_instance_mb": round(per, 1) if per else None,
            "weights_on_gpu_mb": resident,
            "fit": math.floor(total / per) if per else None,
        }
    shared, own = out["with_sharing"]["fit"], out["without_sharing"]["fit"]
    out["ratio"] = round(shared / own, 2) if shared and own else None
    if backend != "cuda":
        out["note"] = "host backend: no GPU memory to measure"
    return out


# ------------------------------------------------------------------ throughput


async def _throughput(
    functions: dict[str, Function],
    inventory: NodeInventory,
    backend: Backend,
    tmp: Path,
    logs: Path,
    seconds: float,
) -> dict[str, Any]:
    fns = [functions["cnn"], functions["cnn_large"]]
    fns += [_copy(f, f"{f.spec.name}_b", tmp / "throughput") for f in fns]
    agent = _agent(inventory, backend, logs / "throughput", standbys=len(fns))
    x = _image(8)
    try:
        started = [await agent.start_instance(fn.spec, fn.path, _where(fn, k)) for k, fn in enumerate(fns)]
        await agent.gpus.settled()
        for s in started:
            await _request_ms(s.info, x)
        shared = await _load([s.info for s in started], x, seconds)
        alone: dict[str, int] = {}
        for s in started:
            alone.update(await _load([s.info], x, seconds / len(started)))
    finally:
        await agent.close()
    images = x.shape[0]
    shared_rps = sum(shared.values()) / seconds
    alone_rps = sum(alone.values()) / seconds
    return {
        "models": [fn.spec.name for fn in fns],
        "batch": images,
        "seconds": seconds,
        "shared_images_per_s": round(shared_rps * images, 1),
        "one_at_a_time_images_per_s": round(alone_rps * images, 1),
        "ratio": round(shared_rps / alone_rps, 2) if alone_rps else None,
        "shared_requests": shared,
        "one_at_a_time_requests": alone,
    }


async def _load(infos: list[InstanceInfo], x: np.ndarray, seconds: float, clients: int = 4) -> dict[str, int]:
    """Closed loop: ``clients`` requesters per instance for ``seconds``; answers per function."""
    deadline = time.perf_counter() + seconds
    counts = {i.function: 0 for i in infos}

    async def client(info: InstanceInfo) -> None:
        channel = await UnixChannel.connect(info)
        try:
            while time.perf_counter() < deadline:
                await channel.infer({"image": x}, ("logits",))
                counts[info.function] += 1
        finally:
            await channel.close()

    async with asyncio.TaskGroup() as group:
        for info in infos:
            for _ in range(clients):
                group.create_task(client(info))
    return counts


# ------------------------------------------------------------------ goals


def _goals(out: dict[str, Any]) -> dict[str, Any]:
    rows = out.get("models", {})
    goals: dict[str, Any] = {}
    starts = {}
    for name, row in rows.items():
        start = row.get("start_ms", {})
        speed = row.get("speedup", {})
        starts[name] = start
        goals[name] = {
            "speedup_100x_spare": _ge(speed.get("spare"), 100),
            "speedup_100x_resident": _ge(speed.get("resident"), 100),
            "start_at_most_10ms_spare": _le(start.get("spare"), 10),
            "start_at_most_10ms_resident": _le(start.get("resident"), 10),
        }
    small, large = starts.get("cnn", {}), starts.get("cnn_large", {})
    for tier in ("spare", "resident"):
        a, b = small.get(tier), large.get(tier)
        # "Not growing with size": the 9x larger model starts within 2 ms (or 50 %) of the small one.
        goals[f"start_not_growing_with_size_{tier}"] = (
            None if a is None or b is None else bool(b <= max(a + 2.0, 1.5 * a))
        )
    density = out.get("instances_per_gpu", {})
    goals["instances_4x"] = {
        name: _ge(d.get("ratio") if isinstance(d, dict) else None, 4) for name, d in density.items()
    }
    return goals


def _ge(value: object, bound: float) -> bool | None:
    return None if not isinstance(value, int | float) else bool(value >= bound)


def _le(value: object, bound: float) -> bool | None:
    return None if not isinstance(value, int | float) else bool(value <= bound)


# ------------------------------------------------------------------ small things


def _median(values: list[float]) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return round(statistics.median(values), 2) if values else None


def _rounded(phases: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in phases.items()}


def _mb(n: int) -> float:
    return round(n / (1 << 20), 1)


def _guard(fn: Any) -> dict[str, Any]:
    """A measurement's fields, or its error (the others still run)."""
    try:
        result: dict[str, Any] = fn()
        return result
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:500]}


async def _aguard(coro: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = await coro
        return result
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:500]}
