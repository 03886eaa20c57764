"""GPU declarations of a function: ``device``, ``gpu_memory`` sizes and the ``gpu`` fraction."""

from __future__ import annotations

import msgspec
import pytest

import smss
from smss.errors import InvalidSpec
from smss.spec import FunctionSpec, Resources, TensorSpec, parse_mib


def spec(resources: Resources, runtime: str = "torch", weights_format: str | None = None) -> FunctionSpec:
    return FunctionSpec(
        name="m",
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 4)),),
        entrypoint="model.py:M",
        runtime=runtime,  # type: ignore[arg-type]
        weights="w.bin" if weights_format else None,
        weights_format=weights_format,  # type: ignore[arg-type]
        resources=resources,
    )


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("2GiB", 2048),
        ("2G", 2048),
        ("2GB", 2048),
        ("512MiB", 512),
        ("512", 512),
        ("1.5 GiB", 1536),
        ("100KiB", 1),
        ("1TiB", 1 << 20),
        (3000, 3000),
        (0, 0),
    ],
)
def test_memory_sizes_are_read_as_binary_mib(text: int | str, mib: int) -> None:
    assert parse_mib(text, "gpu_memory") == mib


@pytest.mark.parametrize("bad", ["two gigs", "-1G", "", "2X", -5, 2.5, True])
def test_nonsense_sizes_are_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(InvalidSpec, match="gpu_memory"):
        parse_mib(bad, "gpu_memory")  # type: ignore[arg-type]


def test_auto_means_cuda_exactly_when_a_gpu_need_is_declared() -> None:
    assert not Resources().on_gpu
    assert Resources(gpu=0.25).on_gpu
    assert Resources(gpu_memory_mb=1024).on_gpu
    assert Resources(device="cuda", gpu=0.5).on_gpu
    assert not Resources(device="cpu").on_gpu


def test_a_spec_from_before_device_existed_decodes_with_its_old_meaning() -> None:
    old = b'{"cpu": 1.0, "memory_mb": 512, "gpu": 0.5, "gpu_memory_mb": 4096}'
    r = msgspec.json.decode(old, type=Resources)
    assert r.device == "auto"
    assert r.on_gpu


@pytest.mark.parametrize(
    ("resources", "words"),
    [
        (Resources(device="cuda"), "needs a GPU share"),
        (Resources(device="cpu", gpu_memory_mb=512), "declares no GPU needs"),
        (Resources(gpu=1.5), "one GPU"),
        (Resources(gpu=-0.5), "positive"),
    ],
)
def test_contradictory_gpu_declarations_are_refused(resources: Resources, words: str) -> None:
    with pytest.raises(InvalidSpec, match=words):
        spec(resources).validate()


def test_onnx_on_a_gpu_is_refused_and_on_the_cpu_accepted() -> None:
    with pytest.raises(InvalidSpec, match="ONNX"):
        spec(Resources(gpu_memory_mb=512), runtime="onnx", weights_format="onnx").validate()
    spec(Resources(), runtime="onnx", weights_format="onnx").validate()


def test_the_decorator_takes_device_and_a_gpu_memory_size() -> None:
    @smss.model(
        name="g",
        inputs={"x": ("FP32", [-1, 4])},
        outputs={"y": ("FP32", [-1, 4])},
        runtime="torch",
        device="cuda",
        gpu_memory="2GiB",
        memory="1GiB",
    )
    class G:
        def load(self, weights: object) -> None: ...

        def predict(self, inputs: dict[str, object]) -> dict[str, object]:
            return inputs

    r = G.__smss_spec__.resources  # type: ignore[attr-defined]
    assert (r.device, r.gpu_memory_mb, r.memory_mb, r.gpu) == ("cuda", 2048, 1024, 0.0)

    with pytest.raises(InvalidSpec, match="needs a GPU share"):
        smss.model(name="h", inputs={"x": ("FP32", [4])}, outputs={"y": ("FP32", [4])}, device="cuda")
