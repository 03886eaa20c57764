"""A lean HTTP/1.1 load generator, run as its own process.

Closed loop: ``concurrency`` keep-alive connections, each sending the same
pre-built request as soon as the previous answer arrives. A hand-rolled client
(prebuilt bytes, one parse of the status line and Content-Length) keeps the
generator's own cost per request in the tens of microseconds, so the latency it
reports is the platform's, not the client library's.

``python -m smss.bench.loadgen URL PATH BODY_FILE CONCURRENCY REQUESTS`` prints
one JSON object: rps, p50_ms, p90_ms, p99_ms, errors, statuses.

``python -m smss.bench.loadgen --phases 32:3:warmup,32:10 [--header NAME:VALUE]...
URL PATH BODY_FILE`` runs timed phases one after another on the same connections
(``CLIENTS:SECONDS``, ``:warmup`` for a phase that is not recorded): clients are
added or retired at each boundary (a retired client finishes the request it
has sent). A request belongs to the phase in which it was sent. Prints one JSON
object: ``phases`` (each recorded phase: clients, seconds, requests, rps,
p50_ms, p90_ms, p99_ms, errors, statuses) and ``total`` (the recorded phases
pooled).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np

#: A request unanswered this long counts as an error (``timeout``) and its connection is dropped.
TIMEOUT_S = 30.0


def build_request(host: str, path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """One POST; ``headers`` replace the default ``Content-Type: application/json``."""
    names = {k.lower() for k, _ in headers}
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    if "content-type" not in names:
        extra = "Content-Type: application/json\r\n" + extra
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status of one response, its body read (Content-Length or chunked), and
    whether the server closes the connection after it."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked, close = 0, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection" and value == b"close":
            close = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


async def _connection(
    host: str,
    port: int,
    request: bytes,
    counter: list[int],
    total: int,
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while counter[0] < total:
            counter[0] += 1
            t0 = time.perf_counter()
            writer.write(request)
            status, _ = await _read_response(reader)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def run(url: str, path: str, body: bytes, concurrency: int, requests: int) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(f"{host}:{port}", path, body)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = [0]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            _connection(host, port, request, counter, requests, latencies, statuses)
            for _ in range(concurrency)
        ),
        return_exceptions=True,
    )
    elapsed = time.perf_counter() - started
    failed_connections = sum(1 for r in results if isinstance(r, BaseException))
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    errors = sum(n for s, n in statuses.items() if s != 200) + (requests - len(latencies))
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "errors": errors,
        "failed_connections": failed_connections,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


# -- timed phases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    clients: int
    seconds: float
    record: bool = True


def parse_phases(text: str) -> list[Phase]:
    """``"32:3:warmup,32:10"`` -> phases."""
    out = []
    for part in text.split(","):
        clients, seconds, *flag = part.split(":")
        if flag not in ([], ["warmup"]):
            raise ValueError(f"bad phase {part!r}: CLIENTS:SECONDS[:warmup]")
        out.append(Phase(int(clients), float(seconds), record=not flag))
    if not out or any(p.clients < 1 or p.seconds <= 0 for p in out):
        raise ValueError(f"bad phases {text!r}")
    return out


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, status: str, latency: float | None) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if latency is not None:
            self.latencies.append(latency)


@dataclass
class _Driver:
    host: str
    port: int
    request: bytes
    tallies: list[_Tally]
    phase: int = 0
    active: int = 0
    running: set[int] = field(default_factory=set)

    async def client(self, index: int) -> None:
        """Client ``index`` sends while the current phase wants at least index + 1 clients."""
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while index < self.active:
                tally = self.tallies[self.phase]
                t0 = time.perf_counter()
                try:
                    async with asyncio.timeout(TIMEOUT_S):
                        if conn is None:
                            conn = await asyncio.open_connection(self.host, self.port)
                        conn[1].write(self.request)
                        status, close = await _read_response(conn[0])
                except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as e:
                    tally.count("timeout" if isinstance(e, TimeoutError) else "error", None)
                    if conn is not None:
                        conn[1].close()
                        conn = None
                    await asyncio.sleep(0.01)  # a refused connection is not retried in a hot loop
                    continue
                latency = time.perf_counter() - t0
                tally.count(str(status), latency if status == 200 else None)
                if close:
                    conn[1].close()
                    conn = None
        finally:
            self.running.discard(index)  # before any await: a later phase sees it gone
            if conn is not None:
                conn[1].close()


def _summary(phase: Phase | None, seconds: float, tally: _Tally) -> dict[str, object]:
    ms = np.asarray(tally.latencies, dtype=np.float64) * 1000.0
    ok = len(tally.latencies)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ms, q)), 3) if ms.size else None

    out: dict[str, object] = {} if phase is None else {"clients": phase.clients}
    out |= {
        "seconds": round(seconds, 3),
        "requests": sum(tally.statuses.values()),
        "rps": round(ok / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "errors": sum(n for s, n in tally.statuses.items() if s != "200"),
        "statuses": dict(sorted(tally.statuses.items())),
    }
    return out


async def run_phases(
    url: str, path: str, body: bytes, phases: Sequence[Phase], headers: Sequence[tuple[str, str]] = ()
) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = build_request(f"{host}:{port}", path, body, headers)
    driver = _Driver(host, port, request, [_Tally() for _ in phases])
    walls: list[float] = []
    async with asyncio.TaskGroup() as group:
        for k, phase in enumerate(phases):
            driver.phase, driver.active = k, phase.clients
            for index in range(phase.clients):
                if index not in driver.running:
                    driver.running.add(index)
                    group.create_task(driver.client(index))
            t0 = time.perf_counter()
            await asyncio.sleep(phase.seconds)
            walls.append(time.perf_counter() - t0)
        driver.active = 0  # every client finishes the request it has sent, then stops
    recorded = [(p, w, t) for p, w, t in zip(phases, walls, driver.tallies, strict=True) if p.record]
    pooled = _Tally()
    for _, _, t in recorded:
        pooled.latencies += t.latencies
        for s, n in t.statuses.items():
            pooled.statuses[s] = pooled.statuses.get(s, 0) + n
    return {
        "phases": [_summary(p, w, t) for p, w, t in recorded],
        "total": _summary(None, sum(w for _, w, _ in recorded), pooled),
    }


def _run_loop(coro: Coroutine[Any, Any, dict[str, object]]) -> dict[str, object]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: dict[str, object] = uvloop.run(coro)
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("--"):
        url, path, body_file, concurrency, requests = argv[:5]
        body = Path(body_file).read_bytes()
        result = _run_loop(run(url, path, body, int(concurrency), int(requests)))
    else:
        parser = argparse.ArgumentParser(prog="python -m smss.bench.loadgen")
        parser.add_argument("--phases", required=True, type=parse_phases)
        parser.add_argument("--header", action="append", default=[], help="NAME:VALUE (repeatable)")
        parser.add_argument("url")
        parser.add_argument("path")
        parser.add_argument("body_file", type=Path)
        args = parser.parse_args(argv)
        headers = [(k, v) for k, _, v in (h.partition(":") for h in args.header)]
        body = args.body_file.read_bytes()
        result = _run_loop(run_phases(args.url, args.path, body, args.phases, headers))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")


if __name__ == "__main__":
    main()
