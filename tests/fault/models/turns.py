"""Python stage functions of the session-turn test (tests/fault/test_session_turns.py).

A request is ``x = [tag, turn, 0, 0]``. Each real call (not the all-zero warm-up call)
first appends one line ``<function> <tag>`` to ``$SMSS_TEST_TRACE_DIR/turns.trace``
with a single ``write(2)`` on an ``O_APPEND`` descriptor: the side effects the test
counts.

* ``turn_acc`` (the session's state ``h``): ``h' = [tag, h1 + turn, h2 + 1, 0]``, so
  ``h2`` counts the turns applied to the session;
* ``turn_out``: ``y = h' + [0, 0, 0, 100]`` after ``OUT_S``: the run is still in flight
  for that long once the state of its turn is recorded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import smss

TRACE_ENV = "SMSS_TEST_TRACE_DIR"
OUT_S = 0.5
V = ("FP32", [1, 4])


def _trace(function: str, x: np.ndarray) -> None:
    if not x.any():
        return
    line = f"{function} {round(float(x[0, 0]))}\n".encode()
    fd = os.open(Path(os.environ[TRACE_ENV]) / "turns.trace", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class _NoWeights:
    def load(self, weights: Any) -> None:
        if weights is not None:
            raise ValueError("stage models take no weights")


@smss.model(name="turn_acc", inputs={"x": V, "h": V}, outputs={"h": V}, cpu=0.25, memory=128)
class Acc(_NoWeights):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, h = inputs["x"], inputs["h"]
        _trace("turn_acc", x)
        return {"h": np.array([[x[0, 0], h[0, 1] + x[0, 1], h[0, 2] + 1, 0]], np.float32)}


@smss.model(name="turn_out", inputs={"x": V}, outputs={"y": V}, cpu=0.25, memory=128)
class Out(_NoWeights):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        _trace("turn_out", x)
        if x.any():
            time.sleep(OUT_S)
        return {"y": (x + np.array([[0, 0, 0, 100]], np.float32)).astype(np.float32)}
