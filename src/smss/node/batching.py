"""Dynamic batching inside an instance.

Requests queue up; the batcher takes the first, waits at most ``batch_wait_ms``
for more (up to ``max_batch_size`` rows in all), concatenates compatible
requests on axis 0, runs one ``predict`` in the instance's compute thread, and
splits the outputs back. The wait is adaptive: it is paid only while recent
batches held more than one request, because under light load (one request at a
time) nobody else is coming and waiting would only add ``batch_wait_ms`` to
every request; as soon as requests start to queue, batches grow and waiting
pays for itself. A batch whose predict raises is re-run one request at
a time, so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smss import bytes_tensors
from smss.errors import InvalidInput, ModelError
from smss.spec import FunctionSpec

Predict = Callable[[dict[str, np.ndarray]], Mapping[str, object]]


@dataclass
class Pending:
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    future: asyncio.Future[dict[str, np.ndarray]] = field(repr=False)
    #: ``time.perf_counter()`` when its batch began, and that batch's seconds in predict.
    started: float = 0.0
    compute_s: float = 0.0

    @property
    def rows(self) -> int:
        first = next(iter(self.inputs.values()))
        return int(first.shape[0]) if first.ndim else 1

    def key(self) -> tuple[object, ...]:
        return tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(self.inputs.items()))


class ModelFailure(Exception):
    """predict() raised; carries the formatted traceback for the log."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.traceback = "".join(traceback.format_exception(error))


class Batcher:
    def __init__(self, spec: FunctionSpec, predict: Predict, executor: Executor) -> None:
        self._spec = spec
        self._predict = predict
        self._executor = executor
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._max_rows = spec.batching.max_batch_size
        self._wait_s = spec.batching.batch_wait_ms / 1000.0
        self._batching = self._max_rows > 1
        self._recent_requests = 1.0  # EWMA of requests per batch

    @property
    def should_wait(self) -> bool:
        return self._wait_s > 0 and self._recent_requests > 1.25

    def submit(self, pending: Pending) -> None:
        self._queue.put_nowait(pending)

    async def run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            if self._batching:
                await self._gather(batch)
            await self._execute(batch)

    async def _gather(self, batch: list[Pending]) -> None:
        rows = batch[0].rows
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        key = batch[0].key()
        while rows < self._max_rows:
            if self._queue.empty():
                if not self.should_wait:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if item.key() != key or rows + item.rows > self._max_rows:
                # Incompatible or too big: run what we have, keep this one for the next batch.
                self._queue.put_nowait(item)
                break
            batch.append(item)
            rows += item.rows
        self._recent_requests += 0.2 * (len(batch) - self._recent_requests)

    async def _execute(self, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        if len(live) == 1:
            await self._run_one(live[0], loop)
            return
        started = time.perf_counter()
        merged = {n: np.concatenate([p.inputs[n] for p in live]) for n in live[0].inputs}
        wanted = tuple(dict.fromkeys(o for p in live for o in p.outputs))
        try:
            outputs, seconds = await loop.run_in_executor(self._executor, self._call, merged, wanted)
        except (ModelFailure, InvalidInput):
            for p in live:
                await self._run_one(p, loop)
            return
        offset = 0
        for p in live:
            rows = p.rows
            part = {n: outputs[n][offset : offset + rows] for n in p.outputs}
            offset += rows
            p.started, p.compute_s = started, seconds
            if not p.future.done():
                p.future.set_result(part)

    async def _run_one(self, p: Pending, loop: asyncio.AbstractEventLoop) -> None:
        started = time.perf_counter()
        try:
            outputs, seconds = await loop.run_in_executor(self._executor, self._call, p.inputs, p.outputs)
        except (ModelFailure, InvalidInput) as e:
            if not p.future.done():
                p.future.set_exception(e)
            return
        p.started, p.compute_s = started, seconds
        if not p.future.done():
            p.future.set_result({n: outputs[n] for n in p.outputs})

    def _call(
        self, inputs: dict[str, np.ndarray], wanted: tuple[str, ...]
    ) -> tuple[dict[str, np.ndarray], float]:
        """The checked outputs of one predict, and its seconds (on the compute thread)."""
        rows = next(iter(inputs.values())).shape[0] if self._batching else None
        t0 = time.perf_counter()
        try:
            raw = self._predict(inputs)
        except InvalidInput:
            raise
        except Exception as e:
            raise ModelFailure(e) from e
        return self._check_outputs(raw, wanted, rows), time.perf_counter() - t0

    def _check_outputs(
        self, raw: Mapping[str, object], wanted: tuple[str, ...], rows: int | None
    ) -> dict[str, np.ndarray]:
        if not isinstance(raw, Mapping):
            raise ModelFailure(ModelError(f"predict() returned {type(raw).__name__}, not a dict"))
        out: dict[str, np.ndarray] = {}
        for name in wanted:
            decl = next((t for t in self._spec.outputs if t.name == name), None)
            if decl is None or name not in raw:
                raise ModelFailure(ModelError(f"predict() did not return output {name!r}"))
            value = raw[name]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            array = _as_declared(name, value, decl.datatype, decl.dtype)
            if not decl.accepts(array.shape) or (rows is not None and array.shape[0] != rows):
                raise ModelFailure(
                    ModelError(f"output {name!r} has shape {list(array.shape)}, declared {list(decl.shape)}")
                )
            out[name] = array
        return out


def _as_declared(name: str, value: object, datatype: str, dtype: np.dtype[Any]) -> np.ndarray:
    """An output as its declared datatype; a BYTES output may be a list or array of str or bytes."""
    if datatype == bytes_tensors.DATATYPE:
        try:
            return bytes_tensors.as_bytes_array(value, f"output {name!r}")
        except (TypeError, ValueError) as e:
            raise ModelFailure(ModelError(str(e))) from None
    return np.ascontiguousarray(np.asarray(value), dtype=dtype)
