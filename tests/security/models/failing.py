"""A plain python model whose predict() always raises, quoting a secret and a server path."""

from __future__ import annotations

from typing import Any

import numpy as np

import smss

#: Text that must never reach a body a caller without the admin token reads.
SECRET = "s3cr3t-predict-detail"


@smss.model(name="failing", inputs={"x": ("FP32", [-1, 4])}, outputs={"y": ("FP32", [-1, 4])}, memory=128)
class Failing:
    def load(self, weights: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise ValueError(f"{SECRET} while reading /srv/private/{SECRET}.db")
