"""Device discovery for the node agent: the CPU and, where present, CUDA GPUs.

**CPU.** Usable cores are the fewest of: the CPUs this process may run on
(``sched_getaffinity``), the cgroup v2 quota (``cpu.max``: quota / period) and the
cgroup v1 CFS quota (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), each where set.
Host memory is the smaller of ``MemTotal`` (``/proc/meminfo``) and the cgroup limit
(v2 ``memory.max``, v1 ``memory.limit_in_bytes``). The cgroup of this process is read
from ``/proc/self/cgroup``; its directory and each ancestor up to the mount point
are looked at (a parent's limit binds a child too), and the mount point itself when
the path is not visible there (a container's own cgroup namespace).

**Reserve** (what the platform keeps for itself, :attr:`Device.reserved`):

* CPU: **0 cores**. The platform's own processes (gateway, controller, node agent)
  are idle between requests, and the gateway's CPU per request is part of each
  request's measured latency, not a standing load. An operator who wants headroom
  passes ``--cpus``.
* Host memory: **512 MiB + 5 % of host memory** (rounded down to a MiB, at most all
  of it): the OS, the gateway and the controller. What the platform keeps resident
  *for functions* (weights, templates, spares) is not part of the reserve: it is
  placed and counted as allocations like instances are.
* GPUs: nothing is reserved; a CUDA context is part of what an instance needs.

**Operator caps.** ``cpus`` / ``memory_mb`` (``smss serve --cpus N --memory SIZE``)
say how much of that resource the platform may use: ``total`` and ``capacity`` are
the cap, ``reserved`` is 0 for that resource (the operator has chosen the amount
the platform may place; the reserve only shapes the default). A cap above what the
machine has is refused (:class:`~smss.errors.InvalidSpec`), naming the resource
and the machine's amount.

**CUDA.** NVML (the ``pynvml`` module of the ``nvidia-ml-py`` package) if it can be
imported, else ``nvidia-smi`` if it is on ``PATH``, else no GPUs. Neither
initialises CUDA (no ``torch.cuda``, no CUDA context in the agent's long-lived
processes, whose forks would inherit it). Any failure of GPU discovery logs a
warning and reports no GPUs; nothing assumes a GPU exists. ``CUDA_VISIBLE_DEVICES``
(passed in as ``visible``) limits the GPUs to those it names, by index or UUID;
each keeps its physical index.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smss.errors import InvalidSpec
from smss.inventory import Capacity, Device, NodeInventory

log = logging.getLogger(__name__)

MIB = 1 << 20
#: Host memory reserve: a fixed part and a share of host memory.
RESERVE_FIXED_MB = 512
RESERVE_FRACTION = 0.05
NVIDIA_SMI_TIMEOUT_S = 5.0
NVIDIA_SMI_QUERY = "index,uuid,name,memory.total,memory.free"


@dataclass(frozen=True)
class Gpu:
    """A GPU as the driver reports it (memory in MiB; ``free_mb`` None when unknown)."""

    index: int
    uuid: str
    name: str
    total_mb: int
    free_mb: int | None


@dataclass(frozen=True)
class Host:
    """What the machine (or the cgroup this process runs in) has, and where each bound came from."""

    cores: float
    memory_mb: int
    cores_source: str
    memory_source: str
    cpu_name: str = "cpu"


# ------------------------------------------------------------------ CPU and memory


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    """An integer file's value; None when absent or not an integer ("max")."""
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _cgroup_paths(root: Path) -> dict[str, str]:
    """``/proc/self/cgroup``: controller ("" for v2) -> the process's cgroup path."""
    out: dict[str, str] = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out.setdefault(c, path)
    return out


def _cgroup_dirs(mount: Path, path: str | None) -> list[Path]:
    """The cgroup directory of ``path`` under ``mount`` and each ancestor up to the mount,
    the ones that exist; just the mount when none of them does."""
    dirs: list[Path] = []
    rel = Path((path or "/").lstrip("/"))
    while True:
        candidate = mount / rel
        if candidate.is_dir():
            dirs.append(candidate)
        if rel == rel.parent:
            break
        rel = rel.parent
    return dirs or [mount]


def _v1_mount(root: Path, *names: str) -> Path | None:
    base = root / "sys/fs/cgroup"
    return next((base / n for n in names if (base / n).is_dir()), None)


