"""Models that fail to load: ``Broken`` raises in load(); ``NeedsFile`` opens a file it lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import smss


@smss.model(name="broken", inputs={"x": ("FP32", [-1, 4])}, outputs={"y": ("FP32", [-1, 4])}, memory=128)
class Broken:
    def load(self, weights: Any) -> None:
        raise RuntimeError("deliberate failure in load()")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AssertionError("never loaded")


@smss.model(name="needs-file", inputs={"x": ("FP32", [-1, 4])}, outputs={"y": ("FP32", [-1, 4])}, memory=128)
class NeedsFile:
    def load(self, weights: Any) -> None:
        # A missing vocabulary next to the code: the error names its full path on the server.
        self.vocab = (Path(__file__).parent / "vocab.txt").read_text()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}
