"""``smss.Workflow``: build a :class:`~smss.workflow.spec.WorkflowSpec` in Python.

Example::

    wf = (
        smss.Workflow("behavior")
        .stage("perceive", "behavior_perceive", inputs={"frame": "request.frame"})
        .stage("track", "behavior_track", inputs={"features": "perceive.features"}, state=True)
        .stage("respond", "behavior_respond", inputs={"h": "track.h"})
        .output("action", "respond.action")
    )
    spec = wf.spec()

A function is named by its string or by its ``@smss.model`` class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from smss._model import spec_of
from smss.errors import InvalidSpec
from smss.spec import TensorSpec
from smss.workflow.spec import StageSpec, WorkflowSpec, check_structure


class Workflow:
    """A workflow under construction; every method returns ``self`` to chain."""

    def __init__(self, name: str, *, version: str = "1") -> None:
        self.name = name
        self.version = version
        self._stages: list[StageSpec] = []
        self._outputs: dict[str, str] = {}
        self._inputs: list[TensorSpec] = []

    def stage(
        self,
        name: str,
        function: str | type,
        inputs: Mapping[str, str] | None = None,
        *,
        state: bool = False,
        retries: int = 2,
        timeout_s: float = 60.0,
    ) -> Workflow:
        """Add a stage calling ``function``; ``inputs`` maps its input names to
        ``"request.<name>"`` or ``"<stage>.<output>"``. With ``state=True`` the
        function's unmapped inputs are the session's state."""
        if any(s.name == name for s in self._stages):
            raise InvalidSpec(f"workflow {self.name!r}: duplicate stage name {name!r}")
        fn = function if isinstance(function, str) else spec_of(function).name
        self._stages.append(
            StageSpec(
                name=name,
                function=fn,
                inputs=dict(inputs or {}),
                state=state,
                retries=retries,
                timeout_s=float(timeout_s),
            )
        )
        return self

    def input(self, name: str, datatype: str, shape: Sequence[int]) -> Workflow:
        """Declare a request tensor (otherwise inferred from the inputs it feeds)."""
        if any(t.name == name for t in self._inputs):
            raise InvalidSpec(f"workflow {self.name!r}: request input {name!r} declared twice")
        self._inputs.append(TensorSpec(name, datatype, tuple(int(d) for d in shape)))
        return self

    def output(self, name: str, source: str) -> Workflow:
        """Return the stage output ``source`` (``"<stage>.<output>"``) as ``name``."""
        if name in self._outputs:
            raise InvalidSpec(f"workflow {self.name!r}: output {name!r} declared twice")
        self._outputs[name] = source
        return self

    def spec(self) -> WorkflowSpec:
        """The definition, checked on its own; validate it against the functions
        with :func:`~smss.workflow.spec.validate_workflow`."""
        return check_structure(
            WorkflowSpec(
                name=self.name,
                stages=tuple(self._stages),
                outputs=dict(self._outputs),
                inputs=tuple(self._inputs),
                version=self.version,
            )
        )

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, stages={[s.name for s in self._stages]})"
