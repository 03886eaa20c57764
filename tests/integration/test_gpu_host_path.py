"""The GPU start path on its CPU backend: real owner, standby and instance processes.

A :class:`NodeAgent` whose inventory has a (pretend) CUDA device and whose GPU side
runs the ``host`` backend (:class:`smss.node.gpu.device.HostMemory`): the owner keeps
each model's one copy in a ``/dev/shm`` buffer laid out as on a GPU, standbys bind to
it by handle, instances serve over their sockets. Everything but the CUDA calls
(``smss.node.gpu.cuda``, tested by ``tests/gpu``) is the code a GPU node runs.
Nothing is timed: where a start's time went is checked by which phases it reports.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import msgspec
import numpy as np
import pytest
from helpers import Function, alive, demo_function, infer, model_file_function, until

torch = pytest.importorskip("torch")

import smss  # noqa: E402
from smss.demo import models  # noqa: E402
from smss.errors import StartFailed  # noqa: E402
from smss.inventory import Allocation, Capacity, Device, NodeInventory  # noqa: E402
from smss.node.agent import NodeAgent  # noqa: E402
from smss.node.gpu.node import GpuSettings  # noqa: E402
from smss.ports import StartedInstance  # noqa: E402
from smss.spec import Resources  # noqa: E402

pytestmark = pytest.mark.slow

GPU_MB = 8192
HOST = Capacity(cpu=2.0, memory_mb=8192)
GPU = Capacity(gpu=1.0, gpu_memory_mb=GPU_MB)
INVENTORY = NodeInventory(
    "local", (Device("cpu", 0, "cpu", HOST, HOST), Device("cuda", 0, "pretend GPU", GPU, GPU))
)


def on_gpu(function: Function, gpu_memory_mb: int = 1024) -> Function:
    resources = Resources(cpu=1.0, memory_mb=512, gpu_memory_mb=gpu_memory_mb, device="cuda")
    return Function(msgspec.structs.replace(function.spec, resources=resources), function.artifact_dir)


def where(function: Function, n: int = 0) -> Allocation:
    r = function.spec.resources
    return Allocation(
        f"{function.spec.name}#start{n}",
        function.spec.name,
        "instance",
        "local",
        Capacity(cpu=r.cpu, memory_mb=r.memory_mb),
        Capacity(gpu=r.gpu, gpu_memory_mb=r.gpu_memory_mb),
        0,
    )


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Function:
    return on_gpu(demo_function(tmp_path_factory.mktemp("demo"), "cnn"))


@pytest.fixture(scope="module")
def reference(cnn: Function) -> models.CNN:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = models.CNN()
    model.load(smss.Weights(cnn.weights, "safetensors"))
    torch.set_num_threads(threads)
    return model


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, 64, 64), dtype=np.float32)


async def check_serves(started: StartedInstance, reference: models.CNN, seed: int) -> None:
    x = image(seed)
    got = await infer(started.info, {"image": x}, ("logits",))
    want = reference.predict({"image": x})["logits"]
    np.testing.assert_allclose(got["logits"], want, rtol=1e-5, atol=1e-5)


def run_prefix(agent: NodeAgent) -> str:
    """``smss-XXXX``: what the names of this agent's ``/dev/shm`` entries start with."""
    (key,) = agent.store.keys()
    segment = agent.store.get(key)
    assert segment is not None
    return "-".join(segment.path.name.split("-")[:2])


def buffers(prefix: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix))


def maps_of(pid: int) -> set[str]:
    return {
        line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/dev/shm/" in line
    }


async def gpu_agent(tmp_path: Path, **settings: object) -> NodeAgent:
    options = {"backend": "host", "standbys": 1, "spares": False, "start_timeout_s": 120.0, **settings}
    return NodeAgent(tmp_path / "logs", inventory=INVENTORY, gpu=GpuSettings(**options))  # type: ignore[arg-type]


def test_instances_on_a_gpu_share_the_owners_one_copy_and_compute_as_the_cpu_does(
    tmp_path: Path, cnn: Function, reference: models.CNN
) -> None:
    async def main() -> None:
        agent = await gpu_agent(tmp_path)
        try:
            first = await agent.start_instance(cnn.spec, cnn.artifact_dir, where(cnn, 1))
            prefix = f"{run_prefix(agent)}-gpu0"
            phases = first.timings.phases
            # The first start paid for everything: an owner, the file, the copy, a standby.
            assert {"owner", "host", "upload", "standby", "attach", "build", "warm"} <= set(phases)
            await agent.gpus.settled()  # the standby pool is refilled
            second = await agent.start_instance(cnn.spec, cnn.artifact_dir, where(cnn, 2))
            phases = second.timings.phases
            assert not {"owner", "host", "upload", "standby"} & set(phases), phases
            for k, started in enumerate((first, second)):
                await check_serves(started, reference, k)
            (copy,) = buffers(prefix)  # one buffer for the model on the GPU...
            for started in (first, second):  # ...that both instances map
                assert f"/dev/shm/{copy}" in maps_of(started.info.pid)
            (entry,) = agent.gpus.resident()[:1]
            assert entry.kind == "weights"
            assert entry.gpu_index == 0
            assert entry.gpu.gpu_memory_mb >= cnn.weights.stat().st_size // (1 << 20)
            stats = agent.gpus.stats()["cuda:0"]
            assert isinstance(stats, dict)
            assert stats["weights"]["models"][next(iter(stats["weights"]["models"]))]["users"] == 2  # type: ignore[index]
        finally:
            await agent.close()
        assert not buffers(prefix)

    asyncio.run(main())


