"""Workflows on the platform: the function caller the engine uses, and the registry of definitions."""

from __future__ import annotations

import contextlib

import msgspec

from smss.config import ServingSettings
from smss.control.controller import Controller
from smss.errors import Conflict, NotFound
from smss.ports import CallResult, Clock, Tensors, WorkflowStore
from smss.spec import FunctionSpec, TensorSpec
from smss.workflow.spec import WorkflowSpec, validate_workflow


class PlatformCaller:
    """:class:`smss.ports.FunctionCaller` over the controller's dispatchers."""

    def __init__(self, controller: Controller, clock: Clock, settings: ServingSettings) -> None:
        self._controller = controller
        self._clock = clock
        self._settings = settings

    def spec_of(self, function: str) -> FunctionSpec:
        return self._controller.get(function).record.spec

    async def call(
        self, function: str, inputs: Tensors, outputs: tuple[str, ...], timeout_s: float
    ) -> CallResult:
        dispatcher = self._controller.get(function).dispatcher
        deadline = self._clock.monotonic() + timeout_s
        result, served = await dispatcher.infer_traced(inputs, outputs, deadline)
        return CallResult(result, served.instance.id, served.instance.node)

    def prewarm(self, function: str) -> None:
        with contextlib.suppress(NotFound):
            self._controller.ensure_instance(function)


class WorkflowRegistry:
    """Deployed workflows: durable in the store, validated against the deployed functions.

    ``shared``: other gateways deploy to the same store (PostgreSQL), so every lookup
    reads the store: a run started elsewhere under a new definition is recovered here
    against that definition, not parked against a stale copy. Otherwise the
    definitions are read once and kept."""

    def __init__(self, store: WorkflowStore, controller: Controller, *, shared: bool = False) -> None:
        self._store = store
        self._controller = controller
        self._shared = shared
        self._specs = {s.name: s for s in store.list()}

    def close(self) -> None:
        self._store.close()

    def get(self, name: str) -> WorkflowSpec:
        spec = self.find(name)
        if spec is None:
            raise NotFound(f"unknown workflow {name!r}")
        return spec

    def find(self, name: str) -> WorkflowSpec | None:
        if not self._shared:
            return self._specs.get(name)
        spec = self._store.get(name)
        if spec is None:
            self._specs.pop(name, None)
        else:
            self._specs[name] = spec
        return spec

    def list(self) -> list[WorkflowSpec]:
        specs = self._store.list() if self._shared else self._specs.values()
        return sorted(specs, key=lambda s: s.name)

    def functions(self) -> dict[str, FunctionSpec]:
        return {rt.name: rt.record.spec for rt in self._controller.functions()}

    def deploy(self, spec: WorkflowSpec) -> WorkflowSpec:
        functions = self.functions()
        if spec.name in functions:
            raise Conflict(f"{spec.name!r} is already the name of a function")
        spec = validate_workflow(spec, functions)
        self._store.put(spec)
        self._specs[spec.name] = spec
        return spec

    def delete(self, name: str) -> None:
        if not self._store.delete(name):
            raise NotFound(f"unknown workflow {name!r}")
        self._specs.pop(name, None)

    def as_function_spec(self, spec: WorkflowSpec) -> FunctionSpec:
        """The workflow seen as one model (for the v2 routes): its inputs and outputs."""
        functions = self.functions()
        by_stage = {s.name: s for s in spec.stages}
        outputs = []
        for out_name, source in spec.outputs.items():
            stage_name, _, tensor = source.partition(".")
            fn = functions.get(by_stage[stage_name].function)
            decl = next((t for t in fn.outputs if t.name == tensor), None) if fn else None
            if decl is None:
                raise NotFound(f"workflow {spec.name!r}: function of stage {stage_name!r} is gone")
            outputs.append(TensorSpec(out_name, decl.datatype, decl.shape))
        return FunctionSpec(
            name=spec.name,
            version=spec.version,
            inputs=spec.inputs,
            outputs=tuple(outputs),
            entrypoint="workflow.py:Workflow",
        )


def spec_json(spec: WorkflowSpec) -> object:
    return msgspec.to_builtins(spec)
