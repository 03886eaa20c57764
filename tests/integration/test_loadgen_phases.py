"""The closed-loop generator's timed phases against a small real HTTP server: each phase
runs as many clients as it names (no more), a warm-up is not recorded, and requests
belong to the phase that sent them; chunked answers and closed connections are read."""

from __future__ import annotations

import asyncio

from smss.bench.loadgen import Phase, run, run_phases


class _Server:
    """Counts requests in flight (the clients a phase really runs); answers each after a
    short wait, every third chunked, every fifth with ``Connection: close``."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.served = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
                await asyncio.sleep(0.002)
                self.in_flight -= 1
                self.served += 1
                if self.served % 5 == 0:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    await writer.drain()
                    return
                if self.served % 3 == 0:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _run(phases: list[Phase]) -> tuple[dict[str, object], _Server, list[int]]:
    state = _Server()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    peaks: list[int] = []

    async def watch() -> None:
        # the peak of requests in flight in the middle of each phase (clear of its boundaries,
        # where a retiring client may still finish the request it sent)
        for phase in phases:
            await asyncio.sleep(0.1)
            state.peak = 0
            await asyncio.sleep(phase.seconds - 0.2)
            peaks.append(state.peak)
            await asyncio.sleep(0.1)

    async with server:
        result, _ = await asyncio.gather(run_phases(f"http://127.0.0.1:{port}", "/x", b"{}", phases), watch())
    return result, state, peaks


def test_phases_run_their_clients_and_only_recorded_ones_are_reported() -> None:
    phases = [Phase(4, 0.3, record=False), Phase(1, 0.4), Phase(8, 0.4), Phase(1, 0.4)]
    result, state, peaks = asyncio.run(_run(phases))
    recorded = result["phases"]
    assert isinstance(recorded, list)
    assert [p["clients"] for p in recorded] == [1, 8, 1]
    assert peaks == [4, 1, 8, 1]
    for p in recorded:
        assert p["errors"] == 0
        assert p["requests"] > 0
        assert p["p50_ms"] is not None
        assert p["p50_ms"] <= p["p99_ms"]
    total = result["total"]
    assert isinstance(total, dict)
    assert total["requests"] == sum(p["requests"] for p in recorded)
    # what was served beyond the recorded phases is the warm-up's
    assert state.served > total["requests"]


def test_a_refused_connection_is_an_error_not_a_hang() -> None:
    async def main() -> dict[str, object]:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        return await run_phases(f"http://127.0.0.1:{port}", "/x", b"{}", [Phase(2, 0.2)])

    result = asyncio.run(main())
    total = result["total"]
    assert isinstance(total, dict)
    assert total["errors"] > 0
    assert total["rps"] == 0
    assert total["p99_ms"] is None


def test_the_request_count_mode_reads_the_same_answers() -> None:
    async def main() -> dict[str, object]:
        state = _Server()
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await run(f"http://127.0.0.1:{port}", "/x", b"{}", 2, 4)

    result = asyncio.run(main())
    assert result["requests"] == 4
    assert result["errors"] == 0
