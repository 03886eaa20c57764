"""A python-runtime model that must not be run twice (``idempotent=False``): ``y = 2 x``
after sleeping ``x[0]`` seconds when ``x[0] > 0``, and ``pid``, the process that
answered. Up to two instances of four requests each."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import smss


@smss.model(
    name="once",
    inputs={"x": ("FP32", [-1])},
    outputs={"y": ("FP32", [-1]), "pid": ("INT64", [1])},
    concurrency=4,
    max_instances=2,
    keep_alive_s=300.0,
    idempotent=False,
    cpu=0.1,
    memory=64,
)
class Once:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if x.size and float(x[0]) > 0:
            time.sleep(float(x[0]))
        return {"y": (x * 2).astype(np.float32), "pid": np.array([os.getpid()], dtype=np.int64)}
