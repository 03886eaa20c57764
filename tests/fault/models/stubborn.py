"""A python-runtime model that misbehaves on request: ``y = 2 x``.

A first value ``v > 0`` makes predict() sleep ``v`` seconds first (a request that is
surely in flight when the test stops the process); ``v < 0`` makes it never return
(a hung predict). The warm-up call (zeros) returns at once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

import smss


@smss.model(
    name="stubborn",
    inputs={"x": ("FP32", [-1])},
    outputs={"y": ("FP32", [-1])},
    concurrency=1,
    max_instances=1,
    keep_alive_s=300.0,
    cpu=0.1,
    memory=64,
)
class Stubborn:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        first = float(x[0]) if x.size else 0.0
        if first < 0:
            threading.Event().wait()  # never returns
        elif first > 0:
            time.sleep(first)
        return {"y": (x * 2).astype(np.float32)}
