"""Cost: metered usage priced, next to always-on containers sized for the peak.

Pure, except :func:`load_prices`, which reads the one file it is given.

:func:`report` turns the :class:`~smss.control.metering.FunctionUsage` of each function
into money with a :class:`PriceTable`:

* **serverless** ``cost_usd`` = cpu_s x per-vCPU-second + memory_gb_s x per-GB-second
  + gpu_s x per-GPU-second + invocations / 10^6 x per-million-requests. Every second
  an instance is alive is paid, busy or idle, as on Fargate or Cloud Run with
  instance-based billing; the per-request charge is Lambda's.
* **always-on containers** ``container_cost_usd``: for the same period, each function
  runs ``ceil(peak_concurrency / concurrency)`` containers all the time, each sized
  like one of its instances (declared cpu / memory / GPU), priced per second at the
  same resource prices, with no per-request charge. A function never invoked needs no
  container (``ceil(0) = 0``). This is the "provision for the peak" baseline of the
  cost analyses of serverless serving (e.g. "Beyond Containers", 2025).
* **standby** ``standby_usd``: what the function held resident besides instances
  (template, spare, weights: ``standby_gb_s``) at the per-GB-second price, and the CPU
  spent keeping it ready (``standby_cpu_s``) at the per-vCPU-second price. It is part
  of ``cost_usd``: being ready is paid for;
* **overhead** ``overhead_usd``: the runtimes' zygotes and the platform's own processes
  (``overhead_gb_s`` of :meth:`~smss.control.metering.Meter.overhead`), at the
  per-GB-second price, shared among the functions in proportion to their ``cost_usd``
  (equally when all are 0). It is not in ``cost_usd``; ``cost_with_overhead_usd`` and
  ``cost_ratio_with_overhead`` add it;
* ``cost_ratio`` = cost_usd / container_cost_usd (``None`` when the baseline is 0).

The container size comes from the function's spec (resources, ``scaling.concurrency``)
or a :class:`ContainerSize`. A metered function with neither (deleted since) is sized
by its latest instance's resources with one container: the cheapest baseline, so the
ratio errs against serverless.

Prices load from an optional TOML file (:func:`load_prices`) whose keys are the fields
of :class:`PriceTable`; keys left out keep their defaults.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path

import msgspec

from smss.control.metering import FunctionUsage
from smss.errors import InvalidSpec
from smss.spec import FunctionSpec, Resources

_HOUR = 3600.0


class PriceTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Prices in US dollars. Defaults are public on-demand list prices (us-east-1 /
    us-central1, Linux x86, as published in 2024-2025):"""

    #: AWS Fargate, Linux/x86, us-east-1: $0.004445 per GB-hour.
    usd_per_gb_second: float = 0.004445 / _HOUR
    #: AWS Fargate, Linux/x86, us-east-1: $0.04048 per vCPU-hour.
    usd_per_vcpu_second: float = 0.04048 / _HOUR
    #: Google Cloud Run, NVIDIA L4, tier-1 region without zonal redundancy:
    #: $0.0001867 per GPU-second (about $0.67 an hour).
    usd_per_gpu_second: float = 0.0001867
    #: AWS Lambda: $0.20 per million requests.
    usd_per_million_requests: float = 0.20

    def check(self) -> PriceTable:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidSpec(f"price {name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidSpec(f"price {name} must be a finite number >= 0, got {value!r}")
        return self


def load_prices(path: Path | None) -> PriceTable:
    """The default prices, overridden by the keys of the TOML file at ``path`` if given.
    An unreadable file is an :class:`InvalidSpec` naming it; see :func:`parse_prices`."""
    if path is None:
        return PriceTable()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"price table {path}: cannot read it ({e})") from None
    return parse_prices(text, str(path))


