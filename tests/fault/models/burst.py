"""A python-runtime model for bursts: ``y = 2 x`` after 0.2 s on the instance's one
compute thread (five answers a second), at most one instance holding four requests,
starting from zero."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import smss


@smss.model(
    name="burst",
    inputs={"x": ("FP32", [-1])},
    outputs={"y": ("FP32", [-1])},
    concurrency=4,
    max_instances=1,
    keep_alive_s=300.0,
    cpu=0.1,
    memory=64,
)
class Burst:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.2)
        return {"y": (inputs["x"] * 2).astype(np.float32)}