def _v2_mount(root: Path) -> Path | None:
    for mount in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"):
        if (mount / "cgroup.controllers").is_file():
            return mount
    return None


def _cgroup_cpu_limit(root: Path) -> tuple[float, str] | None:
    """The tightest CPU quota of the process's cgroups (v2 and v1), in cores."""
    paths = _cgroup_paths(root)
    limits: list[tuple[float, str]] = []
    v2 = _v2_mount(root)
    if v2 is not None:
        for d in _cgroup_dirs(v2, paths.get("")):
            fields = (_read(d / "cpu.max") or "").split()
            quota, period = (_int(fields[0]), _int(fields[1])) if len(fields) == 2 else (None, None)
            if quota is not None and period is not None and quota > 0 and period > 0:
                limits.append((quota / period, "cgroup v2 cpu.max"))
    v1 = _v1_mount(root, "cpu", "cpu,cpuacct", "cpuacct,cpu")
    if v1 is not None:
        for d in _cgroup_dirs(v1, paths.get("cpu")):
            quota, period = _int(_read(d / "cpu.cfs_quota_us")), _int(_read(d / "cpu.cfs_period_us"))
            if quota is not None and period is not None and quota > 0 and period > 0:
                limits.append((quota / period, "cgroup v1 cpu.cfs_quota_us"))
    return min(limits, default=None)


