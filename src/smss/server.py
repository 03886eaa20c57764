"""Composition of one platform process: store, backend, controller, gateway.

``build`` wires the object graph from :class:`Settings`; ``serve`` runs it
under uvicorn until SIGINT/SIGTERM, then drains and stops every instance.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
from pathlib import Path

import uvicorn

from smss.api.app import create_app
from smss.api.auth import TokenAuth
from smss.api.context import AppContext
from smss.api.metrics import PrometheusMetrics
from smss.cluster.local import LocalBackend
from smss.config import Settings
from smss.control.controller import Controller
from smss.control.keepalive import FixedKeepAlive
from smss.node.channel import UnixChannel
from smss.packaging import package_class
from smss.platform import Platform
from smss.ports import SystemClock
from smss.store.artifacts import ArtifactStore
from smss.store.sqlite import SqliteRegistry

log = logging.getLogger(__name__)


def build(settings: Settings) -> AppContext:
    settings.check()
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    clock = SystemClock()
    metrics = PrometheusMetrics()
    backend = LocalBackend(
        data / "logs",
        start_timeout_s=settings.serving.start_timeout_s,
        weight_budget_bytes=settings.weight_cache_bytes,
        mode="exec" if settings.start_mode == "exec" else "fork",
    )
    controller = Controller(
        backend,
        UnixChannel.connect,
        clock,
        settings.serving,
        metrics,
        FixedKeepAlive(settings.serving.keep_alive_s),
    )
    registry = SqliteRegistry(data / "registry.db")
    platform = Platform(registry, ArtifactStore(data), controller, backend, clock)
    return AppContext(platform, settings, metrics, TokenAuth(settings.token, clock))


async def deploy_demo(platform: Platform, data_dir: Path) -> None:
    """Deploy the demo models (generated deterministically on first use) unless already deployed."""
    from smss.demo.generate import ensure_demo_artifacts
    from smss.packaging import load_class

    artifacts = await asyncio.to_thread(ensure_demo_artifacts, data_dir / "demo")
    for art in artifacts:
        _, cls = load_class(f"{art.source}:{art.class_name}")
        pkg = package_class(art.source, cls, art.weights)
        existing = platform.registry.get_function(pkg.spec.name)
        if existing is not None and existing.spec == pkg.spec:
            continue
        if pkg.weights is not None and pkg.weights_sha256 is not None:
            upload = platform.artifacts.upload_path(pkg.weights_sha256)
            if not upload.exists():
                shutil.copyfile(pkg.weights, upload)
        await platform.deploy(pkg.spec, pkg.source, pkg.weights_sha256)
        log.info("deployed demo model %s", pkg.spec.name)


class _Server(uvicorn.Server):
    """uvicorn server that deploys the demo models once the platform is up."""

    def __init__(self, config: uvicorn.Config, ctx: AppContext) -> None:
        super().__init__(config)
        self._ctx = ctx

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._ctx.settings.demo and not self.should_exit:
            await deploy_demo(self._ctx.platform, self._ctx.settings.data_dir)
        print(f"smss serving on http://{self._ctx.settings.host}:{self.config.port}", flush=True)


def serve(settings: Settings) -> None:
    ctx = build(settings)
    app = create_app(ctx)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        limit_concurrency=2048,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=int(settings.serving.drain_grace_s),
    )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        _Server(config, ctx).run()
    finally:
        ctx.platform.registry.close()
