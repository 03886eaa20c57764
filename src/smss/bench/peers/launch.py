"""How a system of ``smss bench peers`` is started: the cores it gets and its command.

Every system gets the same share of the machine: its processes (and everything
they start) run under ``taskset`` on :attr:`Placement.server_cores`, every
process with one torch / OpenMP / BLAS thread (:data:`~smss.bench.peers.common.THREAD_ENV`),
and the load generator runs alone on :attr:`Placement.loadgen_core`. Where a
system scales by instances (SMSS, Ray Serve, MLServer's workers), it may run as
many as the model's spec allows, at most one per server core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from smss.bench.peers.common import THREAD_ENV, ModelInfo


@dataclass(frozen=True)
class Placement:
    server_cores: tuple[int, ...]
    loadgen_core: int
    threads: int = 1

    @classmethod
    def of(cls, cores: Sequence[int]) -> Placement:
        """The last of ``cores`` for the load generator, the others for the system (on
        a one-core machine they share it)."""
        ordered = sorted(cores)
        if len(ordered) == 1:
            return cls((ordered[0],), ordered[0])
        return cls(tuple(ordered[:-1]), ordered[-1])

    def taskset(self) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, self.server_cores))]

    def loadgen_taskset(self) -> list[str]:
        return ["taskset", "-c", str(self.loadgen_core)]

    def max_instances(self, info: ModelInfo) -> int:
        """The instances (replicas, workers) a scaling system may run for ``info``."""
        return max(1, min(info.max_instances, len(self.server_cores)))

    def env(self) -> dict[str, str]:
        return dict(THREAD_ENV)

    def describe(self) -> dict[str, object]:
        return {
            "server_cores": list(self.server_cores),
            "loadgen_core": self.loadgen_core,
            "shared_core": self.loadgen_core in self.server_cores,
            "threads_per_process": self.threads,
            "thread_env": self.env(),
            "how": "each system's processes under taskset on server_cores (children inherit it), "
            "one torch/OpenMP/BLAS thread per process; the load generator alone on loadgen_core",
        }


@dataclass(frozen=True)
class Launch:
    """One system serving one model: its command (run under the placement's taskset)
    and where to reach it."""

    argv: list[str]
    url: str
    infer_path: str
    #: Takes the binary tensor extension (raw input bytes after a JSON header).
    binary: bool
    #: What the system was configured with, as recorded in the output.
    settings: dict[str, object]
    env: dict[str, str] = field(default_factory=dict)
    #: Files written under the work directory before the start: relative path -> text.
    files: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    ready_timeout_s: float = 240.0
