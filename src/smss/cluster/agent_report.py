"""The messages between the controller and the node agents (msgpack, never pickled)."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from smss.inventory import Allocation, NodeInventory
from smss.ports import RunningInstance, StartedInstance
from smss.spec import FunctionSpec

T = TypeVar("T")


class AgentHello(msgspec.Struct, frozen=True):
    """An agent that has started: its node, where its relay listens, its devices."""

    node: str
    ip: str
    relay_port: int
    inventory: NodeInventory


class Exit(msgspec.Struct, frozen=True, array_like=True):
    instance: str
    code: int | None


class AgentReport(msgspec.Struct, frozen=True):
    """An agent's heartbeat: what its node keeps resident, its weight store, its
    measured round trips to the other nodes (ms), and instances that exited."""

    node: str
    seq: int
    resident: tuple[Allocation, ...] = ()
    weight_cache: dict[str, Any] = msgspec.field(default_factory=dict)
    rtt_ms: dict[str, float] = msgspec.field(default_factory=dict)
    exited: tuple[Exit, ...] = ()


class Peers(msgspec.Struct, frozen=True):
    """The controller's answer to a heartbeat: the other nodes' relays (``host:port``),
    to probe; ``known`` False when the controller no longer counts this node (it was
    declared gone): the agent then stops its instances."""

    relays: dict[str, str] = msgspec.field(default_factory=dict)
    known: bool = True


class StartRequest(msgspec.Struct, frozen=True):
    spec: FunctionSpec
    artifact_dir: str
    where: Allocation | None = None


class StartAnswer(msgspec.Struct, frozen=True):
    started: StartedInstance | None = None
    error: str | None = None


class Running(msgspec.Struct, frozen=True):
    instances: tuple[RunningInstance, ...] = ()


_enc = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _enc.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    return msgspec.msgpack.decode(data, type=kind)
