"""A burst at zero (RELIABILITY 16): 200 requests at once to a function with no instance
and a queue bound of 40. One instance is started (its ``max_instances``); the requests
the queue holds wait for it and are all served with the right answer; the rest are
refused at once with 429 (queue full) and ``Retry-After``, never left hanging or 5xx.
A real ``smss serve`` and real worker processes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from smss.client import Client
from smss.testing.server import start_server

pytestmark = pytest.mark.slow

MODEL = Path(__file__).parent / "models" / "burst.py"
ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}
QUEUE_LIMIT = 40
BURST = 200
REQUEST_TIMEOUT_S = 120.0


async def burst(url: str, n: int) -> list[httpx.Response]:
    """``n`` requests sent at once, each on its own connection; request k sends x = [k]."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/v2/models/burst/infer",
                    json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [float(k)]}]},
                )
                for k in range(n)
            )
        )


def function(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/functions/burst", timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_a_burst_at_zero_starts_one_instance_serves_the_queue_and_refuses_the_rest(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "data", ["--queue-limit", str(QUEUE_LIMIT), "--keep-alive", "300"], env=ENV
    )
    try:
        with Client(server.url) as client:
            client.deploy(f"{MODEL}:Burst")
        before = function(server.url)
        assert before["instances"] == []
        assert before["cold_starts"] == 0

        responses = asyncio.run(burst(server.url, BURST))

        served = [(k, r) for k, r in enumerate(responses) if r.status_code == 200]
        refused = [r for r in responses if r.status_code != 200]
        # Every request the queue held was served, each with its own answer.
        assert len(served) >= QUEUE_LIMIT, [r.status_code for r in responses]
        for k, r in served:
            assert r.json()["outputs"][0]["data"] == [2.0 * k]
        # The rest were refused as overload, with a time to come back: nothing else.
        assert refused, "a single 5-per-second instance cannot have served 200 at once"
        for r in refused:
            assert r.status_code == 429, (r.status_code, r.text)
            assert r.json()["code"] == "overloaded", r.text
            assert int(r.headers["retry-after"]) >= 1
        # One start for the whole burst, and nothing left queued or in flight.
        after = function(server.url)
        assert after["cold_starts"] == 1, after
        assert len(after["instances"]) == 1
        assert after["queued"] == 0
        assert all(i["in_flight"] == 0 for i in after["instances"])
        # Once the burst is over, the function serves again at once.
        (again,) = asyncio.run(burst(server.url, 1))
        assert again.status_code == 200
    finally:
        assert server.stop() == 0, server.log()[-4000:]
