"""What the controller tells every gateway: the cluster as routing needs it.

A :class:`ClusterView` lists every function (its record, its ready and draining
instances, why it cannot start, if so), every node (where its relay listens, where its
gateway serves) and the measured round trips between nodes. The controller rebuilds it
whenever something may have changed (:meth:`smss.control.controller.Controller.subscribe`)
and bumps ``version`` only when its content changed; gateways long-poll for a version
newer than theirs. It crosses processes as msgpack (msgspec), never pickled.
"""

from __future__ import annotations

import math

import msgspec

from smss.control.controller import Controller
from smss.ports import FunctionRecord, InstanceInfo


class InstanceEntry(msgspec.Struct, frozen=True, array_like=True):
    info: InstanceInfo
    #: Being stopped: finishes what it holds, takes nothing new.
    draining: bool = False


class FunctionEntry(msgspec.Struct, frozen=True):
    record: FunctionRecord
    instances: tuple[InstanceEntry, ...] = ()
    #: The last failed start while none serves (its 503), the seconds of back-off left
    #: (None: no more starts are tried), and why a start waits for capacity.
    start_error: str | None = None
    backoff_s: float | None = 0.0
    waiting_for: str | None = None


class NodeEntry(msgspec.Struct, frozen=True):
    node: str
    #: ``host:port`` of its relay (instance frames and probes over TCP).
    relay: str
    #: Its gateway's URL, once it serves.
    gateway: str | None = None
    #: The node's IP address, as Ray knows it.
    ip: str = ""


class ClusterView(msgspec.Struct, frozen=True):
    version: int = 0
    functions: tuple[FunctionEntry, ...] = ()
    #: Workflow names: a gateway sends their runs to the controller.
    workflows: tuple[str, ...] = ()
    nodes: tuple[NodeEntry, ...] = ()
    #: Measured round trip, ms, from each node (outer key) to the others.
    rtt_ms: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)
    #: The cluster's secret for relays (gateways and agents only; never shown).
    secret: str = ""

    def node(self, name: str) -> NodeEntry | None:
        return next((n for n in self.nodes if n.node == name), None)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ClusterView)


def encode(view: ClusterView) -> bytes:
    return _encoder.encode(view)


def decode(data: bytes) -> ClusterView:
    return _decoder.decode(data)


def functions_of(controller: Controller, now: float) -> tuple[FunctionEntry, ...]:
    """Every function as gateways route to it now."""
    out = []
    for rt in controller.functions():
        d = rt.dispatcher
        instances = tuple(
            InstanceEntry(s.info, draining=s.draining or s.info.id in rt.stopping) for s in d.slots.values()
        )
        error = d.start_error.message if d.start_error is not None and not d.slots else None
        left = d.backoff_until - now
        backoff = None if math.isinf(left) else float(max(0, math.ceil(left)))
        out.append(
            FunctionEntry(
                rt.record,
                tuple(sorted(instances, key=lambda e: e.info.id)),
                error,
                backoff if error else 0.0,
                d.waiting_for,
            )
        )
    return tuple(sorted(out, key=lambda f: f.record.spec.name))
