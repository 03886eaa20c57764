"""The "behavior" demo: three models with deterministic weights and the workflow joining them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import smss  # noqa: E402
from smss._model import spec_of  # noqa: E402
from smss.demo import models  # noqa: E402
from smss.demo.behavior import FRAME_SHAPE, behavior_functions, behavior_workflow  # noqa: E402
from smss.demo.generate import (  # noqa: E402
    BEHAVIOR_MODELS,
    DEMO_MODELS,
    DemoArtifact,
    ensure_behavior_artifacts,
    parameter_count,
)
from smss.spec import FunctionSpec, TensorSpec  # noqa: E402
from smss.workflow.spec import (  # noqa: E402
    WorkflowSpec,
    parse_source,
    state_tensors,
    topological_order,
    validate_workflow,
)

CLASSES: dict[str, type] = {
    "behavior_perceive": models.Perceive,
    "behavior_track": models.Track,
    "behavior_respond": models.Respond,
}
Arrays = dict[str, np.ndarray]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoArtifact]:
    return {a.name: a for a in ensure_behavior_artifacts(tmp_path_factory.mktemp("behavior"))}


@pytest.fixture(scope="module")
def loaded(artifacts: dict[str, DemoArtifact]) -> dict[str, Any]:
    out = {}
    for name, a in artifacts.items():
        instance = getattr(models, a.class_name)()
        instance.load(smss.Weights(a.weights, a.weights_format))
        out[name] = instance
    return out


def frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(FRAME_SHAPE, dtype=np.float32)


def test_artifacts_are_the_three_behavior_models(artifacts: dict[str, DemoArtifact], tmp_path: Path) -> None:
    assert tuple(artifacts) == BEHAVIOR_MODELS
    assert DEMO_MODELS == ("mlp", "cnn", "mlp_onnx")  # the behavior models are prepared on their own
    for name, a in artifacts.items():
        assert getattr(models, a.class_name) is CLASSES[name]
        assert a.source == Path(models.__file__)
        assert a.weights_format == "safetensors"
    again = {a.name: a for a in ensure_behavior_artifacts(tmp_path)}
    for name, a in artifacts.items():
        digest = hashlib.sha256(a.weights.read_bytes()).hexdigest()
        assert hashlib.sha256(again[name].weights.read_bytes()).hexdigest() == digest, name


def test_parameter_counts() -> None:
    assert parameter_count("behavior_track") == 3 * 64 * (128 + 64) + 2 * 3 * 64
    assert parameter_count("behavior_respond") == 64 * 8 + 8
    assert 50_000 <= parameter_count("behavior_perceive") <= 200_000


@pytest.mark.parametrize("name", BEHAVIOR_MODELS)
def test_each_model_runs_batch_one(loaded: dict[str, Any], name: str) -> None:
    spec = spec_of(CLASSES[name])
    assert spec.name == name
    rng = np.random.default_rng(1)
    inputs = {t.name: rng.standard_normal((1, *t.shape[1:]), dtype=np.float32) for t in spec.inputs}
    outputs = loaded[name].predict(inputs)
    assert set(outputs) == {t.name for t in spec.outputs}
    for t in spec.outputs:
        y = outputs[t.name]
        assert y.shape == (1, *t.shape[1:])
        assert y.dtype == np.float32
        assert np.isfinite(y).all()


def test_track_is_not_batched() -> None:
    assert spec_of(models.Track).batching.max_batch_size == 1
    assert spec_of(models.Perceive).batching.max_batch_size == 8


def test_perceive_rows_are_independent_of_the_batch(loaded: dict[str, Any]) -> None:
    x = np.concatenate([frame(i) for i in range(4)])
    whole = loaded["behavior_perceive"].predict({"frame": x})["features"]
    alone = loaded["behavior_perceive"].predict({"frame": x[2:3]})["features"]
    np.testing.assert_allclose(alone[0], whole[2], rtol=1e-4, atol=1e-5)


def test_the_workflow_validates_against_the_three_functions() -> None:
    functions = {spec_of(c).name: spec_of(c) for c in CLASSES.values()}
    assert behavior_functions() == functions
    spec = validate_workflow(behavior_workflow(), functions)
    assert spec.name == "behavior"
    assert spec.inputs == (TensorSpec("frame", "FP32", FRAME_SHAPE),)
    assert topological_order(spec) == ["perceive", "track", "respond"]
    track = spec.stages[1]
    assert track.state
    assert state_tensors(track, functions["behavior_track"]) == (TensorSpec("h", "FP32", (-1, 64)),)
    assert spec.outputs == {"action": "respond.action"}


def run_by_hand(
    spec: WorkflowSpec,
    functions: Mapping[str, FunctionSpec],
    instances: Mapping[str, Any],
    request: Arrays,
    state: dict[str, Arrays],
) -> Arrays:
    """What the engine does for one run, minus the log: stages in order, sources
    resolved, state read from and written back to ``state`` (stage -> tensors)."""
    outputs: dict[str, Arrays] = {"request": request}
    for name in topological_order(spec):
        s = next(s for s in spec.stages if s.name == name)
        fn = functions[s.function]
        inputs = {}
        for target, source in s.inputs.items():
            head, tensor = parse_source(source)
            inputs[target] = outputs[head][tensor]
        held = state.setdefault(name, {})
        for t in state_tensors(s, fn):
            # A new session starts from zeros.
            inputs[t.name] = held.get(t.name, np.zeros((1, *t.shape[1:]), dtype=t.dtype))
        outputs[name] = instances[s.function].predict(inputs)
        for t in state_tensors(s, fn):
            held[t.name] = outputs[name][t.name]
    return {
        out: outputs[head][tensor]
        for out, (head, tensor) in ((o, parse_source(src)) for o, src in spec.outputs.items())
    }


def test_state_carried_between_runs_changes_the_answer(loaded: dict[str, Any]) -> None:
    functions = behavior_functions()
    spec = validate_workflow(behavior_workflow(), functions)
    session: dict[str, Arrays] = {}
    x = frame(3)
    first = run_by_hand(spec, functions, loaded, {"frame": x}, session)["action"]
    h1 = session["track"]["h"].copy()
    second = run_by_hand(spec, functions, loaded, {"frame": x}, session)["action"]
    h2 = session["track"]["h"]

    for action in (first, second):
        assert action.shape == (1, 8)
        assert action.dtype == np.float32
        assert (action >= 0).all()
        np.testing.assert_allclose(action.sum(axis=1), 1.0, rtol=0, atol=1e-5)
    assert np.abs(h2 - h1).max() > 1e-2  # the hidden state moved
    assert np.abs(second - first).max() > 1e-3  # same frame, different history, different answer

    # A fresh session with the same frame repeats the first answer exactly: only state differs.
    again = run_by_hand(spec, functions, loaded, {"frame": x}, {})["action"]
    np.testing.assert_array_equal(again, first)
