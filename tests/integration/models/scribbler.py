"""A python-runtime model that can be told to write into its own (read-only, shared) weights.

``y = x + w``. A request whose first value is ``-1`` makes predict() assign to
the weights through numpy (refused: the arrays are read-only); ``-2`` makes it
store into their memory directly, past numpy (the page is read-only: SIGSEGV).
The warm-up call (zeros) writes nothing, so the template loads normally.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

import smss

NUMPY_WRITE = -1.0
RAW_WRITE = -2.0


@smss.model(
    name="scribbler",
    inputs={"x": ("FP32", [-1, 4])},
    outputs={"y": ("FP32", [-1, 4])},
    cpu=1,
    memory=128,
)
class Scribbler:
    def load(self, weights: Any) -> None:
        self.w = weights.numpy()["w"]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if x[0, 0] == NUMPY_WRITE:
            self.w[:] = 0
        elif x[0, 0] == RAW_WRITE:
            ctypes.memset(self.w.ctypes.data, 0, self.w.nbytes)
        return {"y": (x + self.w).astype(np.float32)}
