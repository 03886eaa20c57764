"""Cold starts through zygotes, model templates and the shared weight store, with real processes.

Each test drives a fork-mode :class:`NodeAgent` inside ``asyncio.run`` and
closes it with a check that every process it started (zygotes, templates,
instances) is gone and no ``/dev/shm`` segment of it remains. Nothing is timed:
sharing is checked by physical page frames, safety by the signal that kills a
writer, correctness by bit-exact comparison with a model loaded in this process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    PAGE,
    Function,
    alive,
    demo_function,
    infer,
    local_backend,
    model_file_function,
    page_frames,
    smaps_region,
    until,
)
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import smss  # noqa: E402
from smss.demo import models  # noqa: E402
from smss.errors import InstanceLost, ModelError  # noqa: E402
from smss.node.agent import NodeAgent  # noqa: E402
from smss.node.attach import Attached, HotCopy  # noqa: E402
from smss.node.weightstore import HEADER_SIZE, WeightStore  # noqa: E402
from smss.node.worker import child_pids, load_model  # noqa: E402
from smss.ports import InstanceInfo  # noqa: E402
from smss.spec import FunctionSpec  # noqa: E402

Predict = Callable[[np.ndarray], np.ndarray]
DEMO = ("mlp", "cnn", "mlp_onnx")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Function]:
    """The demo models installed as the platform would (files only: no process outlives setup)."""
    base = tmp_path_factory.mktemp("demo")
    return {name: demo_function(base, name) for name in DEMO}


@pytest.fixture(scope="module")
def reference(demo: dict[str, Function]) -> Iterator[dict[str, Predict]]:
    """Each demo model loaded normally in this process, from the file, on one thread as an
    instance with ``cpu=1`` runs: the outputs a forked instance must reproduce bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    classes = {"mlp": models.MLP, "cnn": models.CNN, "mlp_onnx": models.MLPOnnx}
    predictors: dict[str, Predict] = {}
    for name, cls in classes.items():
        function = demo[name]
        model = cls()
        model.load(smss.Weights(function.weights, function.spec.weights_format or ""))
        (i,), (o,) = function.spec.inputs, function.spec.outputs

        def predict(x: np.ndarray, model: object = model, i: str = i.name, o: str = o.name) -> np.ndarray:
            return np.asarray(model.predict({i: x})[o])  # type: ignore[attr-defined]

        predictors[name] = predict
    yield predictors
    torch.set_num_threads(threads)


def sample(spec: FunctionSpec, batch: int, seed: int) -> np.ndarray:
    (tensor,) = spec.inputs
    shape = [batch if d == -1 else d for d in tensor.shape]
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


async def predict(function: Function, info: InstanceInfo, x: np.ndarray) -> np.ndarray:
    (i,), (o,) = function.spec.inputs, function.spec.outputs
    out = await infer(info, {i.name: x}, (o.name,))
    return np.asarray(out[o.name])


def template_of(backend: NodeAgent, function: Function) -> dict[str, int]:
    """The weight cache's report of the function's template (pid and weights mapping)."""
    templates = backend.weight_cache()["local"]["templates"]  # type: ignore[index]
    (template,) = (t for key, t in templates.items() if key.partition("@")[0] == function.spec.name)
    return template  # type: ignore[no-any-return]


# ------------------------------------------------------------------ sharing