def _cgroup_memory_limit(root: Path) -> tuple[int, str] | None:
    """The tightest memory limit of the process's cgroups (v2 and v1), in MiB."""
    paths = _cgroup_paths(root)
    limits: list[tuple[int, str]] = []
    v2 = _v2_mount(root)
    if v2 is not None:
        for d in _cgroup_dirs(v2, paths.get("")):
            limit = _int(_read(d / "memory.max"))  # "max": no limit
            if limit is not None:
                limits.append((limit // MIB, "cgroup v2 memory.max"))
    v1 = _v1_mount(root, "memory")
    if v1 is not None:
        for d in _cgroup_dirs(v1, paths.get("memory")):
            limit = _int(_read(d / "memory.limit_in_bytes"))
            if limit is not None:  # "unlimited" is a huge number: min() with MemTotal drops it
                limits.append((limit // MIB, "cgroup v1 memory.limit_in_bytes"))
    return min(limits, default=None)


def _mem_total_mb(root: Path) -> int:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024  # kB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB  # no /proc


def _cpu_name(root: Path) -> str:
    try:
        with (root / "proc/cpuinfo").open() as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return "cpu"


def _affinity() -> int:
    return len(os.sched_getaffinity(0))


def host(root: Path = Path("/"), affinity: Callable[[], int] = _affinity) -> Host:
    """What the machine has for this process: cores and host memory (see the module doc)."""
    cores, cores_source = float(affinity()), "CPU affinity"
    quota = _cgroup_cpu_limit(root)
    if quota is not None and quota[0] < cores:
        cores, cores_source = quota
    memory, memory_source = _mem_total_mb(root), "MemTotal"
    limit = _cgroup_memory_limit(root)
    if limit is not None and limit[0] < memory:
        memory, memory_source = limit
    return Host(cores, memory, cores_source, memory_source, _cpu_name(root))


def memory_reserve_mb(host_memory_mb: int) -> int:
    """512 MiB + 5 % of host memory, at most all of it."""
    return min(host_memory_mb, RESERVE_FIXED_MB + int(host_memory_mb * RESERVE_FRACTION))


def cpu_device(machine: Host, *, cpus: float | None = None, memory_mb: int | None = None) -> Device:
    """The CPU device: the machine's amounts less the reserve, or the operator's caps."""
    if cpus is not None:
        if not (math.isfinite(cpus) and cpus > 0):
            raise InvalidSpec(f"--cpus must be a positive number of cores, not {cpus}")
        if cpus > machine.cores + 1e-9:
            raise InvalidSpec(
                f"--cpus {cpus:g} is more than this machine has: {machine.cores:g} cores "
                f"({machine.cores_source})"
            )
    if memory_mb is not None:
        if memory_mb < 1:
            raise InvalidSpec(f"--memory must be at least 1 MiB, not {memory_mb} MiB")
        if memory_mb > machine.memory_mb:
            raise InvalidSpec(
                f"--memory {memory_mb} MiB is more than this machine has: {machine.memory_mb} MiB "
                f"({machine.memory_source})"
            )
    total = Capacity(
        cpu=float(cpus) if cpus is not None else machine.cores,
        memory_mb=memory_mb if memory_mb is not None else machine.memory_mb,
    )
    reserved = Capacity(memory_mb=0 if memory_mb is not None else memory_reserve_mb(machine.memory_mb))
    return Device("cpu", 0, machine.cpu_name, total - reserved, total, reserved)


# ------------------------------------------------------------------ CUDA


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """The output of ``nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.free
    --format=csv,noheader,nounits``; memory in MiB, ``[N/A]`` free memory is None.
    Raises ValueError on a line it cannot read."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5:
            raise ValueError(f"unexpected nvidia-smi line {line!r}")
        index, uuid, *name, total, free = fields
        gpus.append(
            Gpu(
                int(index),
                uuid,
                ", ".join(name),
                int(float(total)),
                None if free.startswith("[") else int(float(free)),
            )
        )
    return gpus


def _nvidia_smi() -> list[Gpu]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    done = subprocess.run(
        [exe, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=NVIDIA_SMI_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"nvidia-smi exited with {done.returncode}: {message[0] if message else ''}")
    return parse_nvidia_smi(done.stdout)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml(nvml: Any) -> list[Gpu]:
    """Every GPU through NVML (no CUDA context is created)."""
    nvml.nvmlInit()
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                Gpu(
                    i,
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                    _text(nvml.nvmlDeviceGetName(handle)),
                    int(mem.total) // MIB,
                    int(mem.free) // MIB,
                )
            )
        return gpus
    finally:
        nvml.nvmlShutdown()


def probe_gpus() -> list[Gpu]:
    """The GPUs of this machine: NVML if importable, else nvidia-smi, else none.
    Raises on a failure (``discover`` turns it into a warning)."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return _nvidia_smi()
    no_driver = tuple(
        getattr(nvml, name)
        for name in ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")
        if isinstance(getattr(nvml, name, None), type)
    )
    try:
        return _nvml(nvml)
    except no_driver:  # pynvml installed on a machine without an NVIDIA driver
        log.debug("NVML found no NVIDIA driver; no GPUs")
        return []


def visible_gpus(gpus: Sequence[Gpu], visible: str | None) -> list[Gpu]:
    """The GPUs ``CUDA_VISIBLE_DEVICES`` names (all when unset), in its order. As CUDA
    does, the list ends at the first entry that names no GPU; an empty value hides all."""
    if visible is None:
        return list(gpus)
    chosen: list[Gpu] = []
    for entry in (e.strip() for e in visible.split(",")):
        match = next(
            (
                g
                for g in gpus
                if entry == str(g.index) or (entry.startswith("GPU-") and g.uuid.startswith(entry))
            ),
            None,
        )
        if match is None:
            break
        if match not in chosen:
            chosen.append(match)
    return chosen


def gpu_device(gpu: Gpu) -> Device:
    cap = Capacity(gpu=1.0, gpu_memory_mb=gpu.total_mb)
    return Device("cuda", gpu.index, gpu.name, cap, cap, Capacity(), gpu.free_mb)


# ------------------------------------------------------------------ discovery


def discover(
    node: str = "local",
    *,
    cpus: float | None = None,
    memory_mb: int | None = None,
    visible: str | None = None,
    root: Path = Path("/"),
    affinity: Callable[[], int] = _affinity,
    gpus: Callable[[], list[Gpu]] = probe_gpus,
) -> NodeInventory:
    """This node's devices: the CPU (index 0), then each visible CUDA GPU.

    ``cpus`` / ``memory_mb``: the operator's caps (InvalidSpec when above the machine's
    amount); ``visible``: ``CUDA_VISIBLE_DEVICES``; ``root``, ``affinity`` and ``gpus``
    are where the facts come from (tests pass fakes)."""
    cpu = cpu_device(host(root, affinity), cpus=cpus, memory_mb=memory_mb)
    try:
        found = visible_gpus(gpus(), visible)
    except Exception as e:
        log.warning("GPU discovery failed, reporting no GPUs: %s: %s", type(e).__name__, e)
        found = []
    return NodeInventory(node, (cpu, *(gpu_device(g) for g in found)))
