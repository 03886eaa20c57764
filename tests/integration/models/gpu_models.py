"""Models for the GPU start path: ``Broken`` fails in load(); ``Hog`` allocates on the
weights' device as much as a request asks (``x[0, 0]`` MiB), so a test can push an
instance past its GPU memory share; ``y = x + w`` otherwise."""

from __future__ import annotations

from typing import Any

import numpy as np

import smss


@smss.model(name="broken", inputs={"x": ("FP32", [-1, 4])}, outputs={"y": ("FP32", [-1, 4])}, memory=128)
class Broken:
    def load(self, weights: Any) -> None:
        raise RuntimeError("deliberate failure in load()")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise AssertionError("never loaded")


@smss.model(
    name="hog",
    inputs={"x": ("FP32", [-1, 4])},
    outputs={"y": ("FP32", [-1, 4])},
    runtime="torch",
    memory=256,
    device="cuda",
    gpu_memory="1GiB",
)
class Hog:
    def load(self, weights: Any) -> None:
        self.w = weights.torch()["w"]
        self.device = weights.device

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.array(inputs["x"], dtype=np.float32)).to(self.device)
        mib = int(x[0, 0].item())
        if mib > 0:
            hog = torch.ones(mib << 18, dtype=torch.float32, device=self.device)  # mib MiB
            x = x + hog[:1] - 1
        return {"y": (x + self.w).cpu().numpy()}