def test_instances_of_one_model_map_the_same_physical_weights(
    tmp_path: Path, demo: dict[str, Function], reference: dict[str, Predict]
) -> None:
    """Two instances of ``cnn``: one segment in the store, and the template's weights range
    backed by the very same physical pages in both instances (checked by page frame number,
    and by ``smaps`` accounting, which also works where frame numbers are hidden)."""
    cnn = demo["cnn"]
    x = sample(cnn.spec, 1, seed=1)
    file_bytes = cnn.weights.stat().st_size

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs") as (backend, run):
            first = await backend.start_instance(cnn.spec, cnn.artifact_dir)
            second = await backend.start_instance(cnn.spec, cnn.artifact_dir)
            run.note()
            for started in (first, second):
                assert np.array_equal(await predict(cnn, started.info, x), reference["cnn"](x))

            stats = backend.store.stats()
            assert (stats.entries, stats.misses, stats.hits) == (1, 1, 1)  # one segment, loaded once
            template = template_of(backend, cnn)
            address, length = template["weights_address"], template["weights_bytes"]
            assert address % PAGE == 0
            assert length == file_bytes
            pids = [first.info.pid, second.info.pid]
            assert template["pid"] not in pids

            # The same virtual range holds the same physical pages in both instances (and in the
            # template they were forked from): one copy in RAM, not one per instance.
            probes = [address + off // PAGE * PAGE for off in (0, length // 3, 2 * length // 3, length - 1)]
            frames = [page_frames(pid, probes) for pid in [*pids, template["pid"]]]
            assert all(f is not None for f in frames[0]), f"weights not resident in the instance: {frames}"
            if any(frames[0]):  # without CAP_SYS_ADMIN the kernel reports every frame as 0
                assert all(frames[0]), frames
                assert frames[0] == frames[1] == frames[2], frames

            # The same, as the kernel accounts it (what a reader without CAP_SYS_ADMIN can check):
            # the mapping is read-only and every resident page of it is shared.
            regions = [smaps_region(pid, address) for pid in pids]
            for region in regions:
                assert (region.start, region.end) == (regions[0].start, regions[0].end)
                assert region.start <= address
                assert address + length <= region.end
                assert region.perms.startswith("r-")
                assert region.sizes["Rss"] > 0
                assert region.shared_kb == region.sizes["Rss"]
                assert region.sizes["Private_Clean"] + region.sizes["Private_Dirty"] == 0

            await run.close_and_check()

    asyncio.run(scenario())


def test_a_template_builds_its_model_on_the_hot_copy_without_copying_the_weights(
    demo: dict[str, Function], reference: dict[str, Predict]
) -> None:
    """Why the shared pages of the test above are the model's own: every parameter and buffer
    of the module a template builds (``load_model(..., hot=True)``, run here in this process)
    lies inside the hot copy, so an instance forked from it computes on the shared copy."""
    cnn = demo["cnn"]
    prefix = f"smsstest-{uuid.uuid4().hex[:12]}"
    store = WeightStore(1 << 30, prefix=prefix)
    try:
        segment, _ = store.acquire("cnn", cnn.weights)
        model = load_model(cnn.spec, cnn.artifact_dir, segment.path, hot=True)
        hot = model.__smss_weights__.attached
        assert isinstance(hot, HotCopy)
        low, high = hot.address, hot.address + len(hot.data)
        tensors = model.module.state_dict()
        assert len(tensors) == len(load_file(str(cnn.weights)))
        outside = [
            name
            for name, t in tensors.items()
            if not (low <= t.data_ptr() and t.data_ptr() + t.nbytes <= high)
        ]
        assert outside == []
        x = sample(cnn.spec, 2, seed=5)
        assert np.array_equal(model.predict({"image": x})["logits"], reference["cnn"](x))
    finally:
        store.close()
        sys.modules.pop(f"smss_user_{cnn.spec.name}", None)


# ------------------------------------------------------------------ correctness


def test_forked_instances_match_a_normally_loaded_model_bit_for_bit(
    tmp_path: Path, demo: dict[str, Function], reference: dict[str, Predict]
) -> None:
    """Weights viewed in place (a huge-page copy of the segment: torch tensors, and ONNX
    Runtime's initializers) give exactly the outputs of the same model loaded from its file."""

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs") as (backend, run):
            for seed, name in enumerate(DEMO):
                function = demo[name]
                started = await backend.start_instance(function.spec, function.artifact_dir)
                run.note()
                for batch in (1, 3):
                    x = sample(function.spec, batch, seed=10 * seed + batch)
                    got = await predict(function, started.info, x)
                    want = reference[name](x)
                    assert got.dtype == want.dtype
                    assert got.shape == want.shape
                    assert np.array_equal(got, want), f"{name}: max |diff| {np.abs(got - want).max()}"
            await run.close_and_check()

    asyncio.run(scenario())


# ------------------------------------------------------------------ writes to shared weights


@pytest.fixture
def scribbler(tmp_path: Path) -> Function:
    weights = tmp_path / "scribbler.safetensors"
    save_file({"w": np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)}, str(weights))
    return model_file_function("scribbler.py:Scribbler", weights, tmp_path / "scribbler" / "g1")


