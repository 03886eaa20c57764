"""An open-loop HTTP/1.1 load generator, run as its own process.

Arrivals follow a schedule fixed in advance (Poisson at ``rate`` per second, from
a seed), whether or not earlier requests were answered: a slow server does not
slow the arrivals down. Each request's latency is measured from the time it was
*scheduled*, not from when a connection was free to send it, so time spent
waiting behind a stalled server is counted (the correction for coordinated
omission). A request waits for a free keep-alive connection of a pool that grows
up to ``connections``; that wait counts too.

``python -m smss.bench.openloop URL PATH BODY_FILE RATE SECONDS [CONNECTIONS]
[SESSIONS]`` prints one JSON object: the offered and answered rates, status
counts, ``error_rate`` and latency percentiles in ms (``p50_ms`` ... ``p999_ms``).
With ``SESSIONS`` > 0, request ``k`` carries ``SMSS-Session: s<k mod SESSIONS>``
(workflow runs of different sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import numpy as np

#: A request unanswered this long counts as an error (``timeout``).
TIMEOUT_S = 30.0


def request_bytes(host: str, path: str, body: bytes, session: str | None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if session is not None:
        head += f"SMSS-Session: {session}\r\n"
    return (head + "\r\n").encode() + body


def schedule(rate: float, seconds: float, seed: int = 0) -> list[float]:
    """Poisson arrival times in [0, seconds) at ``rate`` per second."""
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class _Pool:
    host: str
    port: int
    limit: int
    free: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    opened: int = 0
    available: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self.available:
            while not self.free and self.opened >= self.limit:
                await self.available.wait()
            if self.free:
                return self.free.pop()
            self.opened += 1
        try:
            return await asyncio.open_connection(self.host, self.port)
        except OSError:
            await self.lost()
            raise

    async def fresh(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection in place of one that was lost (the count stays)."""
        try:
            return await asyncio.open_connection(self.host, self.port)
        except OSError:
            await self.lost()
            raise

    async def give(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        async with self.available:
            self.free.append(conn)
            self.available.notify()

    async def lost(self) -> None:
        async with self.available:
            self.opened -= 1
            self.available.notify()


async def _one(pool: _Pool, request: bytes, due: float, out: list[float], statuses: dict[str, int]) -> None:
    status = "error"
    try:
        async with asyncio.timeout(TIMEOUT_S):
            conn = await pool.take()
            reader, writer = conn
            try:
                writer.write(request)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError) as e:
                    if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                        raise
                    # A kept-alive connection the server had closed (its idle timeout)
                    # before it read anything: sent again on a new one, as HTTP
                    # clients do; the wait still counts from the schedule. (Pooled
                    # connections idle past the server's keep-alive are closed by it.)
                    writer.close()
                    conn = await pool.fresh()  # not another kept-alive one: it may be stale too
                    reader, writer = conn
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12].decode()
                length, close = 0, False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                if length:
                    await reader.readexactly(length)
            except BaseException:
                writer.close()
                await pool.lost()
                raise
            if close:
                writer.close()
                await pool.lost()
            else:
                await pool.give(conn)
        if status == "200":
            out.append(time.perf_counter() - due)
    except TimeoutError:
        status = "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError):
        status = "error"
    statuses[status] = statuses.get(status, 0) + 1


async def run(
    url: str, path: str, body: bytes, rate: float, seconds: float, connections: int = 256, sessions: int = 0
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    hostport = f"{host}:{port}"
    plain = request_bytes(hostport, path, body, None)
    times = schedule(rate, seconds)
    pool = _Pool(host, port, connections)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    late = 0
    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for k, t in enumerate(times):
            due = start + t
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.01:
                late += 1  # the generator itself fell behind (its own CPU)
            request = request_bytes(hostport, path, body, f"s{k % sessions}") if sessions else plain
            group.create_task(_one(pool, request, due, latencies, statuses))
    elapsed = time.perf_counter() - start
    for _, writer in pool.free:
        with contextlib.suppress(Exception):
            writer.close()
    ms = np.asarray(latencies, dtype=np.float64) * 1000.0
    sent = len(times)
    ok = statuses.get("200", 0)
    pct = (lambda q: round(float(np.percentile(ms, q)), 3)) if ms.size else (lambda q: None)
    return {
        "rate_rps": round(rate, 2),
        # what the schedule actually offered (a Poisson draw around the rate)
        "offered_rps": round(sent / seconds, 2) if seconds > 0 else 0.0,
        "seconds": seconds,
        "sent": sent,
        "ok": ok,
        # answered per second, over the schedule or until the last answer if later
        "goodput_rps": round(ok / max(elapsed, seconds), 2) if seconds > 0 else 0.0,
        "error_rate": round((sent - ok) / sent, 6) if sent else 0.0,
        "statuses": dict(sorted(statuses.items())),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "late_sends": late,
        "connections": pool.opened,
    }


def main() -> None:
    url, path, body_file, rate, seconds = sys.argv[1:6]
    connections = int(sys.argv[6]) if len(sys.argv) > 6 else 256
    sessions = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    body = Path(body_file).read_bytes()
    coro = run(url, path, body, float(rate), float(seconds), connections, sessions)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")


if __name__ == "__main__":
    main()
