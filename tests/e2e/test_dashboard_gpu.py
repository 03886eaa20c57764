"""The Nodes page draws a GPU's memory map where a node reports one. No GPU here: the
dashboard's own files are served beside canned answers of the routes it reads (the
shapes of smss.inventory.DeviceReport and the weight store), in headless Chromium."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from browser import launch, open_page
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from smss.api import dashboard
from smss.testing.server import free_port

ZERO = {"cpu": 0.0, "memory_mb": 0, "gpu": 0.0, "gpu_memory_mb": 0}


def _device(
    kind: str, index: int, name: str, capacity: dict[str, Any], placed: list[dict[str, Any]]
) -> dict[str, Any]:
    allocated = dict(ZERO)
    for a in placed:
        side = a["gpu"] if kind == "cuda" else a["cpu"]
        for k in allocated:
            allocated[k] += side[k]
    return {
        "node": "local",
        "kind": kind,
        "index": index,
        "name": name,
        "capacity": capacity,
        "total": capacity,
        "reserved": ZERO,
        "allocated": allocated,
        "placed": placed,
        "free_memory_mb": 140_000 if kind == "cuda" else None,
    }


def _alloc(id_: str, kind: str, gpu_mb: int) -> dict[str, Any]:
    return {
        "id": id_,
        "function": "llm",
        "kind": kind,
        "node": "local",
        "cpu": {**ZERO, "memory_mb": 64},
        "gpu": {**ZERO, "gpu": 0.5 if kind == "instance" else 0.0, "gpu_memory_mb": gpu_mb},
        "gpu_index": 0,
        "idle_since": None,
        "evictable": False,
    }


GPU_PLACED = [_alloc("llm-1", "instance", 30_000), _alloc("weights:llm@g1", "weights", 16_000)]
DEVICES = [
    _device("cpu", 0, "CPU", {**ZERO, "cpu": 16.0, "memory_mb": 120_000}, []),
    _device("cuda", 0, "NVIDIA H200", {**ZERO, "gpu": 1.0, "gpu_memory_mb": 143_000}, GPU_PLACED),
]
STORE = {
    "local": {
        "entries": 1,
        "bytes": 2**30,
        "budget_bytes": 2**34,
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "models": ["llm@g1"],
        "templates": {},
        "zygotes": {"torch": {"pid": 7}},
    }
}
COST = {
    "period_s": 1.0,
    "functions": {},
    "total": {
        "invocations": 0,
        "alive_s": 0,
        "busy_s": 0,
        "memory_gb_s": 0,
        "cost_usd": 0.0,
        "containers": 0,
        "container_cost_usd": 0.0,
        "cost_ratio": None,
    },
}


def _app() -> Starlette:
    def answer(body: object) -> Any:
        async def handler(request: Request) -> Response:
            return JSONResponse(body)

        return handler

    async def metrics(request: Request) -> Response:
        return PlainTextResponse("# nothing yet\n")

    return Starlette(
        routes=[
            *dashboard.routes(token_required=False),
            Route("/v1/functions", answer({"functions": []})),
            Route("/v1/devices", answer({"devices": DEVICES})),
            Route("/v1/weights", answer(STORE)),
            Route("/v1/cost", answer(COST)),
            Route("/metrics", metrics),
        ]
    )


@pytest.fixture
def url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def test_a_gpus_memory_map(url: str) -> None:
    with launch() as browser, open_page(browser) as page:
        p = page.page
        p.goto(f"{url}/ui#nodes")
        p.wait_for_selector("text=cuda:0 NVIDIA H200", timeout=30_000)
        card = p.locator("section.card", has_text="cuda:0 NVIDIA H200")
        text = card.inner_text()
        assert "44.9 GiB allocated of 139.6 GiB"  # 30,000 + 16,000 MiB in text
        assert "0.5 of 1 GPU" in text
        assert card.locator(".memmap .seg.instance").count() == 1
        assert card.locator(".memmap .seg.weights").count() == 1
        assert "torch (pid 7)" in p.locator("section.card", has_text="weight store").inner_text()
        page.screenshot("dashboard-gpu")
        assert not page.problems, page.problems