def test_a_write_to_shared_weights_fails_that_request_and_harms_no_other_instance(
    tmp_path: Path, scribbler: Function
) -> None:
    x = np.array([[10.0, 20.0, 30.0, 40.0]], dtype=np.float32)
    expected = x + np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)

    def request(first: float) -> np.ndarray:
        poisoned = x.copy()
        poisoned[0, 0] = first
        return poisoned

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs") as (backend, run):
            exits: list[str] = []
            backend.set_exit_callback(lambda instance_id, _code: exits.append(instance_id))
            writer = await backend.start_instance(scribbler.spec, scribbler.artifact_dir)
            bystander = await backend.start_instance(scribbler.spec, scribbler.artifact_dir)
            run.note()
            assert np.array_equal(await predict(scribbler, writer.info, x), expected)

            # Through numpy: the arrays are read-only, predict() raises, the instance lives on.
            with pytest.raises(ModelError, match="read-only"):
                await predict(scribbler, writer.info, request(-1.0))
            assert np.array_equal(await predict(scribbler, writer.info, x), expected)

            # Past numpy, straight into the pages: the MMU refuses; that instance alone dies.
            with pytest.raises(InstanceLost):
                await predict(scribbler, writer.info, request(-2.0))
            await until(lambda: not alive(writer.info.pid), "the writing instance to exit")
            await until(lambda: exits == [writer.info.id], "the backend to report the exit")

            assert np.array_equal(await predict(scribbler, bystander.info, x), expected)
            assert alive(template_of(backend, scribbler)["pid"])
            later = await backend.start_instance(scribbler.spec, scribbler.artifact_dir)
            run.note()
            assert np.array_equal(await predict(scribbler, later.info, x), expected)
            # The shared segment still holds the file's bytes.
            (key,) = backend.store.keys()
            segment = backend.store.get(key)
            assert segment is not None
            assert segment.path.read_bytes()[HEADER_SIZE:] == scribbler.weights.read_bytes()
            await run.close_and_check()

    asyncio.run(scenario())


_WRITER = textwrap.dedent(
    """
    import os, resource, sys
    from pathlib import Path
    import torch
    from smss.node.attach import Attached, HotCopy, torch_views

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the crash is expected: no core file
    torch.set_num_threads(1)
    attached = Attached(Path(sys.argv[1]))
    views = {"attached": attached.safetensors(), "hot": HotCopy(attached.data).safetensors()}
    w = torch_views(views[sys.argv[2]])["w"]
    before = w.clone()
    pid = os.fork()
    if pid == 0:  # a sibling sharing the same pages writes first
        w.add_(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("sibling", os.WTERMSIG(status) if os.WIFSIGNALED(status) else "exited", flush=True)
    print("unchanged", bool(torch.equal(w, before)), flush=True)
    w.add_(1)
    print("survived", flush=True)
    """
)


