"""``@smss.model``: declare a class with ``load(weights)`` / ``predict(inputs)`` as a function.

The decorator only records a :class:`~smss.spec.FunctionSpec` template on the
class (``cls.__smss_spec__``); nothing is loaded or started. ``smss deploy``
imports the file locally, reads the template, and sends it with the code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from smss.errors import InvalidSpec
from smss.spec import Batching, DeviceChoice, FunctionSpec, Resources, Runtime, Scaling, TensorSpec, parse_mib

TensorDecl = TensorSpec | tuple[str, Sequence[int]]
TensorDecls = Mapping[str, tuple[str, Sequence[int]]] | Iterable[TensorSpec]

C = TypeVar("C", bound=type)

SPEC_ATTR = "__smss_spec__"


class Model(Protocol):
    """What a model class provides. ``weights`` is a :class:`smss.Weights` (or
    ``None`` for a model deployed without weights)."""

    def load(self, weights: Any) -> None: ...

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]: ...


def _tensors(decls: TensorDecls, what: str) -> tuple[TensorSpec, ...]:
    if isinstance(decls, Mapping):
        out = []
        for name, decl in decls.items():
            try:
                datatype, shape = decl
                out.append(TensorSpec(str(name), str(datatype), tuple(int(d) for d in shape)))
            except (TypeError, ValueError):
                raise InvalidSpec(
                    f"{what} {name!r}: declare as (datatype, shape), e.g. ('FP32', [-1, 64])"
                ) from None
        return tuple(out)
    return tuple(decls)


def model(
    *,
    name: str,
    inputs: TensorDecls,
    outputs: TensorDecls,
    runtime: Runtime = "python",
    version: str = "1",
    max_batch_size: int = 1,
    batch_wait_ms: float = 0.0,
    min_instances: int = 0,
    max_instances: int = 4,
    concurrency: int = 8,
    keep_alive_s: float | None = None,
    cpu: float = 1.0,
    memory: int | str = 1024,
    device: DeviceChoice = "auto",
    gpu: float = 0.0,
    gpu_memory: int | str = 0,
    idempotent: bool = True,
) -> Callable[[C], C]:
    """Mark a class as an SMSS model. ``memory`` and ``gpu_memory`` are MiB as an int,
    or sizes such as ``"2GiB"``. ``device``: ``"cuda"``, ``"cpu"`` or ``"auto"`` (cuda
    when ``gpu`` or ``gpu_memory`` is declared, else cpu); ``gpu`` is a fraction of one
    GPU; ``gpu_memory`` what one instance needs on it besides the model's weights,
    which all instances on a GPU share (see :class:`smss.Resources`).

    Example::

        @smss.model(name="mlp", inputs={"x": ("FP32", [-1, 64])},
                    outputs={"y": ("FP32", [-1, 10])}, runtime="torch", max_batch_size=32)
        class MLP:
            def load(self, weights): ...
            def predict(self, inputs): return {"y": ...}
    """
    spec = FunctionSpec(
        name=name,
        version=version,
        inputs=_tensors(inputs, "input"),
        outputs=_tensors(outputs, "output"),
        entrypoint="model.py:Model",  # replaced at deploy time
        runtime=runtime,
        batching=Batching(max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms),
        scaling=Scaling(
            min_instances=min_instances,
            max_instances=max_instances,
            concurrency=concurrency,
            keep_alive_s=keep_alive_s,
        ),
        resources=Resources(
            cpu=cpu,
            memory_mb=parse_mib(memory, "memory"),
            gpu=gpu,
            gpu_memory_mb=parse_mib(gpu_memory, "gpu_memory"),
            device=device,
        ),
        idempotent=idempotent,
    ).validate()

    def mark(cls: C) -> C:
        for method in ("load", "predict"):
            if not callable(getattr(cls, method, None)):
                raise InvalidSpec(f"model class {cls.__name__} needs a {method}() method")
        setattr(cls, SPEC_ATTR, spec)
        return cls

    return mark


def spec_of(cls: type) -> FunctionSpec:
    spec = getattr(cls, SPEC_ATTR, None)
    if not isinstance(spec, FunctionSpec):
        raise InvalidSpec(f"{cls.__name__} is not decorated with @smss.model")
    return spec
