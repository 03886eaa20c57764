"""The "behavior" workflow: predict a person's next action in a virtual scene.

Each run takes one frame of what the person sees (``frame``, FP32 [1, 3, 64, 64])
and returns probabilities of their next action (``action``, FP32 [1, 8]):

* ``perceive`` (:class:`~smss.demo.models.Perceive`) encodes the frame;
* ``track`` (:class:`~smss.demo.models.Track`, ``state=True``) advances the
  session's GRU hidden state ``h`` by one step: the session is the person;
* ``respond`` (:class:`~smss.demo.models.Respond`) reads the new ``h``.

Weights: :func:`smss.demo.generate.ensure_behavior_artifacts`.
"""

from __future__ import annotations

from smss._model import spec_of
from smss.demo import models
from smss.spec import FunctionSpec
from smss.workflow.builder import Workflow
from smss.workflow.spec import WorkflowSpec

FRAME_SHAPE = (1, 3, 64, 64)


def behavior_functions() -> dict[str, FunctionSpec]:
    """The three stage functions' specs, by function name."""
    specs = (spec_of(cls) for cls in (models.Perceive, models.Track, models.Respond))
    return {s.name: s for s in specs}


def behavior_workflow() -> WorkflowSpec:
    """The definition (not yet validated against the functions)."""
    return (
        Workflow("behavior")
        # One frame per run: the session's state is one person's hidden state (batch 1).
        .input("frame", "FP32", FRAME_SHAPE)
        .stage("perceive", "behavior_perceive", inputs={"frame": "request.frame"})
        .stage("track", "behavior_track", inputs={"features": "perceive.features"}, state=True)
        .stage("respond", "behavior_respond", inputs={"h": "track.h"})
        .output("action", "respond.action")
        .spec()
    )
