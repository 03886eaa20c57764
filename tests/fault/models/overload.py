"""A python-runtime model for overload: ``y = 2 x`` after ``WORK_S`` a batch (or
longer: as many seconds as the largest second value of a row), at most one instance
holding ``concurrency=2`` requests, batching up to 8 rows.

Each real batch appends ``<pid> <k,k,...>`` (the first value of each row: the test's
request number) to ``$SMSS_TEST_TRACE_DIR/overload.trace`` (one ``write(2)`` on an
``O_APPEND`` descriptor). A request is one row, and the batcher takes every request its
instance holds that is waiting: a batch of more rows than the concurrency shows an
instance was sent more requests than it may hold.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import smss

TRACE_ENV = "SMSS_TEST_TRACE_DIR"
WORK_S = 0.2


@smss.model(
    name="overload",
    inputs={"x": ("FP32", [-1, 2])},
    outputs={"y": ("FP32", [-1, 2])},
    concurrency=2,
    min_instances=1,
    max_instances=1,
    max_batch_size=8,
    batch_wait_ms=20.0,
    keep_alive_s=300.0,
    cpu=0.1,
    memory=64,
)
class Overload:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if x.any():
            rows = ",".join(str(round(float(v))) for v in x[:, 0])
            line = f"{os.getpid()} {rows}\n".encode()
            path = Path(os.environ[TRACE_ENV]) / "overload.trace"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            time.sleep(max(WORK_S, float(x[:, 1].max())))
        return {"y": (x * 2).astype(np.float32)}
