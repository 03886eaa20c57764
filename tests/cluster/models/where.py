"""A python model with safetensors weights that says which process answered:
``y = x * w`` and ``pid``, so a test can tell on which node (instance) a request ran."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

import smss


@smss.model(
    name="where",
    inputs={"x": ("FP32", [-1, 4])},
    outputs={"y": ("FP32", [-1, 4]), "pid": ("INT64", [1])},
    min_instances=0,
    max_instances=4,
    concurrency=4,
    keep_alive_s=600.0,
    cpu=0.1,
    memory=64,
)
class Where:
    def load(self, weights: Any) -> None:
        if weights is None:
            raise ValueError("where needs weights")
        self.w = np.array(weights.numpy()["w"], dtype=np.float32)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if float(x.flat[0]) < 0:  # a negative first element asks for a slow answer (load tests)
            time.sleep(min(-float(x.flat[0]), 5.0))
        return {"y": (np.abs(x) * self.w).astype(np.float32), "pid": np.array([os.getpid()], np.int64)}