def parse_prices(text: str, source: str = "<prices>") -> PriceTable:
    """The default prices overridden by the top-level keys of the TOML ``text``. Bad
    TOML, an unknown key, or a price that is not a finite number >= 0 is an
    :class:`InvalidSpec` naming ``source``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidSpec(f"price table {source}: not valid TOML ({e})") from None
    known = PriceTable.__struct_fields__
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidSpec(f"price table {source}: unknown keys {unknown}; known keys are {list(known)}")
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidSpec(f"price table {source}: {key} must be a number, got {value!r}")
    try:
        return PriceTable(**{k: float(v) for k, v in data.items()}).check()
    except InvalidSpec as e:
        raise InvalidSpec(f"price table {source}: {e.message}") from None


class ContainerSize(msgspec.Struct, frozen=True):
    """One always-on container: the resources of one instance and how many requests
    it serves at once."""

    resources: Resources = Resources()
    concurrency: int = 1

    def usd_per_second(self, prices: PriceTable) -> float:
        """What one such container costs a second, at ``prices``."""
        r = self.resources
        return (
            r.cpu * prices.usd_per_vcpu_second
            + r.memory_mb / 1024 * prices.usd_per_gb_second
            + r.gpu * prices.usd_per_gpu_second
        )


def container_size(spec: FunctionSpec) -> ContainerSize:
    return ContainerSize(spec.resources, spec.scaling.concurrency)


class FunctionCost(msgspec.Struct, frozen=True):
    """One function's usage, its serverless cost (with the share of each price) and
    the cost of ``containers`` always-on containers over the period."""

    invocations: int
    alive_s: float
    busy_s: float
    cpu_s: float
    memory_gb_s: float
    gpu_s: float
    peak_concurrency: int
    containers: int
    cpu_usd: float
    memory_usd: float
    gpu_usd: float
    request_usd: float
    cost_usd: float
    container_cost_usd: float
    cost_ratio: float | None
    #: The instances' share of ``cost_usd`` (cpu + memory + GPU of instances).
    instance_usd: float = 0.0
    standby_gb_s: float = 0.0
    standby_cpu_s: float = 0.0
    standby_usd: float = 0.0
    #: Its share of the runtimes' and the platform's GB-seconds, and their price.
    overhead_gb_s: float = 0.0
    overhead_usd: float = 0.0
    cost_with_overhead_usd: float = 0.0
    cost_ratio_with_overhead: float | None = None


class CostTotal(msgspec.Struct, frozen=True):
    invocations: int
    alive_s: float
    busy_s: float
    cpu_s: float
    memory_gb_s: float
    gpu_s: float
    containers: int
    cost_usd: float
    container_cost_usd: float
    cost_ratio: float | None
    instance_usd: float = 0.0
    standby_gb_s: float = 0.0
    standby_cpu_s: float = 0.0
    standby_usd: float = 0.0
    overhead_gb_s: float = 0.0
    overhead_usd: float = 0.0
    cost_with_overhead_usd: float = 0.0
    cost_ratio_with_overhead: float | None = None


class CostReport(msgspec.Struct, frozen=True):
    period_s: float
    prices: PriceTable
    functions: dict[str, FunctionCost]
    total: CostTotal
    #: GB-seconds of each overhead owner (``runtime:NAME``, ``platform``).
    overhead: dict[str, float] = msgspec.field(default_factory=dict)

    def to_builtins(self) -> dict[str, object]:
        out: dict[str, object] = msgspec.to_builtins(self)
        return out


def _ratio(cost: float, baseline: float) -> float | None:
    return cost / baseline if baseline > 0 else None


def function_cost(
    usage: FunctionUsage,
    prices: PriceTable,
    period_s: float,
    size: ContainerSize | None,
    overhead_gb_s: float = 0.0,
) -> FunctionCost:
    """The cost of one function; ``size=None``: one container like its latest instance;
    ``overhead_gb_s``: its share of the overhead."""
    if size is None:
        size = ContainerSize(usage.resources, max(usage.peak_concurrency, 1))
    cpu_usd = usage.cpu_s * prices.usd_per_vcpu_second
    memory_usd = usage.memory_gb_s * prices.usd_per_gb_second
    gpu_usd = usage.gpu_s * prices.usd_per_gpu_second
    request_usd = usage.invocations / 1e6 * prices.usd_per_million_requests
    standby_usd = (
        usage.standby_gb_s * prices.usd_per_gb_second + usage.standby_cpu_s * prices.usd_per_vcpu_second
    )
    cost = cpu_usd + memory_usd + gpu_usd + request_usd + standby_usd
    containers = math.ceil(usage.peak_concurrency / max(size.concurrency, 1))
    container_cost = containers * period_s * size.usd_per_second(prices)
    overhead_usd = overhead_gb_s * prices.usd_per_gb_second
    return FunctionCost(
        invocations=usage.invocations,
        alive_s=usage.alive_s,
        busy_s=usage.busy_s,
        cpu_s=usage.cpu_s,
        memory_gb_s=usage.memory_gb_s,
        gpu_s=usage.gpu_s,
        peak_concurrency=usage.peak_concurrency,
        containers=containers,
        cpu_usd=cpu_usd,
        memory_usd=memory_usd,
        gpu_usd=gpu_usd,
        request_usd=request_usd,
        cost_usd=cost,
        container_cost_usd=container_cost,
        cost_ratio=_ratio(cost, container_cost),
        instance_usd=cpu_usd + memory_usd + gpu_usd,
        standby_gb_s=usage.standby_gb_s,
        standby_cpu_s=usage.standby_cpu_s,
        standby_usd=standby_usd,
        overhead_gb_s=overhead_gb_s,
        overhead_usd=overhead_usd,
        cost_with_overhead_usd=cost + overhead_usd,
        cost_ratio_with_overhead=_ratio(cost + overhead_usd, container_cost),
    )


def _shares(costs: Mapping[str, float]) -> dict[str, float]:
    """Each function's share of the overhead: in proportion to its cost (equal when none)."""
    total = sum(costs.values())
    if total > 0:
        return {name: c / total for name, c in costs.items()}
    return {name: 1.0 / len(costs) for name in costs} if costs else {}


