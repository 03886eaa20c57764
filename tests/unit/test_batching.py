"""Dynamic batching with a pure-numpy predict: merging, splitting, isolation of failures.

Requests are submitted before the batcher runs, so each batch is whatever is
queued (no waiting on the wall clock): batch composition is deterministic.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.errors import InvalidInput
from smss.node.batching import Batcher, ModelFailure, Pending
from smss.spec import Batching, FunctionSpec, TensorSpec

Predict = Callable[[dict[str, np.ndarray]], Mapping[str, object]]


def make_spec(max_batch_size: int) -> FunctionSpec:
    return FunctionSpec(
        name="m",
        inputs=(TensorSpec("x", "FP32", (-1, -1)),),
        outputs=(TensorSpec("y", "FP32", (-1, -1)),),
        entrypoint="model.py:Model",
        batching=Batching(max_batch_size=max_batch_size),
    ).validate()


class Model:
    """``y = 2x + 1`` row by row; records the inputs of every predict call."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> Mapping[str, object]:
        x = inputs["x"]
        with self._lock:
            self.calls.append(x.copy())
        if (x < 0).any():
            raise ValueError("negative input")
        return {"y": x * 2 + 1}

    @property
    def sizes(self) -> list[int]:
        return [c.shape[0] for c in self.calls]


def request(rows: int, cols: int = 3, start: float = 0.0, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {"x": (start + np.arange(rows * cols, dtype=dtype)).reshape(rows, cols)}


def serve(
    predict: Predict, max_batch_size: int, requests: Sequence[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray] | BaseException]:
    """Queue every request, run the batcher until all are answered, stop it."""

    async def main() -> list[dict[str, np.ndarray] | BaseException]:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = Batcher(make_spec(max_batch_size), predict, executor)
            loop = asyncio.get_running_loop()
            pending = [Pending(inputs, ("y",), loop.create_future()) for inputs in requests]
            for p in pending:
                batcher.submit(p)
            task = asyncio.create_task(batcher.run())
            try:
                return await asyncio.wait_for(
                    asyncio.gather(*(p.future for p in pending), return_exceptions=True), 10.0
                )
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def ok(result: dict[str, np.ndarray] | BaseException) -> dict[str, np.ndarray]:
    assert isinstance(result, dict), result
    return result


def test_outputs_split_back_per_request_for_mixed_row_counts() -> None:
    rows = [1, 3, 2, 5, 1]
    reqs = [request(r, start=100.0 * i) for i, r in enumerate(rows)]
    model = Model()
    results = serve(model, 16, reqs)
    assert model.sizes == [sum(rows)]  # one predict for the lot
    for inputs, result in zip(reqs, results, strict=True):
        y = ok(result)["y"]
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, inputs["x"] * 2 + 1)


@settings(max_examples=30, deadline=None)
@given(max_batch=st.integers(1, 8), data=st.data())
def test_max_batch_size_respected_and_every_request_answered(max_batch: int, data: st.DataObject) -> None:
    rows = data.draw(st.lists(st.integers(1, max_batch), min_size=1, max_size=12))
    reqs = [request(r, cols=2, start=1000.0 * i) for i, r in enumerate(rows)]
    model = Model()
    results = serve(model, max_batch, reqs)
    for inputs, result in zip(reqs, results, strict=True):
        np.testing.assert_array_equal(ok(result)["y"], inputs["x"] * 2 + 1)
    assert all(size <= max_batch for size in model.sizes)
    assert sum(model.sizes) == sum(rows)  # every row predicted exactly once


def test_a_request_bigger_than_the_batch_runs_alone() -> None:
    model = Model()
    results = serve(model, 4, [request(1), request(6, start=10.0), request(1, start=90.0)])
    assert all(isinstance(r, dict) for r in results)
    assert model.sizes.count(6) == 1  # alone: nothing merged with it
    assert sum(model.sizes) == 8


def test_batches_fill_up_to_max_batch_size() -> None:
    model = Model()
    results = serve(model, 4, [request(r, start=10.0 * i) for i, r in enumerate([1, 2, 1, 3, 1, 1])])
    assert all(isinstance(r, dict) for r in results)
    assert all(size <= 4 for size in model.sizes)
    assert model.sizes[0] == 4  # 1 + 2 + 1 merged at once
    assert sum(model.sizes) == 9


def test_without_batching_every_request_runs_alone() -> None:
    model = Model()
    results = serve(model, 1, [request(2, start=10.0 * i) for i in range(4)])
    assert all(isinstance(r, dict) for r in results)
    assert model.sizes == [2, 2, 2, 2]


