"""The node relay: instance frames over TCP, spliced to the instance's Unix socket, and
RTT probes. Real sockets; the instance is a small server speaking the instance frames."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from smss.errors import InstanceLost
from smss.node import ipc
from smss.node.channel import UnixChannel
from smss.node.relay import Prober, Relay
from smss.ports import InstanceInfo

SECRET = "s3cret-for-the-test"


async def _instance(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo: every input comes back as an output of the same name, doubled."""
    try:
        while True:
            message, payload = await ipc.read_frame(reader)
            if isinstance(message, ipc.Ping):
                ipc.write_frame(writer, ipc.Pong(message.id, 0))
            elif isinstance(message, ipc.Infer):
                arrays = ipc.unpack_tensors(message.inputs, payload)
                metas, buffers = ipc.tensor_metas({k: v * 2 for k, v in arrays.items()})
                ipc.write_frame(writer, ipc.Result(message.id, metas), buffers)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


Relayed = tuple[Relay, int, asyncio.Server]


@contextlib.asynccontextmanager
async def _relayed(path: Path) -> AsyncIterator[Relayed]:
    server = await asyncio.start_unix_server(_instance, str(path))
    known = {"inst-1": str(path)}
    relay = Relay(SECRET, known.get, probe_hook=lambda: time.sleep(0.02))
    _, port = await relay.start("127.0.0.1", 0)
    try:
        yield relay, port, server
    finally:
        await relay.close()
        server.close()


def _run(tmp_path: Path, body: Callable[[Relayed], Awaitable[None]]) -> None:
    async def main() -> None:
        async with _relayed(tmp_path / "inst.sock") as r:
            await asyncio.wait_for(body(r), 20)

    asyncio.run(main())


def _info(iid: str = "inst-1") -> InstanceInfo:
    return InstanceInfo(iid, "echo", "node-b", "unix:/nowhere", 1, 0.0)


def test_frames_cross_the_relay_as_raw_bytes(tmp_path: Path) -> None:
    _run(tmp_path, _frames)


async def _frames(relayed: Relayed) -> None:
    _, port, _ = relayed
    channel = await UnixChannel.connect_relay(_info(), "127.0.0.1", port, SECRET)
    try:
        await channel.ping()
        big = np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024)  # 4 MiB: flow control
        answers = await asyncio.gather(*(channel.infer({"x": big + k}, ("x",)) for k in range(4)))
        for k, out in enumerate(answers):
            np.testing.assert_array_equal(out["x"], (big + k) * 2)
    finally:
        await channel.close()


@pytest.mark.parametrize(("secret", "instance"), [("wrong", "inst-1"), (SECRET, "inst-unknown")])
def test_refuses_a_wrong_secret_or_an_unknown_instance(tmp_path: Path, secret: str, instance: str) -> None:
    async def body(relayed: Relayed) -> None:
        with pytest.raises(InstanceLost):
            await UnixChannel.connect_relay(_info(instance), "127.0.0.1", relayed[1], secret)

    _run(tmp_path, body)


def test_an_instance_gone_fails_its_requests_as_lost(tmp_path: Path) -> None:
    _run(tmp_path, _gone)


async def _gone(relayed: Relayed) -> None:
    relay, port, server = relayed
    channel = await UnixChannel.connect_relay(_info(), "127.0.0.1", port, SECRET)
    await channel.ping()
    server.close()
    await relay.close()  # every spliced connection ends, as when the node dies
    with pytest.raises(InstanceLost):
        await asyncio.wait_for(channel.infer({"x": np.ones(3, np.float32)}, ("x",)), 5)


def test_probes_measure_the_round_trip_with_its_injected_delay(tmp_path: Path) -> None:
    _run(tmp_path, _probes)


async def _probes(relayed: Relayed) -> None:
    _, port, _ = relayed
    prober = Prober("127.0.0.1", port, SECRET)
    try:
        samples = [await prober.probe() for _ in range(3)]
        assert min(samples) >= 0.02  # the relay's hook delays every answer by 20 ms
    finally:
        prober.close()
    bad = Prober("127.0.0.1", port, "wrong")
    with pytest.raises(ConnectionError):
        await bad.probe()
