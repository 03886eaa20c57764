"""Placement: on which node and device a new instance goes. Pure, no I/O.

:class:`ClusterState` holds the nodes' devices (their :class:`~smss.inventory.NodeInventory`)
and everything placed on them (:class:`~smss.inventory.Allocation`: instances, starts
in progress, and what is kept resident for a function: weight segments, templates,
spares). The controller builds one from what it observes; the simulator keeps one for
its virtual cluster; both ask the same :meth:`ClusterState.place`.

Rules of :meth:`ClusterState.place`:

* **Never over-commit.** An instance goes on a node whose CPU device has the free
  ``cpu`` and ``memory_mb`` it declares and, when it declares ``gpu`` or
  ``gpu_memory_mb``, on one CUDA device of that node with that much free. Free is
  capacity less every allocation, resident ones included.
* **Locality first.** Among the devices it fits on, the one with the highest
  locality rank wins (the caller ranks where the model's weights already are:
  a template beside them ranks above weights alone, above nothing). For a GPU need
  the GPU's own rank comes first (a GPU holding the model's weights beats one that
  does not, whatever its node's host memory holds), then its node's host rank.
* **Then best fit.** Among equals, the device left with the least free capacity
  (summed over the declared resources, each as a fraction of the device's
  capacity), so large holes stay for large instances; ties go to the node named
  first.
* **Make room when full.** When it fits nowhere now, but would on some node once
  *evictable* allocations of other functions are gone (idle instances above their
  function's ``min_instances``, resident items of functions with no instance: the
  caller says which), the node needing the fewest evictions is chosen, longest
  idle evicted first; the placement names them and the caller stops them first.
* **Refuse what can never fit.** When no node's capacity could hold the need even
  empty, the answer is a :class:`NoFit` with ``never=True`` naming the resource;
  a deploy is refused with it. Otherwise a ``NoFit`` means "not now": the start
  waits and is retried when capacity frees.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from smss.inventory import RESOURCES, Allocation, Capacity, Device, DeviceReport, NodeInventory
from smss.spec import Resources

#: A very large capacity: the simulator's default node, which nothing fills.
UNBOUNDED = Capacity(cpu=math.inf, memory_mb=1 << 62, gpu=math.inf, gpu_memory_mb=1 << 62)
NOTHING = Capacity()
_EPS = 1e-9

#: (node, CUDA index or None for the node's host memory) -> rank; higher is nearer.
Locality = Mapping[tuple[str, int | None], int]
#: For an allocation placement may evict: since when it is idle; None: not evictable.
Evictable = Callable[[Allocation], float | None]
#: A device of the cluster: (node, kind, index).
DeviceKey = tuple[str, str, int]

RESOURCE_WORDS = {
    "cpu": "cpu cores",
    "memory_mb": "MiB of memory",
    "gpu": "GPU",
    "gpu_memory_mb": "MiB of GPU memory",
}


def need_of(resources: Resources) -> Capacity:
    return Capacity(resources.cpu, resources.memory_mb, resources.gpu, resources.gpu_memory_mb)


def host_part(need: Capacity) -> Capacity:
    return Capacity(cpu=need.cpu, memory_mb=need.memory_mb)


def gpu_part(need: Capacity) -> Capacity:
    return Capacity(gpu=need.gpu, gpu_memory_mb=need.gpu_memory_mb)


def wants_gpu(need: Capacity) -> bool:
    return need.gpu > 0 or need.gpu_memory_mb > 0


def gpu_need(need: Capacity, device: Device) -> Capacity:
    """What an instance takes of GPU ``device``: its ``gpu`` fraction and its
    ``gpu_memory_mb``, or, when it declares a fraction only, that fraction of the
    device's memory (the memory share its process is capped to)."""
    memory = need.gpu_memory_mb
    if memory <= 0 < need.gpu:
        memory = math.ceil(need.gpu * device.capacity.gpu_memory_mb)
    return Capacity(gpu=need.gpu, gpu_memory_mb=memory)


