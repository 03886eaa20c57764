"""A two-stage workflow with per-session state, runnable as written (docs/workflows.md).

``scale`` doubles its input; ``accumulate`` adds that to the session's running
``total`` (its unmapped input: the session state) and returns the new total, which
the next run of the same session reads back.

    smss deploy docs/examples/pipeline.py:Scale
    smss deploy docs/examples/pipeline.py:Accumulate
    smss deploy docs/examples/pipeline.py:pipeline
    smss runs start pipeline --session alice --inputs docs/examples/pipeline-inputs.json
"""

from __future__ import annotations

from typing import Any

import numpy as np

import smss


@smss.model(
    name="scale", inputs={"x": ("FP32", [1, 4])}, outputs={"y": ("FP32", [1, 4])}, cpu=0.25, memory=128
)
class Scale:
    def load(self, weights: Any) -> None:
        pass  # no weights: a python model

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}


@smss.model(
    name="accumulate",
    inputs={"y": ("FP32", [1, 4]), "total": ("FP32", [1, 4])},
    outputs={"total": ("FP32", [1, 4])},
    cpu=0.25,
    memory=128,
)
class Accumulate:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"total": inputs["total"] + inputs["y"]}


pipeline = (
    smss.Workflow("pipeline")
    .stage("scale", Scale, inputs={"x": "request.x"})
    .stage("accumulate", Accumulate, inputs={"y": "scale.y"}, state=True)
    .output("total", "accumulate.total")
)
