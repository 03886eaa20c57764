"""``smss-agent-<node id>``: one node's agent and relay (see :mod:`smss.cluster.ray_actors`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import msgspec
import ray

from smss import faults
from smss.cluster import agent_report as msg
from smss.cluster.ray_actors import controller_handle, decode_settings, log_to_stderr, node_facts
from smss.config import Settings
from smss.errors import InvalidSpec, SmssError
from smss.inventory import NodeInventory
from smss.node.agent import NodeAgent, default_weight_budget
from smss.node.devices import discover
from smss.node.relay import Prober, Relay

log = logging.getLogger(__name__)

#: EWMA weight of a new RTT sample.
RTT_ALPHA = 0.3


# ---------------------------------------------------------------- a node agent


class AgentActor:
    """``smss-agent-<node id>``: one node's agent and relay."""

    def __init__(self, node: str, settings_bytes: bytes, secret: str) -> None:
        self._node = node
        self._settings = decode_settings(settings_bytes)
        log_to_stderr(self._settings)
        self._secret = secret
        self._agent: NodeAgent | None = None
        self._relay: Relay | None = None
        self._hello: msg.AgentHello | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._exits: list[msg.Exit] = []
        self._wake = asyncio.Event()
        self._rtt: dict[str, float] = {}
        self._probers: dict[str, Prober] = {}
        self._seq = 0

    async def start(self) -> bytes:
        if self._hello is None:
            self._hello = await self._start()
        return msg.encode(self._hello)

    async def _start(self) -> msg.AgentHello:
        settings = self._settings
        if settings.allow_faults:
            faults.install(os.environ.get("SMSS_FAULT"))
        resources, ip = await asyncio.to_thread(node_facts, self._node)
        inventory = _inventory(self._node, resources, settings)
        base = settings.data_dir / "nodes" / self._node[:16]
        agent = NodeAgent(
            base / "logs",
            start_timeout_s=settings.serving.start_timeout_s,
            weight_budget_bytes=settings.weight_cache_bytes or default_weight_budget(inventory),
            spares=settings.spares,
            inventory=inventory,
        )
        agent.set_exit_callback(self._exited)
        self._agent = agent
        # The relay listens on the node's address as Ray was given it, nothing wider.
        ip = ip or ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._relay = Relay(self._secret, agent.socket_of, probe_hook=faults.point("probe.before_reply"))
        _, port = await self._relay.start(ip, 0)
        self._loop_task = asyncio.get_running_loop().create_task(self._loops())
        return msg.AgentHello(self._node, ip, port, inventory)

    def _exited(self, instance_id: str, code: int | None) -> None:
        self._exits.append(msg.Exit(instance_id, code))
        self._wake.set()

    async def _loops(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._heartbeats())
            group.create_task(self._probes())

    async def _heartbeats(self) -> None:
        cluster = self._settings.cluster
        controller: Any = None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cluster.heartbeat_s):
                    await self._wake.wait()
            self._wake.clear()
            assert self._agent is not None
            self._seq += 1
            exits, self._exits = self._exits, []
            try:
                report = msg.AgentReport(
                    self._node,
                    self._seq,
                    tuple(self._agent.resident()),
                    dict(self._agent.weight_cache()),
                    {n: round(v * 1000, 3) for n, v in self._rtt.items()},
                    tuple(exits),
                )
            except Exception:  # never the end of the heartbeats: the node would count as gone
                log.exception("could not build a heartbeat")
                report = msg.AgentReport(self._node, self._seq, exited=tuple(exits))
            try:
                if controller is None:
                    controller = await asyncio.to_thread(controller_handle, cluster.namespace)
                data = await asyncio.wait_for(controller.agent_heartbeat.remote(msg.encode(report)), 5.0)
                self._peers(msg.decode(data, msg.Peers))
            except Exception as e:
                self._exits = exits + self._exits  # told next time
                controller = None
                log.warning("heartbeat to the controller failed: %s", e)

    def _peers(self, peers: msg.Peers) -> None:
        for node in list(self._probers):
            if node not in peers.relays:
                self._probers.pop(node).close()
                self._rtt.pop(node, None)
        for node, relay in peers.relays.items():
            if node not in self._probers:
                host, _, port = relay.rpartition(":")
                self._probers[node] = Prober(host, int(port), self._secret)

    async def _probes(self) -> None:
        while True:
            await asyncio.sleep(self._settings.cluster.probe_interval_s)
            for node, prober in list(self._probers.items()):
                try:
                    sample = await prober.probe()
                except Exception:  # unreachable, refused, closed mid-probe: unknown until it answers
                    self._rtt.pop(node, None)
                    continue
                old = self._rtt.get(node)
                self._rtt[node] = sample if old is None else old + RTT_ALPHA * (sample - old)

    async def start_instance(self, data: bytes) -> bytes:
        assert self._agent is not None
        request = msg.decode(data, msg.StartRequest)
        if not await asyncio.to_thread(Path(request.artifact_dir).is_dir):
            return msg.encode(
                msg.StartAnswer(
                    error=f"model {request.spec.name!r}: its artifacts are not reachable from node "
                    f"{self._node}: the data directory must be on a path every node reaches"
                )
            )
        try:
            started = await self._agent.start_instance(
                request.spec, Path(request.artifact_dir), request.where
            )
        except SmssError as e:
            return msg.encode(msg.StartAnswer(error=e.message))
        except Exception as e:
            log.exception("start of %s failed", request.spec.name)
            return msg.encode(msg.StartAnswer(error=f"{type(e).__name__} on node {self._node} (see its log)"))
        return msg.encode(msg.StartAnswer(started=started))

    async def stop_instance(self, instance_id: str, grace_s: float) -> None:
        if self._agent is not None:
            await self._agent.stop_instance(instance_id, grace_s)

    async def running(self) -> bytes:
        return msg.encode(msg.Running(tuple(self._agent.running() if self._agent else ())))

    async def evict_weights(self, function: str) -> bool:
        return self._agent.evict_weights(function) if self._agent else False

    async def ping(self) -> str:
        return self._node

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        for prober in self._probers.values():
            prober.close()
        if self._relay is not None:
            await self._relay.close()
        if self._agent is not None:
            await self._agent.close()
            self._agent = None


def _inventory(node: str, resources: dict[str, float], settings: Settings) -> NodeInventory:
    """The node's devices, capped by what Ray says the node has (its CPU and memory): a
    node Ray gives no CPU (``num_cpus=0``, e.g. a head kept for the control plane) has
    room for no instance."""
    cpus = resources.get("CPU", 0.0)
    memory = resources.get("memory")
    cap = min(cpus, float(os.cpu_count() or 1)) if cpus > 0 else None
    try:
        inventory = discover(
            node,
            cpus=cap,
            memory_mb=int(memory // (1 << 20)) if memory else None,
            visible=settings.cuda_visible_devices,
        )
    except InvalidSpec:  # Ray counts more memory than the machine reports: the machine's
        inventory = discover(node, cpus=cap, visible=settings.cuda_visible_devices)
    if cpus > 0:
        return inventory
    cpu = inventory.cpu
    none = msgspec.structs.replace(
        cpu,
        capacity=msgspec.structs.replace(cpu.capacity, cpu=0.0),
        total=msgspec.structs.replace(cpu.total, cpu=0.0),
    )
    return msgspec.structs.replace(inventory, devices=(none, *inventory.devices[1:]))


AgentRemote = ray.remote(AgentActor)
