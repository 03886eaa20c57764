"""ONNX weights attached from the weight store: ONNX Runtime computes with the
initializers where they lie (no copy of its own), bit for bit like a session on the file."""

from __future__ import annotations

import ctypes
import gc
import mmap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from smss.node.attach import onnx_views  # noqa: E402
from smss.node.weights import Weights  # noqa: E402

N = 48


class Segment:
    """Stands in for an attached weight segment: ``.data``, the model's bytes."""

    def __init__(self, data: memoryview) -> None:
        self.data = data


def writable(raw: bytes) -> Segment:
    """A segment whose bytes can be changed, so that a change can be seen in answers."""
    return Segment(memoryview(bytearray(raw)))


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def _model(path: Path) -> Path:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((N, N), dtype=np.float32)
    b = rng.standard_normal((N,), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    return _save(graph, path)


@pytest.mark.parametrize("prepack", [True, False])
def test_an_attached_session_computes_with_the_attached_bytes(tmp_path: Path, prepack: bool) -> None:
    path = _model(tmp_path / "m.onnx")
    mapping = writable(path.read_bytes())
    attached = Weights(path, "onnx", attached=mapping).onnx_session(prepack=prepack)  # type: ignore[arg-type]
    from_file = Weights(path, "onnx").onnx_session(prepack=prepack)
    x = np.random.default_rng(4).standard_normal((5, N), dtype=np.float32)
    before = attached.run(["y"], {"x": x})[0]
    assert np.array_equal(before, from_file.run(["y"], {"x": x})[0])

    views = onnx_views(mapping.data, bytes(mapping.data))
    assert set(views) == {"W", "B"}
    reference = onnx.load(str(path))
    for t in reference.graph.initializer:
        assert np.array_equal(views[t.name], numpy_helper.to_array(t))
    # What ORT was given is the attached memory itself, by address...
    for name, value in attached.smss_initializers.items():
        assert value.data_ptr() == views[name].ctypes.data
    # ...and ORT reads it there: a change to the attached bytes changes the answer
    # (the bias is never pre-packed; without pre-packing, neither is the matrix).
    views["B"][...] += 1.0
    after = attached.run(["y"], {"x": x})[0]
    assert np.allclose(after, before + 1.0, atol=1e-5)
    views["W"][...] *= 2.0
    doubled = attached.run(["y"], {"x": x})[0]
    if not prepack:
        assert np.allclose(doubled - (before + 1.0), before - views["B"] + 1.0, atol=1e-4)
    else:  # its pre-packed copy was made from the weights as they were
        assert np.array_equal(doubled, after)
    assert np.array_equal(from_file.run(["y"], {"x": x})[0], before)


def test_tensors_that_cannot_be_viewed_stay_with_onnx_runtime(tmp_path: Path) -> None:
    """An initializer stored as a typed list (not raw bytes) is left to ORT's own copy."""
    w = np.arange(N * N, dtype=np.float32).reshape(N, N) / (N * N)
    typed = helper.make_tensor("W", TensorProto.FLOAT, [N, N], w.ravel().tolist())  # float_data, not raw
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
        [typed],
    )
    path = tmp_path / "typed.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    mapping = writable(path.read_bytes())
    assert onnx_views(mapping.data, bytes(mapping.data)) == {}
    session = Weights(path, "onnx", attached=mapping).onnx_session()  # type: ignore[arg-type]
    x = np.ones((1, N), np.float32)
    assert np.array_equal(
        session.run(["y"], {"x": x})[0], Weights(path, "onnx").onnx_session().run(["y"], {"x": x})[0]
    )


def _private_mb() -> float:
    """This process's private anonymous memory (RssAnon), after returning freed heap."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_an_attached_session_without_prepacking_holds_no_copy_of_the_weights(tmp_path: Path) -> None:
    """Measured as the growth of private memory, so every copy counts: ORT's parsed
    initializers and the model's bytes kept by ORT's Python wrapper included."""
    n = 2048  # one 16 MiB matrix
    w = np.random.default_rng(5).standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "W")],
    )
    path = _save(graph, tmp_path / "big.onnx")
    del graph
    x = np.ones((1, n), np.float32)
    expected = x @ w
    del w
    with path.open("rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # file-backed: not private
    attached = Segment(memoryview(mapping))
    before = _private_mb()
    session = Weights(path, "onnx", attached=attached).onnx_session(prepack=False)  # type: ignore[arg-type]
    y = session.run(["y"], {"x": x})[0]
    grown = _private_mb() - before
    assert np.allclose(y, expected, rtol=1e-4, atol=1e-3)
    assert grown < 8, f"private memory grew {grown:.1f} MB for 16 MB of weights"
