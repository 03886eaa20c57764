"""The :class:`~smss.ports.ClusterBackend` over a Ray cluster's node agents.

Lives in the controller's process (the ``smss-controller`` actor). Every Ray node gets
one agent actor, ``smss-agent-<node id>``, pinned to it (node affinity, not soft): a
:class:`~smss.node.agent.NodeAgent` with its zygotes, weight store, templates and
instance processes, as on one machine, plus its node's relay. Gateway nodes (every
node, or ``--gateway-nodes``) also get a gateway actor, ``smss-gateway-<node id>``.

Guarantees:

* a node Ray lists alive gets its agent (and gateway) within a membership round
  (``heartbeat_s``) of appearing;
* a node that dies (Ray's table) or whose agent falls silent for ``node_timeout_s`` is
  gone: every instance on it is reported exited at once (the controller drops them
  from routing and the gateways follow the view), its agent is killed, and placement
  no longer offers it; only nodes heard within ``fresh_s`` are offered at all;
* no call to an agent waits without a bound: a start waits for the start timeout
  plus a margin, a stop for its grace plus a margin; an agent that does not answer
  makes its node suspect (pinged at once, gone if it does not answer).

Agents speak msgpack (:mod:`smss.cluster.agent_report`); nothing of ours is pickled,
arguments and results are bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from smss.cluster import agent_report as msg
from smss.cluster.membership import Membership, is_gateway_node
from smss.cluster.view import NodeEntry
from smss.config import Settings
from smss.errors import StartFailed
from smss.inventory import Allocation, NodeInventory
from smss.ports import ExitCallback, RunningInstance, StartedInstance
from smss.spec import FunctionSpec

log = logging.getLogger(__name__)

AGENT_PREFIX = "smss-agent-"
GATEWAY_PREFIX = "smss-gateway-"
CONTROLLER_NAME = "smss-controller"
#: Seconds a start may take beyond the start timeout (the call's own way there and back).
CALL_MARGIN_S = 10.0
#: How long a new agent may take to start (its actor process, its relay).
AGENT_START_S = 60.0


@dataclass
class _Agent:
    node: str
    handle: Any
    hello: msg.AgentHello
    report: msg.AgentReport | None = None


@dataclass
class _Gateway:
    node: str
    handle: Any
    url: str | None = None


@dataclass
class Topology:
    """The cluster's nodes as the controller sees them."""

    nodes: tuple[NodeEntry, ...]
    rtt_ms: dict[str, dict[str, float]]


