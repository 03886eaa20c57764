"""The open-loop generator against a small real HTTP server: arrivals keep their
schedule while the server stalls, and the stall is counted in the latencies
(coordinated omission corrected), not hidden by waiting to send."""

from __future__ import annotations

import asyncio
import itertools

from smss.bench.openloop import run, schedule

STALL_S = 1.0


async def _server(stall_first: bool) -> tuple[asyncio.Server, int, list[int]]:
    served = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                served[0] += 1
                if stall_first and served[0] == 1:
                    await asyncio.sleep(STALL_S)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, served


def test_the_schedule_is_poisson_at_the_rate_and_reproducible() -> None:
    times = schedule(200.0, 10.0, seed=3)
    assert times == schedule(200.0, 10.0, seed=3)
    assert 1800 <= len(times) <= 2200
    assert all(0 <= a < b < 10.0 for a, b in itertools.pairwise(times))


def test_a_stalled_server_shows_in_the_latencies_of_the_requests_scheduled_behind_it() -> None:
    async def main() -> tuple[dict[str, object], dict[str, object]]:
        server, port, _ = await _server(stall_first=True)
        async with server:
            # One connection: every request scheduled during the stall waits for it.
            stalled = await run(f"http://127.0.0.1:{port}", "/x", b"{}", 50.0, 2.0, connections=1)
        server, port, _ = await _server(stall_first=False)
        async with server:
            smooth = await run(f"http://127.0.0.1:{port}", "/x", b"{}", 50.0, 2.0, connections=1)
        return stalled, smooth

    stalled, smooth = asyncio.run(main())
    for result in (stalled, smooth):
        assert result["error_rate"] == 0.0
        assert result["ok"] == result["sent"]
    # About half the requests were scheduled during the 1 s stall: from their schedule,
    # they waited for the rest of it (a closed-loop client would have sent them late,
    # and seen ~0), so a tenth of all waited more than half of it.
    assert float(stalled["p90_ms"]) > 0.5 * STALL_S * 1000  # type: ignore[arg-type]
    assert float(stalled["p99_ms"]) > 0.8 * STALL_S * 1000  # type: ignore[arg-type]
    assert float(smooth["p99_ms"]) < 0.25 * STALL_S * 1000  # type: ignore[arg-type]
