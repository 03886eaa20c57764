"""Which nodes are up, from Ray's node table and the agents' heartbeats. Pure.

A node *joins* when Ray lists it alive and it has no agent yet: the controller then
starts one there (and a gateway, on a gateway node). A node is *gone* when Ray says
it is dead, or when its agent has been silent for ``node_timeout_s`` (Ray notices a
killed raylet only after its own health checks, tens of seconds; an agent's silence
is noticed in seconds). A node is *fresh* while its agent was heard within
``fresh_s`` and not *suspect*: only fresh nodes are offered to placement, so a
replacement is not placed on a node that just went quiet. A node is suspect from
the moment one of its instances is found lost until its agent is heard again (a
agent answers a ping (a node dying in parts may still send a heartbeat or two;
a ping answered after the suspicion says the agent lives).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Membership:
    node_timeout_s: float = 2.5
    fresh_s: float = 1.2
    #: node -> when its agent was last heard (registered nodes only).
    heard: dict[str, float] = field(default_factory=dict)
    #: node -> when it became suspect.
    suspects: dict[str, float] = field(default_factory=dict)

    def joining(self, alive: Iterable[str], starting: Iterable[str] = ()) -> list[str]:
        """Nodes Ray lists alive that have no agent registered or starting."""
        busy = set(starting)
        return sorted(n for n in set(alive) if n not in self.heard and n not in busy)

    def register(self, node: str, now: float) -> None:
        self.heard[node] = now

    def heartbeat(self, node: str, now: float) -> bool:
        """Record a heartbeat; False when ``node`` is not registered (a lost node's late
        agent: it is not taken back until it registers again)."""
        if node not in self.heard:
            return False
        self.heard[node] = max(self.heard[node], now)
        return True

    def gone(self, alive: Iterable[str], now: float) -> list[str]:
        """Registered nodes that are dead by Ray's table or by their agent's silence."""
        up = set(alive)
        return sorted(n for n, t in self.heard.items() if n not in up or now - t > self.node_timeout_s)

    def suspect(self, node: str, now: float) -> None:
        if node in self.heard:
            self.suspects[node] = now

    def cleared(self, node: str) -> None:
        """Its agent answered a ping since it became suspect."""
        self.suspects.pop(node, None)

    def drop(self, node: str) -> None:
        self.heard.pop(node, None)
        self.suspects.pop(node, None)

    def fresh(self, now: float) -> set[str]:
        return {n for n, t in self.heard.items() if now - t <= self.fresh_s and n not in self.suspects}


def is_gateway_node(node: str, ip: str, wanted: tuple[str, ...]) -> bool:
    """Whether ``node`` runs a gateway: every node when ``wanted`` (``--gateway-nodes``)
    is empty, else those it names by Ray node id or by IP address."""
    return not wanted or node in wanted or ip in wanted