@pytest.mark.parametrize("view", ["hot", "attached"])
def test_an_in_place_torch_write_to_attached_weights_kills_only_the_writer(tmp_path: Path, view: str) -> None:
    """torch does not honour numpy's read-only flag, so ``add_`` really stores into the
    weights: the read-only mapping turns that into SIGSEGV in the writing process, and
    every other process's copy (a forked sibling's, this one's) is untouched."""
    source = tmp_path / "w.safetensors"
    save_file({"w": np.arange(4096, dtype=np.float32)}, str(source))
    prefix = f"smsstest-{uuid.uuid4().hex[:12]}"
    store = WeightStore(1 << 30, prefix=prefix)
    try:
        segment, _ = store.acquire("w", source)
        ours = Attached(segment.path)
        try:
            done = subprocess.run(
                [sys.executable, "-c", _WRITER, str(segment.path), view],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == -signal.SIGSEGV, (done.returncode, done.stdout, done.stderr)
            assert done.stdout.split("\n")[:2] == [f"sibling {int(signal.SIGSEGV)}", "unchanged True"]
            assert "survived" not in done.stdout
            assert np.array_equal(ours.safetensors()["w"], load_file(str(source))["w"])
        finally:
            ours.close()
    finally:
        store.close()


# ------------------------------------------------------------------ eviction


def test_eviction_under_a_small_budget_drops_the_idle_model_and_a_later_cold_start_reloads_it(
    tmp_path: Path, demo: dict[str, Function], reference: dict[str, Predict]
) -> None:
    mlp, cnn = demo["mlp"], demo["cnn"]
    mlp_bytes, cnn_bytes = (HEADER_SIZE + os.path.getsize(f.weights) for f in (mlp, cnn))
    budget = mlp_bytes + cnn_bytes - 1  # room for either model, not both
    x = sample(mlp.spec, 4, seed=3)

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs", weight_budget_bytes=budget) as (backend, run):
            store = backend.store
            first = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            run.note()
            old_template = template_of(backend, mlp)["pid"]
            (mlp_key,) = store.keys()
            old_segment = store.get(mlp_key)
            assert old_segment is not None
            old_path = old_segment.path
            await backend.stop_instance(first.info.id, grace_s=10)

            started = await backend.start_instance(cnn.spec, cnn.artifact_dir)
            run.note()
            assert [k.partition("@")[0] for k in store.stats().models] == ["cnn"]
            assert store.stats().evictions == 1
            assert not old_path.exists()
            await until(lambda: not alive(old_template), "the evicted model's template to exit")
            assert [k.partition("@")[0] for k in backend.weight_cache()["local"]["templates"]] == ["cnn"]  # type: ignore[index]
            await backend.stop_instance(started.info.id, grace_s=10)

            again = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            run.note()
            assert [k.partition("@")[0] for k in store.stats().models] == ["mlp"]  # cnn idle: evicted in turn
            stats = store.stats()
            assert (stats.misses, stats.hits, stats.evictions) == (3, 0, 2)
            assert template_of(backend, mlp)["pid"] != old_template
            assert np.array_equal(await predict(mlp, again.info, x), reference["mlp"](x))
            await run.close_and_check()

    asyncio.run(scenario())


# ------------------------------------------------------------------ zygote failure


def test_a_killed_zygote_is_replaced_and_the_next_cold_start_works(
    tmp_path: Path, demo: dict[str, Function], reference: dict[str, Predict]
) -> None:
    mlp = demo["mlp"]
    x = sample(mlp.spec, 2, seed=4)

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs") as (backend, run):
            exits: list[str] = []
            backend.set_exit_callback(lambda instance_id, _code: exits.append(instance_id))
            before = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            run.note()
            zygote = backend.zygotes.zygote_pid("torch")
            template = template_of(backend, mlp)["pid"]
            assert zygote is not None

            os.kill(zygote, signal.SIGKILL)
            # Its template and that template's instance die with it (PR_SET_PDEATHSIG).
            await until(lambda: not alive(template), "the template to die with its zygote")
            await until(lambda: not alive(before.info.pid), "the instance to die with its template")
            await until(lambda: exits == [before.info.id], "the backend to report the lost instance")
            # The agent learns of the zygote's death asynchronously (asyncio's child watcher); a start
            # that races that notice can still fail, as prepare() does not retry on a dead zygote.
            await until(
                lambda: backend.zygotes.zygote_pid("torch") is None, "the backend to see the zygote exit"
            )

            after = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            run.note()
            assert backend.zygotes.zygote_pid("torch") not in (None, zygote)
            assert backend.zygotes.zygote_starts == 2
            assert template_of(backend, mlp)["pid"] != template
            assert np.array_equal(await predict(mlp, after.info, x), reference["mlp"](x))
            assert backend.store.stats().entries == 1  # the weights stayed resident throughout
            await run.close_and_check()

    asyncio.run(scenario())


# ------------------------------------------------------------------ spares


def spare_of(backend: NodeAgent, function: Function) -> int | None:
    """The template's child that is not an instance of the backend (its spare), if any."""
    template = template_of(backend, function)["pid"]
    spares = child_pids(template) - set(backend.pids().values())
    assert len(spares) <= 1, spares
    return next(iter(spares), None)


def test_a_cold_start_hands_the_request_to_the_templates_rehearsed_spare(
    tmp_path: Path, demo: dict[str, Function], reference: dict[str, Predict]
) -> None:
    cnn = demo["cnn"]
    x = sample(cnn.spec, 1, seed=7)

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs") as (backend, run):
            first = await backend.start_instance(cnn.spec, cnn.artifact_dir)
            run.note()
            assert first.timings.phases["spare"] == 0.0  # the template was just made: a fork
            await until(lambda: spare_of(backend, cnn) is not None, "the template to fork a spare when idle")
            spare = spare_of(backend, cnn)
            assert spare is not None
            run.note(spare)
            await backend.stop_instance(first.info.id, 1.0)
            # A spare still rehearsing is kept and passed over (the start forks): retry until
            # a start finds it ready. Nothing is timed; the loop only bounds the wait.
            for _ in range(100):
                second = await backend.start_instance(cnn.spec, cnn.artifact_dir)
                run.note()
                if second.timings.phases["spare"] == 1.0:
                    break
                assert spare_of(backend, cnn) == spare  # kept while it rehearses
                await backend.stop_instance(second.info.id, 1.0)
                await asyncio.sleep(0.1)
            assert second.info.pid == spare
            assert second.timings.phases["spare"] == 1.0
            assert second.timings.phases["fork"] == 0.0
            assert np.array_equal(await predict(cnn, second.info, x), reference["cnn"](x))
            await run.close_and_check()

    asyncio.run(scenario())


def test_a_dead_spare_is_passed_over_and_replaced(
    tmp_path: Path, demo: dict[str, Function], reference: dict[str, Predict]
) -> None:
    mlp = demo["mlp"]
    x = sample(mlp.spec, 2, seed=8)

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs") as (backend, run):
            first = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            run.note()
            await until(lambda: spare_of(backend, mlp) is not None, "a spare")
            spare = spare_of(backend, mlp)
            assert spare is not None
            os.kill(spare, signal.SIGKILL)
            await until(lambda: not alive(spare), "the spare to die")
            second = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            run.note()
            assert second.timings.phases["spare"] == 0.0  # forked, as without spares
            assert np.array_equal(await predict(mlp, second.info, x), reference["mlp"](x))
            await until(lambda: spare_of(backend, mlp) not in (None, spare), "a new spare")
            assert alive(first.info.pid)  # the other instance never noticed
            await run.close_and_check()

    asyncio.run(scenario())


def test_without_spares_a_template_forks_only_instances(tmp_path: Path, demo: dict[str, Function]) -> None:
    mlp = demo["mlp"]

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs", spares=False) as (backend, run):
            started = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            run.note()
            await asyncio.sleep(1.0)  # well past the template's idle time
            assert child_pids(template_of(backend, mlp)["pid"]) == {started.info.pid}
            await run.close_and_check()

    asyncio.run(scenario())


# ------------------------------------------------------------------ cleanup


def test_close_leaves_no_process_and_no_segment_behind(
    tmp_path: Path, demo: dict[str, Function], scribbler: Function
) -> None:
    """Zygotes of two runtimes, their templates, running, stopped and crashed instances:
    after ``close()`` none of their processes is alive and none of their segments exists."""

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs") as (backend, run):
            mlp = demo["mlp"]
            running = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            stopped = await backend.start_instance(mlp.spec, mlp.artifact_dir)
            crashed = await backend.start_instance(scribbler.spec, scribbler.artifact_dir)
            idle = await backend.start_instance(scribbler.spec, scribbler.artifact_dir)
            run.note()
            await backend.stop_instance(stopped.info.id, grace_s=10)
            with pytest.raises(InstanceLost):
                await predict(scribbler, crashed.info, np.full((1, 4), -2.0, dtype=np.float32))
            assert {running.info.pid, idle.info.pid} <= {p.pid for p in run.processes if p.alive()}
            assert len(run.processes) == 2 + 2 + 4  # two zygotes, two templates, four instances
            assert len(run.shm_prefixes) == 1
            await run.close_and_check()
            assert backend.pids() == {}
            assert backend.store.stats().entries == 0

    asyncio.run(scenario())


# ------------------------------------------------------------------ concurrent first starts


def test_concurrent_first_starts_of_a_model_build_one_template(
    tmp_path: Path, demo: dict[str, Function], reference: dict[str, Predict]
) -> None:
    """Three starts of a model asked for at once, before it has a template: one template is
    built (the others wait for it and fork), and no template process is left over."""
    mlp = demo["mlp"]
    x = sample(mlp.spec, 2, seed=9)

    async def scenario() -> None:
        async with local_backend(tmp_path / "logs") as (backend, run):
            started = await asyncio.gather(
                *(backend.start_instance(mlp.spec, mlp.artifact_dir) for _ in range(3))
            )
            run.note()
            assert len(backend.zygotes.templates()) == 1
            tiers = sorted(s.timings.tier for s in started)
            assert tiers.count("standby") == 2, tiers  # two forks of the one template
            template = template_of(backend, mlp)["pid"]
            # Every process under the zygote is that template (no orphaned second build).
            zygote = backend.zygotes.zygote_pid("torch")
            assert zygote is not None
            assert child_pids(zygote) == {template}
            for s in started:
                assert np.array_equal(await predict(mlp, s.info, x), reference["mlp"](x))
            await run.close_and_check()

    asyncio.run(scenario())
