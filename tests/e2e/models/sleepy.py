"""A model that sleeps ``seconds`` then echoes it (per-request timeouts, deployed in the tests)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

import smss


@smss.model(
    name="sleepy",
    inputs={"seconds": ("FP32", [1])},
    outputs={"seconds": ("FP32", [1])},
    concurrency=4,
    cpu=0.5,
    memory=128,
)
class Sleepy:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seconds = float(inputs["seconds"][0])
        time.sleep(min(seconds, 10.0))
        return {"seconds": np.array([seconds], dtype=np.float32)}