def report(
    usage: Mapping[str, FunctionUsage],
    prices: PriceTable,
    period_s: float,
    specs: Mapping[str, FunctionSpec | ContainerSize],
    overhead_gb_s: Mapping[str, float] | None = None,
) -> CostReport:
    """Cost per function and in total over ``period_s`` seconds (the metered period,
    which is also how long the always-on containers would have run); ``overhead_gb_s``:
    the GB-seconds of the runtimes and the platform, shared among the functions."""
    if not math.isfinite(period_s) or period_s < 0:
        raise InvalidSpec(f"cost report period must be a finite number of seconds >= 0, got {period_s}")
    overhead = sum((overhead_gb_s or {}).values())
    functions: dict[str, FunctionCost] = {}
    for name in sorted(usage):
        spec = specs.get(name)
        size = container_size(spec) if isinstance(spec, FunctionSpec) else spec
        functions[name] = function_cost(usage[name], prices, period_s, size)
    if overhead > 0:
        shares = _shares({name: f.cost_usd for name, f in functions.items()})
        for name in functions:
            spec = specs.get(name)
            size = container_size(spec) if isinstance(spec, FunctionSpec) else spec
            functions[name] = function_cost(usage[name], prices, period_s, size, overhead * shares[name])
    fc = functions.values()
    cost = sum(f.cost_usd for f in fc)
    container_cost = sum(f.container_cost_usd for f in fc)
    overhead_usd = overhead * prices.usd_per_gb_second
    total = CostTotal(
        invocations=sum(f.invocations for f in fc),
        alive_s=sum(f.alive_s for f in fc),
        busy_s=sum(f.busy_s for f in fc),
        cpu_s=sum(f.cpu_s for f in fc),
        memory_gb_s=sum(f.memory_gb_s for f in fc),
        gpu_s=sum(f.gpu_s for f in fc),
        containers=sum(f.containers for f in fc),
        cost_usd=cost,
        container_cost_usd=container_cost,
        cost_ratio=_ratio(cost, container_cost),
        instance_usd=sum(f.instance_usd for f in fc),
        standby_gb_s=sum(f.standby_gb_s for f in fc),
        standby_cpu_s=sum(f.standby_cpu_s for f in fc),
        standby_usd=sum(f.standby_usd for f in fc),
        overhead_gb_s=overhead,
        overhead_usd=overhead_usd,
        cost_with_overhead_usd=cost + overhead_usd,
        cost_ratio_with_overhead=_ratio(cost + overhead_usd, container_cost),
    )
    return CostReport(
        period_s=period_s, prices=prices, functions=functions, total=total, overhead=dict(overhead_gb_s or {})
    )
