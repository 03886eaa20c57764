"""Python-runtime stage functions for the workflow integration tests.

Every stage adds ``STEP`` to its input, so a run's tag (its input's first value, 1..999)
survives through the stages: stage k of run t sees ``t + (k - 1) * STEP``. Each real
call (not the zeros of the warm-up call) appends one line ``<pid> <first input value>``
to ``$SMSS_TEST_TRACE_DIR/<function name>.trace`` with a single ``write(2)`` on an
``O_APPEND`` descriptor, so lines from several instances never interleave. The
instances inherit the environment of ``smss serve``.

* ``wf_first``, ``wf_last``: trace, then answer.
* ``wf_block``: waits until the file ``release`` exists in the trace directory (at most
  ``BLOCK_S``), then traces and answers: runs stay in flight until the test lets them go.
* ``wf_flaky``: traces, then raises ``ValueError("bad frame")`` until the file ``fixed``
  exists in the trace directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import smss

STEP = 1000.0
BLOCK_S = 60.0
TRACE_ENV = "SMSS_TEST_TRACE_DIR"

X = {"x": ("FP32", [1, 4])}
Y = {"y": ("FP32", [1, 4])}


def _trace_dir() -> Path:
    return Path(os.environ[TRACE_ENV])


def _trace(function: str, x: np.ndarray) -> bool:
    """Record this call; False for the warm-up call (all zeros), which is not recorded."""
    if not x.any():
        return False
    line = f"{os.getpid()} {float(x[0, 0])!r}\n".encode()
    fd = os.open(_trace_dir() / f"{function}.trace", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return True


class _Stage:
    function = ""

    def load(self, weights: Any) -> None:
        if weights is not None:
            raise ValueError("stage models take no weights")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.before(x)
        _trace(self.function, x)
        return {"y": (x + np.float32(STEP)).astype(np.float32)}

    def before(self, x: np.ndarray) -> None:
        pass


@smss.model(name="wf_first", inputs=X, outputs=Y, cpu=0.5, memory=128)
class First(_Stage):
    function = "wf_first"


@smss.model(name="wf_last", inputs=X, outputs=Y, cpu=0.5, memory=128)
class Last(_Stage):
    function = "wf_last"


@smss.model(name="wf_block", inputs=X, outputs=Y, max_instances=1, cpu=0.5, memory=128)
class Block(_Stage):
    function = "wf_block"

    def before(self, x: np.ndarray) -> None:
        if not x.any():
            return  # the warm-up call
        deadline = time.monotonic() + BLOCK_S
        while not (_trace_dir() / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


@smss.model(name="wf_flaky", inputs=X, outputs=Y, cpu=0.5, memory=128)
class Flaky(_Stage):
    function = "wf_flaky"

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if _trace(self.function, x) and not (_trace_dir() / "fixed").exists():
            raise ValueError("bad frame")
        return {"y": (x + np.float32(STEP)).astype(np.float32)}