class RayBackend:
    def __init__(self, settings: Settings, secret: str, *, agent_cls: Any, gateway_cls: Any) -> None:
        self._settings = settings
        self._cluster = settings.cluster
        self.secret = secret
        self._agent_cls = agent_cls
        self._gateway_cls = gateway_cls
        self._agents: dict[str, _Agent] = {}
        self._gateways: dict[str, _Gateway] = {}
        self._ips: dict[str, str] = {}
        self._instances: dict[str, str] = {}  # instance id -> node
        self._on_exit: ExitCallback = lambda _id, _code: None
        self._membership = Membership(
            self._cluster.node_timeout_s, fresh_s=max(1.2, 2.5 * self._cluster.heartbeat_s)
        )
        self._starting: set[str] = set()
        self._group: asyncio.TaskGroup | None = None
        self._settings_bytes = b""
        self._first_round = asyncio.Event()
        #: Called when nodes or gateways change (the view is rebuilt).
        self.on_change: Callable[[], None] = lambda: None

    # ------------------------------------------------------------ membership

    @contextlib.asynccontextmanager
    async def running(self, settings_bytes: bytes) -> AsyncIterator[RayBackend]:
        """Watch the cluster's nodes (start agents and gateways, notice nodes gone) until exit."""
        self._settings_bytes = settings_bytes
        async with asyncio.TaskGroup() as group:
            self._group = group
            watch = group.create_task(self._watch())
            try:
                yield self
            finally:
                watch.cancel()
                self._group = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._group is None:
            coro.close()
            return
        self._group.create_task(_guarded(coro))

    async def _watch(self) -> None:
        while True:
            try:
                await self._round()
            except Exception:
                log.exception("a membership round failed")
            self._first_round.set()
            await asyncio.sleep(self._cluster.heartbeat_s)

    async def _round(self) -> None:
        nodes = await asyncio.to_thread(ray.nodes)
        alive = {n["NodeID"]: n for n in nodes if n.get("Alive")}
        self._ips.update({nid: n.get("NodeManagerAddress", "") for nid, n in alive.items()})
        now = time.monotonic()
        for node in self._membership.gone(alive, now):
            why = "Ray lists it dead" if node not in alive else "its agent fell silent"
            self._node_lost(node, why)
        joining = self._membership.joining(alive, self._starting)
        if joining:
            await asyncio.gather(*(self._start_agent(node) for node in joining))
        for node in list(self._agents):
            ip = self._ips.get(node, "")
            if is_gateway_node(node, ip, self._cluster.gateway_nodes) and node not in self._gateways:
                self._gateways[node] = _Gateway(node, None)
                self._spawn(self._start_gateway(node))

    async def _start_agent(self, node: str) -> None:
        self._starting.add(node)
        try:
            handle = self._agent_cls.options(
                name=AGENT_PREFIX + node,
                namespace=self._cluster.namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(node, self._settings_bytes, self.secret)
            data = await asyncio.wait_for(handle.start.remote(), AGENT_START_S)
            hello = msg.decode(data, msg.AgentHello)
            self._agents[node] = _Agent(node, handle, hello)
            self._membership.register(node, time.monotonic())
            log.info("node %s joined: agent up, relay at %s:%d", node, hello.ip, hello.relay_port)
            self.on_change()
        except Exception as e:
            log.warning("could not start the agent of node %s: %s", node, e)
        finally:
            self._starting.discard(node)

    async def _start_gateway(self, node: str) -> None:
        gw = self._gateways[node]
        try:
            gw.handle = self._gateway_cls.options(
                name=GATEWAY_PREFIX + node,
                namespace=self._cluster.namespace,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(node, self._settings_bytes)
            gw.url = await asyncio.wait_for(gw.handle.start.remote(), AGENT_START_S)
            log.info("node %s: gateway serving on %s", node, gw.url)
            self.on_change()
        except Exception as e:
            log.warning("could not start the gateway of node %s: %s", node, e)
            self._gateways.pop(node, None)

    def _node_lost(self, node: str, why: str) -> None:
        agent = self._agents.pop(node, None)
        self._membership.drop(node)
        gone = [iid for iid, n in self._instances.items() if n == node]
        log.warning("node %s is gone (%s): dropping its %d instances", node, why, len(gone))
        for iid in gone:
            del self._instances[iid]
            self._on_exit(iid, None)
        gw = self._gateways.pop(node, None)
        for handle in (agent.handle if agent else None, gw.handle if gw else None):
            if handle is not None:
                self._spawn(_kill(handle))
        self.on_change()

    def heartbeat(self, report: msg.AgentReport) -> msg.Peers:
        """An agent's report: its resident memory, weight store, RTTs and exited instances."""
        agent = self._agents.get(report.node)
        if agent is None or not self._membership.heartbeat(report.node, time.monotonic()):
            return msg.Peers(known=False)
        if agent.report is not None and report.seq <= agent.report.seq:
            return self._peers(report.node)
        old_rtt = agent.report.rtt_ms if agent.report else {}
        agent.report = report
        for e in report.exited:
            if self._instances.pop(e.instance, None) is not None:
                self._on_exit(e.instance, e.code)
        if set(report.rtt_ms) != set(old_rtt) or _moved(old_rtt, report.rtt_ms):
            self.on_change()
        return self._peers(report.node)

    def _peers(self, node: str) -> msg.Peers:
        return msg.Peers(
            {n: f"{a.hello.ip}:{a.hello.relay_port}" for n, a in self._agents.items() if n != node}
        )

    async def _suspect(self, node: str) -> None:
        """An agent did not answer a call: ping it, and count its node gone if it does not answer."""
        agent = self._agents.get(node)
        if agent is None:
            return
        try:
            await asyncio.wait_for(agent.handle.ping.remote(), 2.0)
        except Exception:
            if self._agents.get(node) is agent:
                self._node_lost(node, "its agent does not answer")
            return
        self._membership.cleared(node)

    def topology(self) -> Topology:
        nodes = tuple(
            NodeEntry(
                n,
                f"{a.hello.ip}:{a.hello.relay_port}",
                self._gateways[n].url if n in self._gateways else None,
                a.hello.ip,
            )
            for n, a in sorted(self._agents.items())
        )
        rtt = {n: dict(a.report.rtt_ms) for n, a in self._agents.items() if a.report is not None}
        return Topology(nodes, rtt)

    def settled(self) -> bool:
        """Every node up has its agent, and every gateway node its gateway serving."""
        if not self._first_round.is_set() or self._starting:
            return False
        wanted = [
            n for n in self._agents if is_gateway_node(n, self._ips.get(n, ""), self._cluster.gateway_nodes)
        ]
        return all(n in self._gateways and self._gateways[n].url for n in wanted)

    async def wait_settled(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.settled() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls state, not an event
            await asyncio.sleep(0.1)

    def gateway_urls(self) -> dict[str, str]:
        return {n: g.url for n, g in self._gateways.items() if g.url}

    async def ready(self, timeout_s: float) -> None:
        """Wait for the first membership round (the nodes up now have agents)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_round.wait(), timeout_s)

    # ------------------------------------------------------------ ClusterBackend

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._on_exit = callback

    def nodes(self) -> list[str]:
        fresh = self._membership.fresh(time.monotonic())
        return [n for n in self._agents if n in fresh]

    def inventory(self) -> list[NodeInventory]:
        fresh = self._membership.fresh(time.monotonic())
        return [a.hello.inventory for n, a in self._agents.items() if n in fresh]

    def resident(self) -> list[Allocation]:
        return [r for a in self._agents.values() if a.report is not None for r in a.report.resident]

    def weight_cache(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for a in self._agents.values():
            if a.report is not None:
                out.update(a.report.weight_cache)
        return out

    def evict_weights(self, function: str) -> bool:
        held = False
        for a in self._agents.values():
            stats = a.report.weight_cache.get(a.node, {}) if a.report else {}
            models = stats.get("models", []) if isinstance(stats, dict) else []
            held = held or function in models
            self._spawn(self._call(a, a.handle.evict_weights.remote(function), 10.0))
        return held

    async def _call(self, agent: _Agent, ref: Any, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except (TimeoutError, ray.exceptions.RayError):
            await self._suspect(agent.node)
            raise

    async def start_instance(
        self, spec: FunctionSpec, artifact_dir: Path, where: Allocation | None = None
    ) -> StartedInstance:
        node = where.node if where is not None else next(iter(self.nodes()), None)
        agent = self._agents.get(node) if node is not None else None
        if agent is None:
            raise StartFailed(f"node {node} is not part of the cluster any more")
        request = msg.encode(msg.StartRequest(spec, str(artifact_dir), where))
        timeout = self._settings.serving.start_timeout_s + CALL_MARGIN_S
        try:
            data = await self._call(agent, agent.handle.start_instance.remote(request), timeout)
        except (TimeoutError, ray.exceptions.RayError) as e:
            raise StartFailed(f"the agent of node {agent.node} did not answer ({type(e).__name__})") from None
        answer = msg.decode(data, msg.StartAnswer)
        if answer.started is None:
            raise StartFailed(answer.error or "the agent gave no reason")
        if self._agents.get(agent.node) is not agent:  # its node was lost meanwhile
            raise StartFailed(f"node {agent.node} was lost while the instance started")
        self._instances[answer.started.info.id] = agent.node
        return answer.started

    async def stop_instance(self, instance_id: str, grace_s: float) -> None:
        """A stop without grace is the controller's kill of an instance that hung or
        was lost: its node is suspect (offered to no placement) until its agent is
        heard from again, and is pinged now."""
        node = self._instances.pop(instance_id, None)
        agent = self._agents.get(node) if node is not None else None
        if agent is None:
            return
        if grace_s <= 0:
            self._membership.suspect(agent.node, time.monotonic())
            self._spawn(self._suspect(agent.node))
        with contextlib.suppress(TimeoutError, ray.exceptions.RayError):
            await self._call(
                agent, agent.handle.stop_instance.remote(instance_id, grace_s), grace_s + CALL_MARGIN_S
            )

    async def recover(self) -> list[RunningInstance]:
        """The instances the agents still run (a restarted controller adopts them)."""
        await self.ready(AGENT_START_S)
        found: list[RunningInstance] = []
        for agent in list(self._agents.values()):
            try:
                data = await self._call(agent, agent.handle.running.remote(), 10.0)
            except (TimeoutError, ray.exceptions.RayError):
                continue
            for r in msg.decode(data, msg.Running).instances:
                self._instances[r.info.id] = agent.node
                found.append(r)
        return found

    async def close(self) -> None:
        """Stop every agent's instances and the agents and gateways themselves."""
        closing = [asyncio.wait_for(a.handle.close.remote(), 30.0) for a in self._agents.values()] + [
            asyncio.wait_for(g.handle.stop.remote(), 15.0) for g in self._gateways.values() if g.handle
        ]
        await asyncio.gather(*closing, return_exceptions=True)
        for handle in [a.handle for a in self._agents.values()] + [g.handle for g in self._gateways.values()]:
            if handle is not None:
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)
        self._agents.clear()
        self._gateways.clear()
        self._instances.clear()


def _moved(old: dict[str, float], new: dict[str, float]) -> bool:
    """Whether an RTT moved enough to be worth a new view (10 % and 0.05 ms)."""
    return any(abs(new[k] - v) > max(0.05, 0.1 * v) for k, v in old.items() if k in new)


async def _kill(handle: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.to_thread(ray.kill, handle, no_restart=True)


async def _guarded(coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    except Exception:
        log.exception("a cluster task failed")
