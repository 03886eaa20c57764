"""The demo models: a small MLP (torch and ONNX), a ResNet-18-shaped CNN and a ~100M-parameter CNN.

This file is deployed as a user model file: it is copied and imported in a
worker process, so it imports only ``smss``, numpy and, lazily, torch. torch is
imported inside the builders and ``load()`` so that importing the file stays
cheap and the ONNX model never pays for torch.

Weights come from :mod:`smss.demo.generate`, which builds the same modules
(on the ``meta`` device) to learn the state-dict keys and shapes.
"""

from __future__ import annotations

import abc
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


class _TorchModel(abc.ABC):
    """load(): build on ``meta`` (no random init), then adopt the file's tensors."""

    input_name: str
    output_name: str

    @abc.abstractmethod
    def build(self) -> nn.Module:
        """The module, on the current default device (``meta`` during load)."""

    def load(self, weights: smss.Weights | None) -> None:
        import torch

        if weights is None:
            raise ValueError(f"{type(self).__name__} needs weights")
        with torch.device("meta"):
            module = self.build()
        module.load_state_dict(weights.torch(), assign=True)
        self.module = module.eval().requires_grad_(False)
        # Where the weights are: the CPU, or a GPU (the inputs go there, the outputs come back).
        self.device = torch.device(weights.device)

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, F32]:
        import torch

        x = np.ascontiguousarray(inputs[self.input_name], dtype=np.float32)
        if not x.flags.writeable:
            # torch.from_numpy warns on read-only arrays (e.g. views of a request body).
            x = x.copy()
        with torch.inference_mode():
            y = self.module(torch.from_numpy(x).to(self.device))
        return {self.output_name: np.ascontiguousarray(y.cpu().numpy(), dtype=np.float32)}


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


# -- the "behavior" pipeline: perceive -> track (per-session state) -> respond ---------------------
#
# The paper's setting: predict a person's next action in a virtual scene from
# what they see. One run sees one frame of one session; ``Track`` carries the
# session's recurrent hidden state ``h`` between runs (see smss.demo.behavior).

PERCEIVE_WIDTHS = (3, 32, 64, 128)
FEATURES = 128
HIDDEN = 64
ACTIONS = 8


def build_perceive() -> nn.Module:
    """3x64x64 -> 128 features: three stride-2 3x3 convs with ReLU (64 -> 8 pixels a
    side, ~10 MMAC a frame), global average pooling, a linear layer.
    State-dict keys ``{0,2,4,8}.{weight,bias}``."""
    from torch import nn

    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(PERCEIVE_WIDTHS):
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(PERCEIVE_WIDTHS[-1], FEATURES)]
    return nn.Sequential(*layers)


def build_track() -> nn.Module:
    """A GRU cell, 128 features -> 64 hidden; keys ``{weight,bias}_{ih,hh}``."""
    from torch import nn

    return nn.GRUCell(FEATURES, HIDDEN)


def build_respond() -> nn.Module:
    """64 hidden -> probabilities of 8 actions; keys ``0.{weight,bias}``."""
    from torch import nn

    return nn.Sequential(nn.Linear(HIDDEN, ACTIONS), nn.Softmax(dim=-1))


def _as_tensor(x: npt.NDArray[Any]) -> Any:
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.writeable:
        x = x.copy()  # torch.from_numpy warns on read-only arrays
    return torch.from_numpy(x)


@smss.model(
    name="behavior_perceive",
    inputs={"frame": ("FP32", [-1, 3, 64, 64])},
    outputs={"features": ("FP32", [-1, FEATURES])},
    runtime="torch",
    max_batch_size=8,
    batch_wait_ms=2,
    concurrency=16,
    cpu=1,
    memory=256,
)
class Perceive(_TorchModel):
    input_name, output_name = "frame", "features"

    def build(self) -> nn.Module:
        return build_perceive()


@smss.model(
    name="behavior_track",
    inputs={"features": ("FP32", [-1, FEATURES]), "h": ("FP32", [-1, HIDDEN])},
    outputs={"h": ("FP32", [-1, HIDDEN])},
    runtime="torch",
    max_batch_size=1,  # the state is per session: one session's step per call
    concurrency=8,
    cpu=0.5,  # a small model: the three stages fit a 2-core node together
    memory=256,
)
class Track(_TorchModel):
    """One step of a session's GRU: ``h' = GRUCell(features, h)``."""

    def build(self) -> nn.Module:
        return build_track()

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, F32]:
        import torch

        with torch.inference_mode():
            features, h = (_as_tensor(inputs[k]).to(self.device) for k in ("features", "h"))
            h = self.module(features, h)
        return {"h": np.ascontiguousarray(h.cpu().numpy(), dtype=np.float32)}


@smss.model(
    name="behavior_respond",
    inputs={"h": ("FP32", [-1, HIDDEN])},
    outputs={"action": ("FP32", [-1, ACTIONS])},
    runtime="torch",
    max_batch_size=8,
    batch_wait_ms=1,
    concurrency=16,
    cpu=0.5,  # a small model: the three stages fit a 2-core node together
    memory=256,
)
class Respond(_TorchModel):
    """Probabilities of the person's next action (softmax over 8)."""

    input_name, output_name = "h", "action"

    def build(self) -> nn.Module:
        return build_respond()
