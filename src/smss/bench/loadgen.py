"""A lean HTTP/1.1 load generator, run as its own process.

Closed loop: ``concurrency`` keep-alive connections, each sending the same
pre-built request as soon as the previous answer arrives. A hand-rolled client
(prebuilt bytes, one parse of the status line and Content-Length) keeps the
generator's own cost per request in the tens of microseconds, so the latency it
reports is the platform's, not the client library's.

``python -m smss.bench.loadgen URL PATH BODY_FILE CONCURRENCY REQUESTS`` prints
one JSON object: rps, p50_ms, p90_ms, p99_ms, errors, statuses.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import numpy as np


def build_request(host: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


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
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
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


def main() -> None:
    url, path, body_file, concurrency, requests = sys.argv[1:6]
    body = Path(body_file).read_bytes()
    try:
        import uvloop

        result = uvloop.run(run(url, path, body, int(concurrency), int(requests)))
    except ImportError:
        result = asyncio.run(run(url, path, body, int(concurrency), int(requests)))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")


if __name__ == "__main__":
    main()
