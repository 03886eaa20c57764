"""What a node has and what is placed on it: devices, capacities, allocations.

These are the words of placement (:mod:`smss.control.placement`), shared by the
node agent that discovers devices (:mod:`smss.node.devices`), the controller that
places instances and the API that shows them. They are msgspec structs: they cross
process boundaries as JSON / msgpack, never pickled.

Units follow :class:`smss.spec.Resources`: cores as a float, memory in MiB.
A CPU device carries ``cpu`` and ``memory_mb`` (host memory); a CUDA device
carries ``gpu`` (1.0 = the whole GPU's compute) and ``gpu_memory_mb``.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec

DeviceKind = Literal["cpu", "cuda"]
#: What an allocation holds: a running (or starting) instance, or something kept
#: resident for a function whether or not an instance runs.
AllocationKind = Literal["instance", "weights", "template", "spare"]
RESOURCES = ("cpu", "memory_mb", "gpu", "gpu_memory_mb")
#: The resources a device of each kind carries.
KIND_RESOURCES: dict[DeviceKind, tuple[str, ...]] = {
    "cpu": ("cpu", "memory_mb"),
    "cuda": ("gpu", "gpu_memory_mb"),
}


class Tier(enum.IntEnum):
    """A function's tier of readiness (:mod:`smss.control.tiers`), ordered by readiness:
    a higher tier holds everything a lower one does."""

    NO_RUNTIME = 0
    COLD = 1
    RESIDENT = 2
    STANDBY = 3
    WARM = 4

    @property
    def label(self) -> str:
        """The tier's name as the CLI, the API and the metrics spell it."""
        return self.name.lower()


class Capacity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An amount of each resource. Used for capacities, needs and allocations alike."""

    cpu: float = 0.0
    memory_mb: int = 0
    gpu: float = 0.0
    gpu_memory_mb: int = 0

    def __add__(self, other: Capacity) -> Capacity:
        return Capacity(
            self.cpu + other.cpu,
            self.memory_mb + other.memory_mb,
            self.gpu + other.gpu,
            self.gpu_memory_mb + other.gpu_memory_mb,
        )

    def __sub__(self, other: Capacity) -> Capacity:
        return Capacity(
            self.cpu - other.cpu,
            self.memory_mb - other.memory_mb,
            self.gpu - other.gpu,
            self.gpu_memory_mb - other.gpu_memory_mb,
        )

    def get(self, resource: str) -> float:
        value: float = getattr(self, resource)
        return value

    @property
    def empty(self) -> bool:
        return self.cpu <= 0 and self.memory_mb <= 0 and self.gpu <= 0 and self.gpu_memory_mb <= 0


class Device(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One device of a node. ``capacity`` is what placement may allocate: ``total``
    (what the hardware has, or the operator's cap) less ``reserved`` (what the
    platform keeps for itself). ``free_memory_mb``: a CUDA device's free memory as
    measured when it was discovered (other processes may use the GPU too)."""

    kind: DeviceKind
    index: int
    name: str
    capacity: Capacity
    total: Capacity
    reserved: Capacity = Capacity()
    free_memory_mb: int | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.index}"


class NodeInventory(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node's devices, as its agent reports them. Every node has one CPU device
    (index 0); CUDA devices follow where present."""

    node: str
    devices: tuple[Device, ...]

    def device(self, kind: DeviceKind, index: int) -> Device | None:
        return next((d for d in self.devices if d.kind == kind and d.index == index), None)

    @property
    def cpu(self) -> Device:
        dev = self.device("cpu", 0)
        if dev is None:
            raise ValueError(f"node {self.node!r} reports no CPU device")
        return dev


class Allocation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Something placed on a node: an instance (``id`` is its instance id, or a
    start's id while it starts) or a resident item of a function (``id`` names it,
    e.g. ``weights:mlp``). ``cpu`` is the amount on the node's CPU device,
    ``gpu`` the amount on CUDA device ``gpu_index`` (None: no GPU).

    ``idle_since``: an instance with nothing in flight, since when (None: busy or
    starting); ``evictable``: placement may stop it to make room for another
    function (an idle instance above its function's ``min_instances``, a resident
    item of a function with no instance)."""

    id: str
    function: str
    kind: AllocationKind
    node: str
    cpu: Capacity
    gpu: Capacity = Capacity()
    gpu_index: int | None = None
    idle_since: float | None = None
    evictable: bool = False


class DeviceReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A device as ``smss devices`` and ``GET /v1/devices`` show it: its capacity,
    what is allocated on it, and each allocation."""

    node: str
    kind: DeviceKind
    index: int
    name: str
    capacity: Capacity
    total: Capacity
    reserved: Capacity
    allocated: Capacity
    placed: tuple[Allocation, ...]
    free_memory_mb: int | None = None


def memory_text(mb: float) -> str:
    """MiB as a person reads it: ``512 MiB``, ``2 GiB``, ``22.3 GiB``."""
    if abs(mb) < 1024:
        return f"{mb:g} MiB"
    return f"{mb / 1024:.1f}".removesuffix(".0") + " GiB"


def amount_text(kind: DeviceKind, amount: Capacity) -> str:
    """A device's amount in its own resources: ``2 cores, 22.3 GiB`` / ``1 GPU, 80 GiB``."""
    if kind == "cuda":
        return f"{amount.gpu:g} GPU{'' if amount.gpu == 1 else 's'}, {memory_text(amount.gpu_memory_mb)}"
    return f"{amount.cpu:g} core{'' if amount.cpu == 1 else 's'}, {memory_text(amount.memory_mb)}"
