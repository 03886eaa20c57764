"""The platform as the API sees it: deploy, delete, list, infer.

Composes the durable registry, the artifact store and the controller. The
registry is the source of truth: on start every registered function is handed
to the controller again (at zero instances, or ``min_instances``), so a
restart of ``smss serve`` keeps every deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smss.app.workflow_registry import WorkflowRegistry
from smss.control.controller import Controller, FunctionRuntime
from smss.control.dispatcher import Served
from smss.errors import Conflict, NotFound
from smss.inventory import DeviceReport
from smss.ports import Clock, ClusterBackend, EventLog, FunctionRecord, RegistryStore, Tensors
from smss.spec import FunctionSpec
from smss.store.artifacts import ArtifactStore
from smss.workflow.engine import Engine


@dataclass(frozen=True)
class InstanceStatus:
    id: str
    node: str
    pid: int
    state: str
    in_flight: int
    served: int


@dataclass(frozen=True)
class FunctionStatus:
    spec: FunctionSpec
    generation: int
    instances: tuple[InstanceStatus, ...]
    starting: int
    queued: int
    cold_starts: int
    last_error: str | None
    #: ``failed``: no more starts are tried (see ``Controller.load``); ``ready``: an
    #: instance serves; ``starting``; ``idle``: none runs (scaled to zero, or backing off).
    state: str = "idle"
    #: Instances killed and replaced because they hung or were lost.
    replaced: int = 0


class Platform:
    def __init__(
        self,
        registry: RegistryStore,
        artifacts: ArtifactStore,
        controller: Controller,
        backend: ClusterBackend,
        clock: Clock,
        workflows: WorkflowRegistry,
        engine: Engine,
        log: EventLog,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.workflows = workflows
        self.engine = engine
        self.log = log
        self.artifacts = artifacts
        self.controller = controller
        self._clock = clock
        self._deploy_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Platform]:
        async with self.controller.running():
            for record in self.registry.list_functions():
                self.controller.deploy(record)
            async with self.engine.running():
                yield self

    async def deploy(self, spec: FunctionSpec, source: str, weights_sha256: str | None) -> FunctionRecord:
        spec = spec.validate()
        self.controller.check_fits(spec)
        if self.workflows.find(spec.name) is not None:
            raise Conflict(f"{spec.name!r} is already the name of a workflow")
        async with self._deploy_lock:
            generation = self.registry.next_generation(spec.name)
            directory = await asyncio.to_thread(
                self.artifacts.install, spec, source, weights_sha256, generation
            )
            record = self.registry.put_function(
                FunctionRecord(spec=spec, artifact_dir=str(directory), deployed_at=self._clock.time())
            )
            self.controller.deploy(record)
            await asyncio.to_thread(self.artifacts.prune, spec.name, Path(record.artifact_dir))
            return record

    async def delete(self, name: str) -> None:
        async with self._deploy_lock:
            users = [w.name for w in self.workflows.list() if any(s.function == name for s in w.stages)]
            if users:
                raise Conflict(f"function {name!r} is used by workflows {users}; delete them first")
            if not self.registry.delete_function(name):
                raise NotFound(f"unknown model {name!r}")
            with contextlib.suppress(NotFound):
                self.controller.remove(name)
            await asyncio.to_thread(self.artifacts.remove, name)

    def evict_weights(self, name: str) -> bool:
        """Drop a function's weights from the node stores (only where no instance uses them)."""
        self.function(name)
        return self.backend.evict_weights(name)

    def function(self, name: str, version: str | None = None) -> FunctionRuntime:
        runtime = self.controller.get(name)
        if version is not None and version != runtime.record.spec.version:
            raise NotFound(f"model {name!r} has no version {version!r}")
        return runtime

    async def infer(
        self, runtime: FunctionRuntime, inputs: Tensors, outputs: tuple[str, ...], timeout_s: float
    ) -> tuple[dict[str, np.ndarray], Served]:
        """The outputs, and who served them (whether the request waited for a start)."""
        deadline = self._clock.monotonic() + timeout_s
        return await runtime.dispatcher.infer_traced(inputs, outputs, deadline)

    def devices(self) -> list[DeviceReport]:
        """Every node's devices: capacity, what is allocated and what is placed there."""
        return self.controller.devices()

    def status(self) -> list[FunctionStatus]:
        out = []
        for rt in self.controller.functions():
            d = rt.dispatcher
            instances = tuple(
                InstanceStatus(
                    s.info.id,
                    s.info.node,
                    s.info.pid,
                    "draining" if s.draining else ("busy" if s.in_flight else "idle"),
                    s.in_flight,
                    s.served,
                )
                for s in d.slots.values()
            )
            out.append(
                FunctionStatus(
                    spec=rt.record.spec,
                    generation=rt.record.generation,
                    instances=instances,
                    starting=d.starting,
                    queued=d.queued,
                    cold_starts=rt.cold_starts,
                    last_error=d.start_error.message if d.start_error else None,
                    state=(
                        "ready"
                        if instances
                        else "failed"
                        if d.gave_up
                        else "starting"
                        if d.starting
                        else "idle"
                    ),
                    replaced=rt.replaced,
                )
            )
        return out