def test_incompatible_shapes_are_not_merged() -> None:
    reqs = [request(2, cols=3), request(2, cols=4, start=50.0), request(1, cols=3, start=90.0)]
    model = Model()
    results = serve(model, 16, reqs)
    for inputs, result in zip(reqs, results, strict=True):
        np.testing.assert_array_equal(ok(result)["y"], inputs["x"] * 2 + 1)
    shapes = [c.shape for c in model.calls]
    assert (2, 4) in shapes  # the odd one out ran on its own
    assert sum(rows for rows, cols in shapes if cols == 3) == 3


def test_different_dtypes_are_not_merged() -> None:
    reqs = [request(2, dtype=np.float32), request(1, dtype=np.float64, start=7.0)]
    model = Model()
    results = serve(model, 16, reqs)
    assert [c.dtype for c in model.calls] == [np.float32, np.float64]
    for inputs, result in zip(reqs, results, strict=True):
        np.testing.assert_array_equal(ok(result)["y"], (inputs["x"] * 2 + 1).astype(np.float32))


def test_one_bad_request_fails_alone() -> None:
    reqs = [request(2, start=1.0), request(1, start=-5.0), request(3, start=20.0)]
    model = Model()
    results = serve(model, 16, reqs)
    np.testing.assert_array_equal(ok(results[0])["y"], reqs[0]["x"] * 2 + 1)
    np.testing.assert_array_equal(ok(results[2])["y"], reqs[2]["x"] * 2 + 1)
    assert isinstance(results[1], ModelFailure)
    assert "ValueError: negative input" in str(results[1])
    assert "negative input" in results[1].traceback
    # The merged batch failed, then each request was re-run on its own.
    assert model.sizes == [6, 2, 1, 3]


@pytest.mark.parametrize(
    ("bad_output", "why"),
    [
        (lambda x: {"y": np.zeros((x.shape[0] + 1, x.shape[1]), np.float32)}, "too many rows"),
        (lambda x: {"y": np.zeros(x.shape[0], np.float32)}, "wrong rank"),
        (lambda x: {"z": x}, "missing output"),
        (lambda x: [x], "not a dict"),
    ],
)
@pytest.mark.parametrize("rows", [[2], [2, 3]])
def test_wrong_output_from_predict_is_a_model_failure(
    bad_output: Callable[[np.ndarray], object], why: str, rows: list[int]
) -> None:
    results = serve(lambda inputs: bad_output(inputs["x"]), 8, [request(r) for r in rows])  # type: ignore[arg-type,return-value]
    assert all(isinstance(r, ModelFailure) for r in results), why


def test_predict_rejecting_its_input_is_invalid_input() -> None:
    def predict(inputs: dict[str, np.ndarray]) -> Mapping[str, object]:
        raise InvalidInput("x must be positive")

    (result,) = serve(predict, 1, [request(1)])
    assert isinstance(result, InvalidInput)


# ---------------------------------------------------------------------------- BYTES


def bytes_spec() -> FunctionSpec:
    return FunctionSpec(
        name="s",
        inputs=(TensorSpec("text", "BYTES", (-1,)),),
        outputs=(TensorSpec("upper", "BYTES", (-1,)),),
        entrypoint="model.py:Model",
        batching=Batching(max_batch_size=8),
    ).validate()


def strings(*values: bytes) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


Results = list[dict[str, np.ndarray] | BaseException]


def serve_bytes(predict: Predict, requests: Sequence[np.ndarray]) -> Results:
    async def main() -> Results:
        with ThreadPoolExecutor(max_workers=1) as executor:
            batcher = Batcher(bytes_spec(), predict, executor)
            loop = asyncio.get_running_loop()
            pending = [Pending({"text": t}, ("upper",), loop.create_future()) for t in requests]
            for p in pending:
                batcher.submit(p)
            task = asyncio.create_task(batcher.run())
            try:
                return await asyncio.wait_for(
                    asyncio.gather(*(p.future for p in pending), return_exceptions=True), 10.0
                )
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    return asyncio.run(main())


def test_bytes_requests_batch_and_str_outputs_come_back_as_bytes() -> None:
    seen: list[np.ndarray] = []

    def upper(inputs: dict[str, np.ndarray]) -> Mapping[str, object]:
        seen.append(inputs["text"])
        return {"upper": [t.decode().upper() for t in inputs["text"]]}  # str, not bytes

    results = serve_bytes(upper, [strings(b"a", b"bc"), strings("\u00e9".encode()), strings(b"")])
    assert [ok(r)["upper"].tolist() for r in results] == [[b"A", b"BC"], ["\u00c9".encode()], [b""]]
    assert all(ok(r)["upper"].dtype == object for r in results)
    assert all(a.dtype == object and all(type(t) is bytes for t in a) for a in seen)


def test_a_bytes_output_of_numbers_is_a_model_failure() -> None:
    (result,) = serve_bytes(lambda inputs: {"upper": np.arange(len(inputs["text"]))}, [strings(b"a")])
    assert isinstance(result, ModelFailure)
    assert "'upper'" in str(result)
