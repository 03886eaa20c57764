"""Python stage functions of the random-kill test's workflow (tests/fault/test_random_kills.py).

A request is ``x = [tag, turn, 0, 0]`` (``tag`` names the run, ``turn`` is its turn in
its session). Each real call (not the all-zero warm-up call) first appends one line
``<function> <tag> <wall time>`` to ``$SMSS_TEST_TRACE_DIR/churn.trace`` with a single
``write(2)`` on an ``O_APPEND`` descriptor: the side effects the test counts. Then it
works for ``WORK_S``.

* ``churn_a``: ``y = x + [0, 0, 0, 1]``;
* ``churn_acc`` (the session's state ``h``): ``h' = [tag, h1 + turn, h2 + 1, 0]``;
* ``churn_out``: ``y = h' + [0, 0, 0, 100]``.

So turn k of a session answers ``[tag, k(k+1)/2, k, 100]`` and leaves the state
``[tag, k(k+1)/2, k, 0]``: a lost or doubled state update shows in the sums.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import smss

TRACE_ENV = "SMSS_TEST_TRACE_DIR"
#: Each call takes at least this long, so that kills land inside stages too.
WORK_S = 0.05
V = ("FP32", [1, 4])


def _trace(function: str, x: np.ndarray) -> bool:
    if not x.any():
        return False
    line = f"{function} {round(float(x[0, 0]))} {time.time()!r}\n".encode()
    path = Path(os.environ[TRACE_ENV]) / "churn.trace"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    time.sleep(WORK_S)
    return True


class _NoWeights:
    def load(self, weights: Any) -> None:
        if weights is not None:
            raise ValueError("stage models take no weights")


@smss.model(name="churn_a", inputs={"x": V}, outputs={"y": V}, cpu=0.25, memory=128)
class A(_NoWeights):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        _trace("churn_a", x)
        return {"y": (x + np.array([[0, 0, 0, 1]], np.float32)).astype(np.float32)}


@smss.model(name="churn_acc", inputs={"x": V, "h": V}, outputs={"h": V}, cpu=0.25, memory=128)
class Acc(_NoWeights):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, h = inputs["x"], inputs["h"]
        _trace("churn_acc", x)
        new = np.array([[x[0, 0], h[0, 1] + x[0, 1], h[0, 2] + 1, 0]], np.float32)
        return {"h": new}


@smss.model(name="churn_out", inputs={"x": V}, outputs={"y": V}, cpu=0.25, memory=128)
class Out(_NoWeights):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        _trace("churn_out", x)
        return {"y": (x + np.array([[0, 0, 0, 100]], np.float32)).astype(np.float32)}
