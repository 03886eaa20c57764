"""A python-runtime model with safetensors weights: ``y = x * w``, ``w`` a FP32 vector
of 2 (so an instance's answer shows it has its weights)."""

from __future__ import annotations

from typing import Any

import numpy as np

import smss


@smss.model(
    name="weighted",
    inputs={"x": ("FP32", [2])},
    outputs={"y": ("FP32", [2])},
    max_instances=1,
    keep_alive_s=300.0,
    cpu=0.1,
    memory=64,
)
class Weighted:
    def load(self, weights: Any) -> None:
        if weights is None:
            raise ValueError("weighted needs weights")
        self.w = np.array(weights.numpy()["w"], dtype=np.float32)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": (inputs["x"] * self.w).astype(np.float32)}