def test_weights_step_down_to_host_memory_and_come_back_without_reading_the_file(
    tmp_path: Path, cnn: Function, reference: models.CNN
) -> None:
    async def main() -> None:
        agent = await gpu_agent(tmp_path)
        try:
            started = await agent.start_instance(cnn.spec, cnn.artifact_dir, where(cnn))
            await agent.stop_instance(started.info.id, 5.0)
            assert [a.kind for a in agent.gpus.resident()] == ["weights"]  # stays after scale to zero
            assert await agent.gpus.step_down(cnn.spec.name)
            assert agent.gpus.resident() == []
            assert agent.store.keys()  # the host copy stays
            await agent.gpus.settled()
            again = await agent.start_instance(cnn.spec, cnn.artifact_dir, where(cnn, 1))
            assert "upload" in again.timings.phases  # from the host segment to the GPU
            await check_serves(again, reference, 3)
            await agent.stop_instance(again.info.id, 5.0)
            assert agent.evict_weights(cnn.spec.name)  # both tiers: the next start reads the file
            await agent.gpus.settled()
            assert agent.gpus.resident() == []
            assert not agent.store.keys()
        finally:
            await agent.close()

    asyncio.run(main())


def test_a_spare_takes_the_next_start_and_serves_the_same(
    tmp_path: Path, cnn: Function, reference: models.CNN
) -> None:
    async def main() -> None:
        agent = await gpu_agent(tmp_path, spares=True)
        try:
            first = await agent.start_instance(cnn.spec, cnn.artifact_dir, where(cnn))
            await agent.gpus.settled()
            assert {a.kind for a in agent.gpus.resident()} == {"weights", "spare"}
            second = await agent.start_instance(cnn.spec, cnn.artifact_dir, where(cnn, 1))
            assert second.timings.phases.get("spare") == 1.0
            assert "attach" not in second.timings.phases  # bound ahead
            for k, started in enumerate((first, second)):
                await check_serves(started, reference, 10 + k)
            await agent.gpus.settled()  # a new spare for the start after
            assert await agent.gpus.step_down(cnn.spec.name) is False  # two instances use it
            assert "spare" not in {a.kind for a in agent.gpus.resident()}  # the spare went
        finally:
            await agent.close()

    asyncio.run(main())


def test_an_instance_that_dies_gives_its_weights_back_and_an_owner_that_dies_takes_its_instances(
    tmp_path: Path, cnn: Function
) -> None:
    async def main() -> None:
        agent = await gpu_agent(tmp_path)
        exits: list[str] = []
        agent.set_exit_callback(lambda iid, _code: exits.append(iid))
        try:
            a = await agent.start_instance(cnn.spec, cnn.artifact_dir, where(cnn))
            await agent.gpus.settled()
            b = await agent.start_instance(cnn.spec, cnn.artifact_dir, where(cnn, 1))
            os.kill(a.info.pid, signal.SIGKILL)
            await until(lambda: a.info.id in exits, "the killed instance to be reported")
            stats = agent.gpus.stats()["cuda:0"]
            assert isinstance(stats, dict)
            (model,) = stats["weights"]["models"].values()  # type: ignore[index]
            assert model["users"] == 1
            owner = stats["owner_pid"]
            assert isinstance(owner, int)
            os.kill(owner, signal.SIGKILL)
            await until(lambda: b.info.id in exits, "the owner's instances to be stopped")
            assert not alive(b.info.pid)
            assert agent.gpus.resident() == []
        finally:
            await agent.close()

    asyncio.run(main())


def test_a_model_that_fails_to_load_fails_its_start_with_the_reason(tmp_path: Path) -> None:
    broken = on_gpu(model_file_function("gpu_models.py:Broken", None, tmp_path / "broken"))

    async def main() -> None:
        agent = await gpu_agent(tmp_path)
        try:
            with pytest.raises(StartFailed, match="deliberate failure"):
                await agent.start_instance(broken.spec, broken.artifact_dir, where(broken))
        finally:
            await agent.close()

    asyncio.run(main())


def test_a_share_smaller_than_the_floor_fails_its_start_saying_what_to_declare(
    tmp_path: Path, cnn: Function
) -> None:
    tiny = on_gpu(cnn, gpu_memory_mb=8)

    async def main() -> None:
        agent = await gpu_agent(tmp_path)
        try:
            with pytest.raises(StartFailed, match="declare gpu_memory of at least"):
                await agent.start_instance(tiny.spec, tiny.artifact_dir, where(tiny))
        finally:
            await agent.close()

    asyncio.run(main())
