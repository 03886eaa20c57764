"""A python-runtime model that fails to load until a file named ``ok`` lies beside its
code (in its installed artifact directory): a fault an operator fixes on the node.
``y = 2 x``. One instance is kept running (``min_instances=1``), so the platform
keeps trying to start it on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import smss


@smss.model(
    name="fussy",
    inputs={"x": ("FP32", [-1])},
    outputs={"y": ("FP32", [-1])},
    min_instances=1,
    max_instances=1,
    keep_alive_s=300.0,
    cpu=0.1,
    memory=64,
)
class Fussy:
    def load(self, weights: Any) -> None:
        if not Path(__file__).with_name("ok").exists():
            raise RuntimeError("fussy: the file it needs is not there yet")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": (inputs["x"] * 2).astype(np.float32)}
