"""A plain python model without weights: y = 2 * x (deployed through the CLI)."""

from __future__ import annotations

from typing import Any

import numpy as np

import smss


@smss.model(
    name="echo",
    inputs={"x": ("FP32", [-1, 4])},
    outputs={"y": ("FP32", [-1, 4])},
    max_batch_size=8,
    batch_wait_ms=1,
    cpu=1,
    memory=128,
)
class Echo:
    def load(self, weights: Any) -> None:
        if weights is not None:
            raise ValueError("echo takes no weights")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": (inputs["x"] * 2).astype(np.float32)}
