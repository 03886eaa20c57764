"""A python model that refuses negative input: y = x + 1, or ValueError when x[0, 0] < 0
(a workflow stage that fails on purpose, with its retries, for the dashboard's timeline)."""

from __future__ import annotations

from typing import Any

import numpy as np

import smss


@smss.model(
    name="picky", inputs={"x": ("FP32", [-1, 4])}, outputs={"y": ("FP32", [-1, 4])}, cpu=0.5, memory=128
)
class Picky:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if x[0, 0] < 0:
            raise ValueError("picky refuses negative input")
        return {"y": (x + 1).astype(np.float32)}
