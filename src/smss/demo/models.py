"""The demo models: a small MLP (torch and ONNX), a ResNet-18-shaped CNN and a ~100M-parameter CNN.

This file is deployed as a user model file: it is copied and imported in a
worker process, so it imports only ``smss``, numpy and, lazily, torch. torch is
imported inside the builders and ``load()`` so that importing the file stays
cheap and the ONNX model never pays for torch.

Weights come from :mod:`smss.demo.generate`, which builds the same modules
(on the ``meta`` device) to learn the state-dict keys and shapes.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

import smss

if TYPE_CHECKING:
    from torch import nn

F32 = npt.NDArray[np.float32]

MLP_SIZES = (64, 256, 256, 10)
CNN_WIDTHS = (64, 128, 256, 512)
CNN_BLOCKS = (2, 2, 2, 2)
#: Hidden widths of ``cnn_large``'s classifier head: they hold ~88M of its ~100M parameters.
CNN_LARGE_HEAD = (8192, 8192, 2048)
NUM_CLASSES = 10


def build_mlp() -> nn.Module:
    """64 -> 256 -> 256 -> 10 with ReLU; state-dict keys ``{0,2,4}.{weight,bias}``."""
    from torch import nn

    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(MLP_SIZES)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


def build_cnn(head: tuple[int, ...] = ()) -> nn.Module:
    """A ResNet-18 (BasicBlock, [2, 2, 2, 2], widths 64-512) for 3x64x64 images.

    The ImageNet stem (7x7 stride 2 conv, max-pool) is kept, so the four stages
    see 16, 8, 4 and 2 pixels a side: about 0.15 GMAC an image, cheap enough
    to serve on one CPU core. ``head`` inserts hidden Linear+ReLU layers before
    the 10-way classifier (``cnn_large``).
    """
    return _resnet_class()(head)


@functools.cache
def _resnet_class() -> Callable[[tuple[int, ...]], nn.Module]:
    # Classes deriving from nn.Module need torch at definition time; building
    # them on first use keeps the file's import free of torch.
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample: nn.Module | None = None
            if stride != 1 or c_in != c_out:
                self.downsample = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            result: torch.Tensor = self.relu(out + identity)
            return result

    class ResNet(nn.Module):
        def __init__(self, head: tuple[int, ...]) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, CNN_WIDTHS[0], 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(CNN_WIDTHS[0])
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            c_in, stages = CNN_WIDTHS[0], []
            for i, (width, blocks) in enumerate(zip(CNN_WIDTHS, CNN_BLOCKS, strict=True)):
                # The first block of stages 2-4 halves the resolution and widens.
                first = BasicBlock(c_in, width, 2 if i else 1)
                rest = [BasicBlock(width, width, 1) for _ in range(blocks - 1)]
                stages.append(nn.Sequential(first, *rest))
                c_in = width
            # torchvision's key names (layer1.0.conv1.weight, ...).
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            fc: list[nn.Module] = []
            for width in head:
                fc += [nn.Linear(c_in, width), nn.ReLU(inplace=True)]
                c_in = width
            fc.append(nn.Linear(c_in, NUM_CLASSES))
            # A bare Linear keeps torchvision's "fc.weight" for the plain ResNet.
            self.fc = fc[0] if not head else nn.Sequential(*fc)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            out: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
            return out

    return ResNet


class _TorchModel:
    """load(): build on ``meta`` (no random init), then adopt the file's tensors."""

    input_name: str
    output_name: str

    def build(self) -> nn.Module:
        raise NotImplementedError

    def load(self, weights: smss.Weights | None) -> None:
        import torch

        if weights is None:
            raise ValueError(f"{type(self).__name__} needs weights")
        with torch.device("meta"):
            module = self.build()
        module.load_state_dict(weights.torch(), assign=True)
        self.module = module.eval().requires_grad_(False)

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, F32]:
        import torch

        x = np.ascontiguousarray(inputs[self.input_name], dtype=np.float32)
        if not x.flags.writeable:
            # torch.from_numpy warns on read-only arrays (e.g. views of a request body).
            x = x.copy()
        with torch.inference_mode():
            y = self.module(torch.from_numpy(x))
        return {self.output_name: np.ascontiguousarray(y.numpy(), dtype=np.float32)}


@smss.model(
    name="mlp",
    inputs={"x": ("FP32", [-1, 64])},
    outputs={"y": ("FP32", [-1, 10])},
    runtime="torch",
    max_batch_size=32,
    batch_wait_ms=1,
    concurrency=32,
    max_instances=4,
    cpu=1,
    memory=512,
)
class MLP(_TorchModel):
    input_name, output_name = "x", "y"

    def build(self) -> nn.Module:
        return build_mlp()


@smss.model(
    name="cnn",
    inputs={"image": ("FP32", [-1, 3, 64, 64])},
    outputs={"logits": ("FP32", [-1, 10])},
    runtime="torch",
    max_batch_size=8,
    batch_wait_ms=2,
    concurrency=8,
    max_instances=4,
    cpu=1,
    memory=1024,
)
class CNN(_TorchModel):
    input_name, output_name = "image", "logits"

    def build(self) -> nn.Module:
        return build_cnn()


@smss.model(
    name="cnn_large",
    inputs={"image": ("FP32", [-1, 3, 64, 64])},
    outputs={"logits": ("FP32", [-1, 10])},
    runtime="torch",
    max_batch_size=8,
    batch_wait_ms=2,
    concurrency=8,
    max_instances=2,
    cpu=1,
    memory=2048,
)
class CNNLarge(_TorchModel):
    input_name, output_name = "image", "logits"

    def build(self) -> nn.Module:
        return build_cnn(CNN_LARGE_HEAD)


@smss.model(
    name="mlp_onnx",
    inputs={"x": ("FP32", [-1, 64])},
    outputs={"y": ("FP32", [-1, 10])},
    runtime="onnx",
    max_batch_size=32,
    batch_wait_ms=1,
    concurrency=32,
    max_instances=4,
    cpu=1,
    memory=256,
)
class MLPOnnx:
    def load(self, weights: smss.Weights | None) -> None:
        if weights is None:
            raise ValueError("MLPOnnx needs weights")
        self.session = weights.onnx_session()

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, F32]:
        x = np.ascontiguousarray(inputs["x"], dtype=np.float32)
        (y,) = self.session.run(["y"], {"x": x})
        return {"y": np.ascontiguousarray(y, dtype=np.float32)}
