"""The controller places a GPU function with its model's one copy of weights per GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_controller import LONG, World, blocked, run

from smss.errors import StartFailed
from smss.inventory import Capacity, Device, NodeInventory
from smss.ports import FunctionRecord
from smss.spec import FunctionSpec, Resources, Scaling, TensorSpec

GPU_MB = 8192


def gpu_node() -> NodeInventory:
    host = Capacity(cpu=16.0, memory_mb=1 << 16)
    gpu = Capacity(gpu=1.0, gpu_memory_mb=GPU_MB)
    return NodeInventory("local", (Device("cpu", 0, "cpu", host, host), Device("cuda", 0, "gpu", gpu, gpu)))


def gpu_record(tmp_path: Path, weights_mb: int, share_mb: int) -> FunctionRecord:
    with (tmp_path / "w.safetensors").open("wb") as f:
        f.truncate(weights_mb << 20)  # its size is all placement reads
    spec = FunctionSpec(
        name="m",
        inputs=(TensorSpec("x", "FP32", (-1,)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        entrypoint="model.py:Model",
        runtime="torch",
        weights="w.safetensors",
        weights_format="safetensors",
        scaling=Scaling(keep_alive_s=300.0, concurrency=1),
        resources=Resources(cpu=1.0, memory_mb=512, gpu_memory_mb=share_mb, device="cuda"),
    ).validate()
    return FunctionRecord(spec, str(tmp_path), 0.0, 1)


def test_a_gpu_start_is_placed_on_the_gpu_with_room_for_its_share_and_its_weights(tmp_path: Path) -> None:
    async def main() -> None:
        w = World(blocked, inventories=(gpu_node(),))
        async with w.controller.running():
            w.controller.deploy(gpu_record(tmp_path, weights_mb=1024, share_mb=6144))
            task = w.request(1.0)
            await w.pause(1.0)
            (where,) = w.backend.placements
            assert where is not None
            assert where.gpu_index == 0
            assert where.gpu == Capacity(gpu_memory_mb=6144)  # its share; the weights are counted once, apart
            await w.release_until_done([task])

    run(main())


def test_a_gpu_function_whose_weights_and_share_fit_no_gpu_fails_its_requests_naming_gpu_memory(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        w = World(blocked, inventories=(gpu_node(),))
        async with w.controller.running():
            w.controller.deploy(gpu_record(tmp_path, weights_mb=3072, share_mb=6144))  # 9 GiB > 8
            task = w.request(1.0, LONG)
            await w.pause(1.0)
            with pytest.raises(StartFailed, match="gpu_memory_mb"):
                await task
            assert w.backend.starts == []

    run(main())
