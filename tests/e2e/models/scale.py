"""A plain python model with safetensors weights: y = x * w, w a FP32 vector of 4."""

from __future__ import annotations

from typing import Any

import numpy as np

import smss


@smss.model(
    name="scale",
    inputs={"x": ("FP32", [-1, 4])},
    outputs={"y": ("FP32", [-1, 4])},
    cpu=1,
    memory=128,
)
class Scale:
    def load(self, weights: Any) -> None:
        if weights is None:
            raise ValueError("scale needs weights")
        self.w = np.array(weights.numpy()["w"], dtype=np.float32)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": (inputs["x"] * self.w).astype(np.float32)}
