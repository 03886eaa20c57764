"""The demo models: deterministic weights, loadable through smss.Weights, consistent outputs."""

from __future__ import annotations

import ast
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import smss  # noqa: E402
from smss._model import spec_of  # noqa: E402
from smss.demo import models  # noqa: E402
from smss.demo.generate import (  # noqa: E402
    DEMO_MODELS,
    DemoArtifact,
    ensure_artifact,
    ensure_demo_artifacts,
    parameter_count,
)

CLASSES: dict[str, type] = {
    "mlp": models.MLP,
    "cnn": models.CNN,
    "mlp_onnx": models.MLPOnnx,
    "cnn_large": models.CNNLarge,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # The unit suite shares a small machine; one intra-op thread, as a worker with cpu=1 runs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoArtifact]:
    return {a.name: a for a in ensure_demo_artifacts(tmp_path_factory.mktemp("demo"))}


@pytest.fixture(scope="module")
def loaded(artifacts: dict[str, DemoArtifact]) -> dict[str, Any]:
    out = {}
    for name, a in artifacts.items():
        instance = CLASSES[name]()
        instance.load(smss.Weights(a.weights, a.weights_format))
        out[name] = instance
    return out


def sample(name: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = spec_of(CLASSES[name])
    return {t.name: rng.standard_normal((batch, *t.shape[1:]), dtype=np.float32) for t in spec.inputs}


def test_demo_artifacts_list_the_three_demo_models(artifacts: dict[str, DemoArtifact]) -> None:
    assert tuple(artifacts) == DEMO_MODELS == ("mlp", "cnn", "mlp_onnx")
    for name, a in artifacts.items():
        assert a.source == Path(models.__file__)
        assert getattr(models, a.class_name) is CLASSES[name]
        assert a.weights.is_file()
    assert artifacts["mlp_onnx"].weights_format == "onnx"
    assert artifacts["mlp"].weights_format == artifacts["cnn"].weights_format == "safetensors"


def test_generation_is_deterministic(artifacts: dict[str, DemoArtifact], tmp_path: Path) -> None:
    again = {a.name: a for a in ensure_demo_artifacts(tmp_path)}
    for name, a in artifacts.items():
        assert again[name].weights.parent == tmp_path
        assert sha256(again[name].weights) == sha256(a.weights), name


def test_intact_files_are_reused_and_damaged_ones_regenerated(tmp_path: Path) -> None:
    first = ensure_artifact(tmp_path, "mlp")
    digest, inode = sha256(first.weights), first.weights.stat().st_ino
    sidecar = first.weights.with_name("mlp.safetensors.sha256")
    assert sidecar.read_text() == f"{digest}  mlp.safetensors\n"

    assert ensure_artifact(tmp_path, "mlp").weights.stat().st_ino == inode  # reused, not rewritten

    first.weights.write_bytes(first.weights.read_bytes()[:1000])  # a torn write
    assert sha256(ensure_artifact(tmp_path, "mlp").weights) == digest

    sidecar.unlink()  # a crash between the file and its sidecar
    assert sha256(ensure_artifact(tmp_path, "mlp").weights) == digest
    assert sidecar.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors", sidecar.name]


def test_unknown_demo_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo model"):
        ensure_artifact(tmp_path, "resnet50")


@pytest.mark.parametrize("name", DEMO_MODELS)
@pytest.mark.parametrize("batch", [1, 8])
def test_predict_shapes_dtypes_and_values(loaded: dict[str, Any], name: str, batch: int) -> None:
    spec = spec_of(CLASSES[name])
    outputs = loaded[name].predict(sample(name, batch))
    assert set(outputs) == {t.name for t in spec.outputs}
    for t in spec.outputs:
        y = outputs[t.name]
        assert isinstance(y, np.ndarray)
        assert y.shape == (batch, *t.shape[1:])
        assert y.dtype == t.dtype
        assert y.flags.c_contiguous
        assert np.isfinite(y).all()
        assert np.ptp(y) > 0.1  # not a constant output


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_predict_accepts_read_only_inputs(loaded: dict[str, Any], name: str) -> None:
    inputs = sample(name, 2)
    frozen = {}
    for k, v in inputs.items():
        frozen[k] = np.frombuffer(v.tobytes(), dtype=v.dtype).reshape(v.shape)  # as a codec gives
        assert not frozen[k].flags.writeable
    got, want = loaded[name].predict(frozen), loaded[name].predict(inputs)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_rows_are_independent_of_the_batch(loaded: dict[str, Any]) -> None:
    # Dynamic batching concatenates requests: row i must not depend on the others.
    x = sample("cnn", 8)
    whole = loaded["cnn"].predict(x)["logits"]
    alone = loaded["cnn"].predict({"image": x["image"][3:4]})["logits"]
    np.testing.assert_allclose(alone[0], whole[3], rtol=1e-4, atol=1e-4)


def test_mlp_and_mlp_onnx_agree(loaded: dict[str, Any]) -> None:
    x = sample("mlp", 32, seed=7)
    torch_y = loaded["mlp"].predict(x)["y"]
    onnx_y = loaded["mlp_onnx"].predict(x)["y"]
    np.testing.assert_allclose(onnx_y, torch_y, rtol=0, atol=1e-5)


def test_parameter_counts() -> None:
    assert parameter_count("mlp") == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert 10_500_000 <= parameter_count("cnn") <= 12_000_000
    assert 90_000_000 <= parameter_count("cnn_large") <= 110_000_000


@pytest.mark.parametrize("name", list(CLASSES))
def test_specs_validate(name: str) -> None:
    spec = spec_of(CLASSES[name])
    assert spec.validate() is spec
    assert spec.name == name
    assert spec.runtime == ("onnx" if name == "mlp_onnx" else "torch")
    assert spec.outputs[0].shape == (-1, 10)


def test_mlp_spec_settings() -> None:
    spec = spec_of(models.MLP)
    assert [(t.name, t.datatype, t.shape) for t in spec.inputs] == [("x", "FP32", (-1, 64))]
    assert spec.batching.max_batch_size == 32
    assert spec.scaling.concurrency == 32
    assert spec.scaling.max_instances == 4
    assert spec.resources.memory_mb == 512
    assert spec_of(models.CNN).batching.max_batch_size == 8
    assert spec_of(models.CNN).inputs[0].shape == (-1, 3, 64, 64)


def test_models_file_imports_only_smss_numpy_torch_and_stdlib() -> None:
    tree = ast.parse(Path(models.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the file is deployed on its own"
            roots.add((node.module or "").partition(".")[0])
        elif isinstance(node, ast.Import):
            roots.update(alias.name.partition(".")[0] for alias in node.names)
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "smss", "torch"}


def test_a_copied_models_file_imports_without_torch(tmp_path: Path) -> None:
    # As a worker does: the file is copied and imported by path. torch stays unimported
    # until a torch model loads, so the ONNX model's cold start never pays for it.
    copy = tmp_path / "model.py"
    shutil.copy(models.__file__, copy)
    code = (
        "import importlib.util, sys\n"
        f"s = importlib.util.spec_from_file_location('user_model', {str(copy)!r})\n"
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
        "assert m.MLPOnnx.__smss_spec__.name == 'mlp_onnx'\n"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
