"""A python-runtime model for restarts and drains: ``y = 2 x``, after sleeping ``x[0]``
seconds when ``x[0] > 0`` (a request surely in flight when the test signals the server).
Up to two instances, one request each, kept alive for the whole test."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import smss


@smss.model(
    name="sleeper",
    inputs={"x": ("FP32", [-1])},
    outputs={"y": ("FP32", [-1])},
    concurrency=1,
    max_instances=2,
    keep_alive_s=300.0,
    cpu=0.1,
    memory=64,
)
class Sleeper:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if x.size and float(x[0]) > 0:
            time.sleep(float(x[0]))
        return {"y": (x * 2).astype(np.float32)}
