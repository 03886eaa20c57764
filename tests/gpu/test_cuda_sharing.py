"""Two-layer GPU sharing on a real CUDA GPU (marked ``gpu``: skipped with the reason elsewhere).

The node agent with its CUDA backend: a GPU owner holding one copy of each model's
weights, standbys that open it by CUDA IPC, instances capped to their share. This
process never initialises CUDA (it forks): every CUDA call is in the agent's
GPU processes; the reference outputs are computed here on the CPU.

``scripts/gpu-check`` installs a CUDA build of torch and runs these with
``pytest -m gpu``.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

import smss
from smss.demo import models
from smss.demo.generate import ensure_artifact
from smss.errors import ModelError
from smss.inventory import Allocation, Capacity
from smss.node.agent import NodeAgent
from smss.node.channel import UnixChannel
from smss.node.devices import discover
from smss.node.gpu.node import GpuSettings
from smss.packaging import load_class, package_class
from smss.ports import InstanceInfo, StartedInstance
from smss.spec import FunctionSpec, Resources

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

MODELS = Path(__file__).parents[1] / "integration" / "models"


def install(
    source: Path, cls: type, weights: Path | None, directory: Path, resources: Resources
) -> tuple[FunctionSpec, Path]:
    package = package_class(source, cls, weights)
    directory.mkdir(parents=True)
    spec = msgspec.structs.replace(package.spec, resources=resources)
    (directory / spec.entrypoint.partition(":")[0]).write_text(package.source)
    if weights is not None and spec.weights is not None:
        shutil.copyfile(weights, directory / spec.weights)
    return spec, directory


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[FunctionSpec, Path]:
    base = tmp_path_factory.mktemp("gpu")
    art = ensure_artifact(base / "weights", "cnn")
    resources = Resources(cpu=1.0, memory_mb=1024, gpu_memory_mb=1536, device="cuda")
    return install(art.source, models.CNN, art.weights, base / "cnn" / "g1", resources)


def where(spec: FunctionSpec, n: int = 0) -> Allocation:
    r = spec.resources
    return Allocation(
        f"{spec.name}#{n}",
        spec.name,
        "instance",
        "local",
        Capacity(cpu=r.cpu, memory_mb=r.memory_mb),
        Capacity(gpu=r.gpu, gpu_memory_mb=r.gpu_memory_mb),
        0,
    )


def agent(tmp_path: Path, **settings: Any) -> NodeAgent:
    inventory = discover("local")
    assert any(d.kind == "cuda" for d in inventory.devices)
    options: dict[str, Any] = {"backend": "cuda", "spares": False, **settings}
    return NodeAgent(tmp_path / "logs", inventory=inventory, gpu=GpuSettings(**options))


async def infer(
    info: InstanceInfo, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
) -> dict[str, Any]:
    channel = await UnixChannel.connect(info)
    try:
        return await channel.infer(inputs, outputs)
    finally:
        await channel.close()


def reference(spec: FunctionSpec, directory: Path) -> models.CNN:
    model = models.CNN()
    model.load(smss.Weights(directory / str(spec.weights), "safetensors"))
    return model


def test_instances_open_the_owners_one_copy_by_cuda_ipc_and_compute_as_the_cpu_does(
    tmp_path: Path, cnn: tuple[FunctionSpec, Path]
) -> None:
    spec, directory = cnn
    cpu = reference(spec, directory)

    async def main() -> None:
        a = agent(tmp_path)
        try:
            first = await a.start_instance(spec, directory, where(spec))
            assert {"owner", "host", "upload", "standby", "attach", "build", "warm"} <= set(
                first.timings.phases
            )
            await a.gpus.settled()
            second = await a.start_instance(spec, directory, where(spec, 1))
            assert not {"upload", "standby"} & set(second.timings.phases)
            for k, started in enumerate((first, second)):
                x = np.random.default_rng(k).standard_normal((4, 3, 64, 64), dtype=np.float32)
                got = (await infer(started.info, {"image": x}, ("logits",)))["logits"]
                np.testing.assert_allclose(got, cpu.predict({"image": x})["logits"], rtol=1e-2, atol=1e-2)
            stats = a.gpus.stats()["cuda:0"]
            assert isinstance(stats, dict)
            weights = stats["weights"]
            assert isinstance(weights, dict)
            (model,) = weights["models"].values()
            assert model["users"] == 2  # two instances, one copy
        finally:
            await a.close()

    asyncio.run(main())


def test_an_instance_beyond_its_share_fails_alone_and_serves_on(tmp_path: Path) -> None:
    path, cls = load_class(str(MODELS / "gpu_models.py:Hog"))
    weights = tmp_path / "w.safetensors"
    from safetensors.numpy import save_file

    save_file({"w": np.ones((1, 4), dtype=np.float32)}, str(weights))
    # 2 GiB: its CUDA context (some 500 MiB) and room for torch's allocator.
    resources = Resources(cpu=1.0, memory_mb=512, gpu_memory_mb=2048, device="cuda")
    spec, directory = install(path, cls, weights, tmp_path / "hog" / "g1", resources)

    async def main() -> None:
        a = agent(tmp_path)
        try:
            hog = await a.start_instance(spec, directory, where(spec))
            await a.gpus.settled()
            neighbour = await a.start_instance(spec, directory, where(spec, 1))
            big = np.full((1, 4), 8192.0, dtype=np.float32)  # 8 GiB: far beyond a 2 GiB share
            with pytest.raises(ModelError, match="exceeded its GPU memory share"):
                await infer(hog.info, {"x": big}, ("y",))
            small = np.zeros((1, 4), dtype=np.float32)
            for started in (hog, neighbour):  # the one that failed, and its neighbour
                out = await infer(started.info, {"x": small}, ("y",))
                np.testing.assert_array_equal(out["y"], np.ones((1, 4), dtype=np.float32))
        finally:
            await a.close()

    asyncio.run(main())


def test_weights_step_down_to_host_memory_and_come_back_to_the_gpu(
    tmp_path: Path, cnn: tuple[FunctionSpec, Path]
) -> None:
    spec, directory = cnn

    async def main() -> None:
        a = agent(tmp_path)
        try:
            started: StartedInstance = await a.start_instance(spec, directory, where(spec))
            await a.stop_instance(started.info.id, 10.0)
            assert [r.kind for r in a.gpus.resident()] == ["weights"]
            assert await a.gpus.step_down(spec.name)
            assert a.gpus.resident() == []
            await a.gpus.settled()
            again = await a.start_instance(spec, directory, where(spec, 1))
            assert "upload" in again.timings.phases
            assert "host" not in again.timings.phases  # from host memory, not the file
        finally:
            await a.close()

    asyncio.run(main())


def test_a_spare_serves_the_next_start_in_one_message(tmp_path: Path, cnn: tuple[FunctionSpec, Path]) -> None:
    spec, directory = cnn

    async def main() -> None:
        a = agent(tmp_path, spares=True)
        try:
            await a.start_instance(spec, directory, where(spec))
            await a.gpus.settled()
            second = await a.start_instance(spec, directory, where(spec, 1))
            assert second.timings.phases.get("spare") == 1.0
            x = np.zeros((1, 3, 64, 64), dtype=np.float32)
            assert (await infer(second.info, {"image": x}, ("logits",)))["logits"].shape == (1, 10)
        finally:
            await a.close()

    asyncio.run(main())
