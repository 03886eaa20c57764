"""The platform as the API sees it: deploy, delete, list, infer.

Composes the durable registry, the artifact store and the controller. The
registry is the source of truth: on start every registered function is handed
to the controller again (at zero instances, or ``min_instances``, or with the
instances a killed platform left running, adopted), so a restart of ``smss
serve`` keeps every deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from smss.app.versions import Traffic, VersionTable, internal_name, public_name
from smss.app.workflow_registry import WorkflowRegistry
from smss.control.controller import Controller, FunctionRuntime
from smss.control.dispatcher import Served
from smss.control.tiers import parse_tier
from smss.errors import Conflict, ModelError, NotFound, Unavailable
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
    #: Its tier of readiness (``warm``, ``standby``, ``resident``, ``cold``,
    #: ``no_runtime``); None when the backend does not say.
    tier: str | None = None


@dataclass(frozen=True)
class Described:
    """What a model or workflow name serves, as the inference protocols describe it."""

    spec: FunctionSpec
    #: ``pytorch``, ``onnxruntime``, ``python`` or ``workflow``.
    platform: str
    workflow: bool


@dataclass(frozen=True)
class Answer:
    """The outputs of one inference call and how it was served."""

    outputs: dict[str, np.ndarray]
    #: Whether the request waited for its instance to start (functions only).
    cold: bool = False
    #: Where a function call's time went (functions only; see ``Served``).
    served: Served | None = None
    #: The workflow run that answered (workflows only).
    run_id: str | None = None
    #: The version that answered (functions only): under a canary split, the one drawn.
    version: str | None = None


RepositoryState = Literal["READY", "UNAVAILABLE", "UNLOADED"]


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    #: ``UNAVAILABLE``: starting it failed (see ``reason``); ``UNLOADED``: no instance runs.
    state: RepositoryState
    reason: str


#: Error types of a failed workflow stage that say "no capacity now", not "the model
#: failed": a workflow called through infer answers them 503 with Retry-After.
TRANSIENT = frozenset({"Overloaded", "Unavailable", "StartFailed", "DeadlineExceeded"})
_PLATFORMS = {"torch": "pytorch", "onnx": "onnxruntime", "python": "python"}


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
        #: Each name's default version and canary split (in memory: a restart forgets it).
        self.versions = VersionTable()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Platform]:
        async with self.controller.running():
            await self.controller.restore(self.registry.list_functions())
            async with self.engine.running():
                yield self

    async def deploy(self, spec: FunctionSpec, source: str, weights_sha256: str | None) -> FunctionRecord:
        spec = spec.validate()
        self.controller.check_fits(spec)
        if self.workflows.find(spec.name) is not None:
            raise Conflict(f"{spec.name!r} is already the name of a workflow")
        async with self._deploy_lock:
            # another version of a deployed name lives beside it, under an internal name;
            # requests queued on the running versions are left alone
            current = self._find(spec.name)
            if current is not None and current.record.spec.version != spec.version:
                spec = msgspec.structs.replace(spec, name=internal_name(spec.name, spec.version))
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
        """Delete a name with all its versions."""
        if public_name(name)[1] is not None:
            raise NotFound(f"unknown model {name!r}")  # internal names cannot be asked for
        async with self._deploy_lock:
            users = [w.name for w in self.workflows.list() if any(s.function == name for s in w.stages)]
            if users:
                raise Conflict(f"function {name!r} is used by workflows {users}; delete them first")
            siblings = [rt.name for rt in self.controller.functions() if _sibling_of(rt.name, name)]
            if not self.registry.delete_function(name):
                raise NotFound(f"unknown model {name!r}")
            for stored in [name, *siblings]:
                if stored != name:
                    self.registry.delete_function(stored)
                with contextlib.suppress(NotFound):
                    self.controller.remove(stored)
                await asyncio.to_thread(self.artifacts.remove, stored)
            self.versions.forget(name)

    def set_traffic(self, name: str, traffic: Traffic) -> tuple[str, dict[str, float]]:
        """Route a name's unversioned requests: a default version and a canary split.
        Returns the default version and the split now in force."""
        traffic.validate()
        for version in [*([traffic.default] if traffic.default else []), *traffic.split]:
            self._resolve(name, version)  # NotFound for a name or version not deployed
        self.versions.set(name, traffic)
        return traffic.default or self.controller.get(name).record.spec.version, dict(traffic.split)

    def _find(self, stored: str) -> FunctionRuntime | None:
        try:
            return self.controller.get(stored)
        except NotFound:
            return None

    def _resolve(self, name: str, version: str) -> FunctionRuntime:
        plain = self.controller.get(name)  # NotFound: an unknown name
        if plain.record.spec.version == version:
            return plain
        sibling = self._find(internal_name(name, version))
        if sibling is None:
            raise NotFound(f"model {name!r} has no version {version!r}")
        return sibling

    def evict_weights(self, name: str) -> bool:
        """Drop a function's weights from the node stores (only where no instance uses them)."""
        self.function(name)
        return self.backend.evict_weights(name)

    def function(self, name: str, version: str | None = None) -> FunctionRuntime:
        """The runtime serving ``version`` of ``name``; without a version, the default one."""
        return self._routed(name, version if version is not None else self.versions.get(name).default)

    def _routed(self, name: str, version: str | None) -> FunctionRuntime:
        if public_name(name)[1] is not None:
            raise NotFound(f"unknown model {name!r}")  # internal names cannot be asked for
        if version is None:
            return self.controller.get(name)
        return self._resolve(name, version)

    async def infer(
        self, runtime: FunctionRuntime, inputs: Tensors, outputs: tuple[str, ...], timeout_s: float
    ) -> tuple[dict[str, np.ndarray], Served]:
        """The outputs, and who served them (whether the request waited for a start)."""
        deadline = self._clock.monotonic() + timeout_s
        return await runtime.dispatcher.infer_traced(inputs, outputs, deadline)

    # ---- the inference protocols' view (REST and gRPC ask these, not the parts) ----

    def describe(self, name: str, version: str | None = None) -> Described:
        """The spec behind a model or workflow name; NotFound for neither (or a wrong version)."""
        wf = self.workflows.find(name)
        if wf is not None:
            return Described(self.workflows.as_function_spec(wf), "workflow", workflow=True)
        spec = self.function(name, version).record.spec
        spec = msgspec.structs.replace(spec, name=public_name(spec.name)[0])
        return Described(spec, _PLATFORMS[spec.runtime], workflow=False)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Ready unless starting it failed and no instance serves (it starts on demand)."""
        if self.workflows.find(name) is not None:
            return True
        return self.function(name, version).dispatcher.ready

    async def infer_named(
        self,
        name: str,
        version: str | None,
        inputs: Tensors,
        outputs: tuple[str, ...],
        timeout_s: float,
        *,
        session: str | None = None,
        idempotency_key: str | None = None,
        retry_after_s: float = 1.0,
    ) -> Answer:
        """Infer on a model, or run a workflow and wait for it; ``outputs`` () means all.

        A workflow run that failed for want of capacity (or did not finish in time) is
        :class:`Unavailable` with ``retry_after_s``; one whose model failed, ModelError."""
        wf = self.workflows.find(name)
        if wf is None:
            # an unversioned request draws its version under a canary split
            runtime = self._routed(name, version if version is not None else self.versions.pick(name))
            wanted = outputs or tuple(t.name for t in runtime.record.spec.outputs)
            result, served = await self.infer(runtime, inputs, wanted, timeout_s)
            return Answer(result, served.cold, served, version=runtime.record.spec.version)
        outcome = await self.engine.submit(
            wf.name, inputs, session=session, idempotency_key=idempotency_key, wait=True, timeout_s=timeout_s
        )
        if outcome.status != "completed" or outcome.outputs is None:
            message = (
                f"workflow run {outcome.run_id} {outcome.status}: {outcome.error or 'not finished in time'}"
            )
            if outcome.status == "failed" and outcome.error_type not in TRANSIENT:
                raise ModelError(message)
            # not finished in time, or failed for want of capacity: try again later
            raise Unavailable(message, retry_after_s=retry_after_s)
        wanted_set = set(outputs) or set(outcome.outputs)
        return Answer({k: v for k, v in outcome.outputs.items() if k in wanted_set}, run_id=outcome.run_id)

    def repository_index(self) -> list[RepositoryEntry]:
        return [
            RepositoryEntry(
                st.spec.name,
                st.spec.version,
                "READY" if st.instances else ("UNAVAILABLE" if st.last_error else "UNLOADED"),
                st.last_error or "",
            )
            for st in self.status()
        ]

    def load(self, name: str) -> None:
        """Start serving a model again (also after its starts gave up)."""
        self.controller.load(name)

    def unload(self, name: str) -> None:
        """Scale a model to zero; it starts again on its next request."""
        self.controller.scale_to_zero(name)

    async def step_tier(self, name: str, tier: str) -> str | None:
        """Put a function with no instance in ``tier`` now (see ``Controller.step_tier``);
        its tier afterwards."""
        await self.controller.step_tier(name, parse_tier(tier))
        now = self.controller.tier(name)
        return None if now is None else now.label

    def devices(self) -> list[DeviceReport]:
        """Every node's devices: capacity, what is allocated and what is placed there."""
        return self.controller.devices()

    def status(self) -> list[FunctionStatus]:
        out = []
        for rt in sorted(self.controller.functions(), key=_plain_first):
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
                    spec=msgspec.structs.replace(rt.record.spec, name=public_name(rt.name)[0]),
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
                    tier=None if (tier := self.controller.tier(rt.name)) is None else tier.label,
                )
            )
        return out


def _sibling_of(stored: str, name: str) -> bool:
    base, version = public_name(stored)
    return base == name and version is not None


def _plain_first(rt: FunctionRuntime) -> bool:
    """Other versions after every plain name (``sorted`` is stable: deploy order stays)."""
    return public_name(rt.name)[1] is not None
