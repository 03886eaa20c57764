"""Helpers for the integration tests: artifact directories, a backend run that must leave
nothing behind, and readers of ``/proc`` (page frames, ``smaps``, process liveness)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smss.demo import models
from smss.demo.generate import ensure_artifact
from smss.node.agent import NodeAgent
from smss.node.channel import UnixChannel
from smss.packaging import Package, load_class, package_class
from smss.ports import InstanceInfo
from smss.spec import FunctionSpec

SHM = Path("/dev/shm")
MODELS = Path(__file__).parent / "models"
RUNTIMES = ("torch", "onnx", "python")
#: Upper bound on waits for something that is expected to happen promptly (a process to die).
WAIT_S = 30.0


# ------------------------------------------------------------------ artifacts


@dataclass(frozen=True)
class Function:
    """A function as the platform installs it: a spec and its artifact directory."""

    spec: FunctionSpec
    artifact_dir: Path

    @property
    def weights(self) -> Path:
        assert self.spec.weights is not None
        return self.artifact_dir / self.spec.weights


def install(package: Package, directory: Path) -> Function:
    """Lay out ``package`` as ``ArtifactStore.install`` does: the source under its entrypoint
    file name, the weights under ``spec.weights``."""
    directory.mkdir(parents=True)
    (directory / package.spec.entrypoint.partition(":")[0]).write_text(package.source)
    if package.weights is not None and package.spec.weights is not None:
        shutil.copyfile(package.weights, directory / package.spec.weights)
    return Function(package.spec, directory)


def demo_function(base: Path, name: str) -> Function:
    """Demo model ``name`` (weights generated under ``base/weights``) installed in ``base/name/g1``."""
    artifact = ensure_artifact(base / "weights", name)
    cls = getattr(models, artifact.class_name)
    return install(package_class(artifact.source, cls, artifact.weights), base / name / "g1")


def model_file_function(target: str, weights: Path | None, directory: Path) -> Function:
    """A model file of ``tests/integration/models`` (``FILE.py:Class``) packaged as a deploy would."""
    path, cls = load_class(str(MODELS / target))
    return install(package_class(path, cls, weights), directory)


# ------------------------------------------------------------------ requests


async def infer(
    info: InstanceInfo, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
) -> dict[str, Any]:
    """One request on a fresh channel to the instance."""
    channel = await UnixChannel.connect(info)
    try:
        return await channel.infer(inputs, outputs)
    finally:
        await channel.close()


async def until(predicate: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll (yielding to the event loop) until ``predicate()`` holds; fail after a generous bound."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ /proc


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (state first), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rfind(")") + 2 :].split()


@dataclass(frozen=True)
class Proc:
    """A process identified by pid and start time, so a reused pid is not mistaken for it."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        fields = _stat_fields(pid)
        return None if fields is None else cls(pid, int(fields[19]))

    def alive(self) -> bool:
        fields = _stat_fields(self.pid)
        return fields is not None and fields[0] != "Z" and int(fields[19]) == self.start


def alive(pid: int) -> bool:
    proc = Proc.of(pid)
    return proc is not None and proc.alive()


_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63
PAGE = 4096


def page_frames(pid: int, addresses: Iterable[int]) -> list[int | None]:
    """Physical frame number of the page at each virtual address of ``pid`` (``None``: not
    present). Without CAP_SYS_ADMIN the kernel reports present pages with frame 0."""
    out: list[int | None] = []
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for address in addresses:
            f.seek(address // PAGE * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
            out.append(entry & _PFN_MASK if entry & _PRESENT else None)
    return out


@dataclass(frozen=True)
class Region:
    """One mapping from ``/proc/PID/smaps``; sizes in kB."""

    start: int
    end: int
    perms: str
    path: str
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def shared_kb(self) -> int:
        return self.sizes["Shared_Clean"] + self.sizes["Shared_Dirty"]


def smaps_region(pid: int, address: int) -> Region:
    """The mapping of ``pid`` that contains ``address``."""
    region: Region | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head, _, rest = line.partition(" ")
        if head.endswith(":"):
            if region is not None and rest.strip().endswith("kB"):
                region.sizes[head[:-1]] = int(rest.split()[0])
            continue
        if region is not None:
            return region  # the next mapping starts
        low, high = (int(v, 16) for v in head.split("-"))
        if low <= address < high:
            parts = line.split(None, 5)
            region = Region(low, high, parts[1], parts[5] if len(parts) > 5 else "")
    if region is None:
        raise AssertionError(f"no mapping of process {pid} contains {address:#x}")
    return region


# ------------------------------------------------------------------ a backend run


class RunRecord:
    """Every process and ``/dev/shm`` prefix a :class:`NodeAgent` run made, so a test can
    check that ``close()`` leaves none of them behind. Call :meth:`note` after each start."""

    def __init__(self, backend: NodeAgent) -> None:
        self.backend = backend
        self.processes: set[Proc] = set()
        self.shm_prefixes: set[str] = set()

    def note(self, *pids: int) -> None:
        zygotes = [self.backend.zygotes.zygote_pid(r) for r in RUNTIMES]
        templates = [t.pid for t in self.backend.zygotes.templates()]
        instances = list(self.backend.pids().values())
        for pid in (*pids, *zygotes, *templates, *instances):
            if pid is not None and (proc := Proc.of(pid)) is not None:
                self.processes.add(proc)
        for key in self.backend.store.stats().models:
            segment = self.backend.store.get(key)
            if segment is not None:
                # Segments are named "<run dir name>-<key>-<generation>"; the run dir is "smss-XXXX".
                self.shm_prefixes.add("-".join(segment.path.name.split("-")[:2]) + "-")

    def leftovers(self) -> tuple[list[Proc], list[str]]:
        procs = sorted((p for p in self.processes if p.alive()), key=lambda p: p.pid)
        shm = sorted(e.name for e in SHM.iterdir() if e.name.startswith(tuple(self.shm_prefixes)))
        return procs, shm

    async def close_and_check(self) -> None:
        """Close the backend; every process of the run must be gone and no segment left."""
        self.note()
        await self.backend.close()
        with contextlib.suppress(AssertionError):
            # Templates and instances die by PDEATHSIG or SIGKILL, after close() returns.
            await until(lambda: not any(p.alive() for p in self.processes), "the run's processes to exit")
        procs, shm = self.leftovers()
        assert not procs, f"processes of the run still alive after close(): {procs}"
        assert not shm, f"/dev/shm segments of the run left after close(): {shm}"


@contextlib.asynccontextmanager
async def local_backend(log_dir: Path, **options: Any) -> AsyncIterator[tuple[NodeAgent, RunRecord]]:
    """A fork-mode NodeAgent, closed however the test ends."""
    backend = NodeAgent(log_dir, **options)
    try:
        yield backend, RunRecord(backend)
    finally:
        await backend.close()