@dataclass(frozen=True, slots=True)
class _Ask:
    """One placement question: ``need``, and the model's ``weights`` (one copy per
    GPU), charged on a GPU whose own locality rank is 0 (it does not hold them)."""

    need: Capacity
    weights: Capacity
    locality: Locality

    def on(self, node: str, device: Device) -> Capacity:
        """Everything the instance needs of ``device`` (node ``node``) if it goes there."""
        share = gpu_need(self.need, device)
        if self.locality.get((node, device.index), 0) <= 0:
            share = share + gpu_part(self.weights)
        return share


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an instance goes: ``node``, the CUDA device ``gpu_index`` (None: CPU
    only), and the allocations to stop first to make room (``evict``)."""

    node: str
    gpu_index: int | None = None
    evict: tuple[str, ...] = ()
    #: The instance's own share of that GPU (:func:`gpu_need`; its weights are not in it).
    gpu_share: Capacity | None = None

    def allocation(self, alloc_id: str, function: str, need: Capacity) -> Allocation:
        gpu = Capacity()
        if self.gpu_index is not None:
            gpu = self.gpu_share if self.gpu_share is not None else gpu_part(need)
        return Allocation(alloc_id, function, "instance", self.node, host_part(need), gpu, self.gpu_index)


@dataclass(frozen=True, slots=True)
class NoFit:
    """The need fits nowhere: ``never`` when no node could hold it even empty.
    ``resource`` is the one that does not fit, ``needed`` the amount asked and
    ``largest`` the most any device offers (its capacity if ``never``, else its
    free amount)."""

    resource: str
    needed: float
    largest: float
    never: bool

    def message(self, function: str) -> str:
        word = RESOURCE_WORDS.get(self.resource, self.resource)
        if self.never:
            return (
                f"model {function!r} needs {_num(self.needed)} {word} ({self.resource}) but the "
                f"largest device of any node has {_num(self.largest)}"
            )
        return (
            f"model {function!r} is waiting for capacity: it needs {_num(self.needed)} {word} "
            f"({self.resource}) and at most {_num(self.largest)} is free on any node"
        )


def _num(x: float) -> str:
    return f"{x:g}" if math.isfinite(x) else "unbounded"


class ClusterState:
    """The nodes, their devices and what is allocated on each, kept as running sums
    (adding or removing an allocation is O(1), placing one O(nodes x devices))."""

    def __init__(self, inventories: Iterable[NodeInventory], allocations: Iterable[Allocation] = ()) -> None:
        self._nodes: dict[str, NodeInventory] = {inv.node: inv for inv in inventories}
        self._used: dict[DeviceKey, Capacity] = {}
        self._allocs: dict[str, Allocation] = {}
        for inv in self._nodes.values():
            for d in inv.devices:
                self._used[(inv.node, d.kind, d.index)] = Capacity()
        for a in allocations:
            self.add(a)

    @classmethod
    def unbounded(cls, node: str = "sim") -> ClusterState:
        """One node that nothing fills (the simulator without cluster flags)."""
        return cls([NodeInventory(node, (Device("cpu", 0, "unbounded", UNBOUNDED, UNBOUNDED),))])

    @classmethod
    def uniform(cls, nodes: int, cpus: float, memory_mb: int, prefix: str = "node") -> ClusterState:
        cap = Capacity(cpu=cpus, memory_mb=memory_mb)
        return cls(NodeInventory(f"{prefix}-{k}", (Device("cpu", 0, "cpu", cap, cap),)) for k in range(nodes))

    # ------------------------------------------------------------ bookkeeping

    @property
    def nodes(self) -> list[NodeInventory]:
        return list(self._nodes.values())

    def allocations(self) -> list[Allocation]:
        return list(self._allocs.values())

    def get(self, alloc_id: str) -> Allocation | None:
        return self._allocs.get(alloc_id)

    def __contains__(self, alloc_id: str) -> bool:
        return alloc_id in self._allocs

    def add(self, a: Allocation) -> None:
        """Record an allocation (replacing one of the same id). One on a node or
        device this state does not know is kept and reported, but uses nothing."""
        self.remove(a.id)
        self._allocs[a.id] = a
        _charge(self._used, a, 1, known_only=True)

    def remove(self, alloc_id: str) -> Allocation | None:
        a = self._allocs.pop(alloc_id, None)
        if a is not None:
            _charge(self._used, a, -1, known_only=True)
        return a

    def used(self, node: str, kind: str = "cpu", index: int = 0) -> Capacity:
        return self._used.get((node, kind, index), Capacity())

    def free(self, node: str, kind: str = "cpu", index: int = 0) -> Capacity:
        inv = self._nodes.get(node)
        dev = inv.device("cpu" if kind == "cpu" else "cuda", index) if inv else None
        if dev is None:
            return Capacity()
        return dev.capacity - self.used(node, kind, index)

    def reports(self) -> list[DeviceReport]:
        by_device: dict[DeviceKey, list[Allocation]] = {}
        for a in self._allocs.values():
            for key, _ in _holdings(a):
                by_device.setdefault(key, []).append(a)
        out: list[DeviceReport] = []
        for inv in self._nodes.values():
            for d in inv.devices:
                key = (inv.node, d.kind, d.index)
                out.append(
                    DeviceReport(
                        inv.node,
                        d.kind,
                        d.index,
                        d.name,
                        d.capacity,
                        d.total,
                        d.reserved,
                        self._used[key],
                        tuple(by_device.get(key, ())),
                        d.free_memory_mb,
                    )
                )
        return out

    # ------------------------------------------------------------ placement

    def never_fits(self, need: Capacity, weights: Capacity = NOTHING) -> NoFit | None:
        """A :class:`NoFit` (``never``) when no node could hold ``need`` even empty
        (with ``weights``, the model's one copy, on the GPU too)."""
        best: NoFit | None = None
        for inv in self._nodes.values():
            miss = _first_short(inv.cpu.capacity, host_part(need))
            wanted = need
            if miss is None and wants_gpu(need):
                gpus = [d for d in inv.devices if d.kind == "cuda"]
                asks = [gpu_need(need, g) + gpu_part(weights) for g in gpus]
                misses = [(_first_short(g.capacity, a), a) for g, a in zip(gpus, asks, strict=True)]
                if not gpus:
                    miss = ("gpu" if need.gpu > 0 else "gpu_memory_mb", 0.0)
                    wanted = need
                elif all(m is not None for m, _ in misses):
                    (miss, wanted) = max(((m, a) for m, a in misses if m is not None), key=lambda m: m[0][1])
            if miss is None:
                return None
            resource, have = miss
            if best is None or (resource == best.resource and have > best.largest):
                best = NoFit(resource, wanted.get(resource), have, never=True)
        if best is None:
            return NoFit("cpu", need.cpu, 0.0, never=True)  # a cluster without nodes
        return best

    def place(
        self,
        function: str,
        need: Capacity,
        locality: Locality | None = None,
        *,
        pending: Sequence[Allocation] = (),
        exclude: frozenset[str] | set[str] = frozenset(),
        evictable: Evictable | None = None,
        weights: Capacity = NOTHING,
    ) -> Placement | NoFit:
        """Where an instance of ``function`` needing ``need`` goes. ``pending``:
        allocations decided but not yet recorded (earlier starts of this reconcile);
        ``exclude``: allocations about to go (stops of this reconcile); ``weights``:
        the one copy of the model's weights a GPU holds for all its instances there
        (its ``gpu_memory_mb``), needed besides ``need`` on a GPU whose locality rank
        says it does not hold them yet."""
        locality = locality or {}
        never = self.never_fits(need, weights)
        if never is not None:
            return never
        ask = _Ask(need, weights, locality)
        adjust = self._adjustments(pending, exclude)
        best: tuple[tuple[float, float, float, int], Placement] | None = None
        order = 0
        short: dict[str, float] = {}
        for inv in self._nodes.values():
            fits, misses = self._fits(inv, ask, adjust)
            for resource, have in misses.items():
                short[resource] = max(short.get(resource, -math.inf), have)
            for gpu_index, leftover in fits:
                gpu_rank, host_rank = _rank(locality, inv.node, gpu_index)
                key = (-float(gpu_rank), -float(host_rank), leftover, order)
                order += 1
                if best is None or key < best[0]:
                    best = (key, self._placement(inv, gpu_index, need))
        if best is not None:
            return best[1]
        if evictable is not None:
            made = self._make_room(function, ask, adjust, exclude, evictable)
            if made is not None:
                return made
        resource = next((r for r in RESOURCES if r in short), "cpu")
        return NoFit(resource, need.get(resource), max(0.0, short.get(resource, 0.0)), never=False)

    def _placement(
        self, inv: NodeInventory, gpu_index: int | None, need: Capacity, evict: tuple[str, ...] = ()
    ) -> Placement:
        dev = inv.device("cuda", gpu_index) if gpu_index is not None else None
        share = gpu_need(need, dev) if dev is not None else None
        return Placement(inv.node, gpu_index, evict, share)

    def _adjustments(
        self, pending: Sequence[Allocation], exclude: frozenset[str] | set[str]
    ) -> dict[DeviceKey, Capacity]:
        adjust: dict[DeviceKey, Capacity] = {}
        for a in pending:
            _charge(adjust, a, 1)
        for alloc_id in exclude:
            ex = self._allocs.get(alloc_id)
            if ex is not None:
                _charge(adjust, ex, -1)
        return adjust

    def _free_with(self, node: str, dev: Device, adjust: Mapping[DeviceKey, Capacity]) -> Capacity:
        key = (node, dev.kind, dev.index)
        return dev.capacity - self._used.get(key, Capacity()) - adjust.get(key, Capacity())

    def _fits(
        self,
        inv: NodeInventory,
        ask: _Ask,
        adjust: Mapping[DeviceKey, Capacity],
    ) -> tuple[list[tuple[int | None, float]], dict[str, float]]:
        """Each device choice of ``inv`` that holds ``ask`` now, with its leftover
        score; and, per resource that did not fit, the most free on this node."""
        need = ask.need
        cpu_dev = inv.cpu
        host_free = self._free_with(inv.node, cpu_dev, adjust)
        miss = _first_short(host_free, host_part(need))
        if miss is not None:
            return [], {miss[0]: miss[1]}
        host_left = _leftover(host_free, host_part(need), cpu_dev.capacity)
        if not wants_gpu(need):
            return [(None, host_left)], {}
        short: dict[str, float] = {}
        out: list[tuple[int | None, float]] = []
        for dev in inv.devices:
            if dev.kind != "cuda":
                continue
            free = self._free_with(inv.node, dev, adjust)
            there = ask.on(inv.node, dev)
            gmiss = _first_short(free, there)
            if gmiss is not None:
                short[gmiss[0]] = max(short.get(gmiss[0], -math.inf), gmiss[1])
                continue
            out.append((dev.index, host_left + _leftover(free, there, dev.capacity)))
        return out, short

    def _make_room(
        self,
        function: str,
        ask: _Ask,
        adjust: dict[DeviceKey, Capacity],
        exclude: frozenset[str] | set[str],
        evictable: Evictable,
    ) -> Placement | None:
        """The node (and device) that fits ``need`` after the fewest evictions of
        other functions' evictable allocations, longest idle first."""
        candidates: dict[str, list[tuple[float, Allocation]]] = {}
        for a in self._allocs.values():
            if a.function == function or a.id in exclude:
                continue
            since = evictable(a)
            if since is not None:
                candidates.setdefault(a.node, []).append((since, a))
        best: tuple[tuple[int, float, int], Placement] | None = None
        for order, inv in enumerate(self._nodes.values()):
            victims = sorted(candidates.get(inv.node, []), key=lambda c: (c[0], c[1].id))
            chosen: list[Allocation] = []
            local = dict(adjust)
            for _, victim in [(0.0, None), *victims]:
                if victim is not None:
                    if not self._helps(victim, ask, inv, local):
                        continue
                    chosen.append(victim)
                    _charge(local, victim, -1)
                fits, _ = self._fits(inv, ask, local)
                if fits:
                    gpu_index, leftover = min(
                        fits,
                        key=lambda f: (*(-r for r in _rank(ask.locality, inv.node, f[0])), f[1]),
                    )
                    score = (len(chosen), leftover, order)
                    if best is None or score < best[0]:
                        evict = tuple(v.id for v in chosen)
                        best = (score, self._placement(inv, gpu_index, ask.need, evict))
                    break
        return None if best is None else best[1]

    def _helps(
        self,
        victim: Allocation,
        ask: _Ask,
        inv: NodeInventory,
        local: Mapping[DeviceKey, Capacity],
    ) -> bool:
        """Does evicting ``victim`` free something ``ask`` is short of on its node?"""
        need = ask.need
        host_free = self._free_with(inv.node, inv.cpu, local)
        host_need = host_part(need)
        if (host_free.cpu + _EPS < host_need.cpu and victim.cpu.cpu > 0) or (
            host_free.memory_mb < host_need.memory_mb and victim.cpu.memory_mb > 0
        ):
            return True
        if victim.gpu_index is None or not wants_gpu(need):
            return False
        dev = inv.device("cuda", victim.gpu_index)
        if dev is None:
            return False
        free = self._free_with(inv.node, dev, local)
        there = ask.on(inv.node, dev)
        return (free.gpu + _EPS < there.gpu and victim.gpu.gpu > 0) or (
            free.gpu_memory_mb < there.gpu_memory_mb and victim.gpu.gpu_memory_mb > 0
        )


def _rank(locality: Locality, node: str, gpu_index: int | None) -> tuple[int, int]:
    """(rank of the GPU itself, rank of its node's host memory): a GPU that holds the
    model's weights comes before one that does not, whatever the host holds; then a
    node whose host memory holds them (a copy to the GPU instead of a file read)."""
    host = locality.get((node, None), 0)
    if gpu_index is None:
        return 0, host
    return locality.get((node, gpu_index), 0), host


def _first_short(free: Capacity, need: Capacity) -> tuple[str, float] | None:
    """The first resource of ``need`` that ``free`` cannot hold, with the amount free."""
    for r in RESOURCES:
        want = need.get(r)
        if want > 0 and free.get(r) + _EPS < want:
            return r, free.get(r)
    return None


def _leftover(free: Capacity, need: Capacity, capacity: Capacity) -> float:
    total = 0.0
    for r in RESOURCES:
        cap = capacity.get(r)
        if need.get(r) > 0 and cap > 0 and math.isfinite(cap):
            total += (free.get(r) - need.get(r)) / cap
    return total


def _holdings(a: Allocation) -> list[tuple[DeviceKey, Capacity]]:
    """What ``a`` holds on each device of its node: host cpu/memory, and its GPU's share."""
    out = [((a.node, "cpu", 0), a.cpu)]
    if a.gpu_index is not None:
        out.append(((a.node, "cuda", a.gpu_index), a.gpu))
    return out


def _charge(table: dict[DeviceKey, Capacity], a: Allocation, sign: int, *, known_only: bool = False) -> None:
    """Add (``sign`` 1) or take back (-1) what ``a`` holds to ``table``; ``known_only``:
    devices missing from the table are left out."""
    for key, amount in _holdings(a):
        if known_only and key not in table:
            continue
        table[key] = _scaled_add(table.get(key, Capacity()), amount, sign)


def _scaled_add(base: Capacity, delta: Capacity, sign: int) -> Capacity:
    return base + delta if sign > 0 else base - delta
