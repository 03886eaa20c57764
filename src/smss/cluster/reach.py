"""How a process on a cluster node reaches an instance: a Unix socket when the instance
runs on this node, else TCP through the instance's node relay (:mod:`smss.node.relay`).
Either way the same frames and the same :class:`~smss.node.channel.UnixChannel`."""

from __future__ import annotations

from collections.abc import Mapping

from smss.errors import InstanceLost
from smss.node.channel import UnixChannel
from smss.ports import InstanceChannel, InstanceInfo


class Reach:
    """A :class:`~smss.ports.ChannelFactory` for a process on node ``here``. ``relays``
    (node -> ``host:port``) and ``secret`` are updated as nodes come and go."""

    def __init__(self, here: str, *, write_timeout_s: float = 5.0) -> None:
        self.here = here
        self.relays: Mapping[str, str] = {}
        self.secret = ""
        self._write_timeout_s = write_timeout_s

    async def __call__(self, info: InstanceInfo) -> InstanceChannel:
        if info.node == self.here:
            return await UnixChannel.connect(info, write_timeout_s=self._write_timeout_s)
        relay = self.relays.get(info.node)
        if not relay:
            raise InstanceLost(f"node {info.node} of instance {info.id} is not reachable from here")
        host, _, port = relay.rpartition(":")
        return await UnixChannel.connect_relay(
            info, host, int(port), self.secret, write_timeout_s=self._write_timeout_s
        )
