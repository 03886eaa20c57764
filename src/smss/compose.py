"""Composition of one platform process: store, backend, controller, gateway.

``build`` wires the object graph from :class:`Settings`; ``serve`` runs it
under uvicorn until SIGINT/SIGTERM. On SIGTERM it stops accepting connections,
lets the requests in flight finish (up to ``drain_grace_s``), stops every
instance and exits 0.

On a cluster the controller's process is built by the same ``build`` with the
cluster's parts (:class:`ClusterParts`: a backend whose nodes are elsewhere, a
channel factory that reaches them, the gateways' reported load); see
:mod:`smss.cluster`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import msgspec
import uvicorn

from smss import faults, heap
from smss.api.app import create_app
from smss.api.auth import MIN_TOKEN_CHARS, TokenAuth
from smss.api.connection import protocol_class
from smss.api.context import AppContext
from smss.api.metrics import PrometheusMetrics
from smss.app.platform import Platform
from smss.app.workflow_registry import PlatformCaller, WorkflowRegistry
from smss.config import Settings
from smss.control.controller import Controller
from smss.control.cost import load_prices
from smss.control.gateways import GatewayLoads
from smss.control.keepalive import parse_policy
from smss.control.metering import Meter, UsageSnapshot, decode_snapshot
from smss.control.router import Proximity
from smss.control.tiered import LatencyObjective
from smss.errors import SmssError
from smss.inventory import amount_text
from smss.node.agent import NODE, NodeAgent
from smss.node.channel import UnixChannel
from smss.node.devices import discover
from smss.packaging import package_class
from smss.ports import ChannelFactory, ClusterBackend, EventLog, RegistryStore, SystemClock, WorkflowStore
from smss.store.artifacts import ArtifactStore
from smss.store.blob_dir import BlobDirectory
from smss.store.log_options import Retention, log_hooks
from smss.store.sqlite import SqliteRegistry
from smss.store.sqlite_log import SqliteEventLog
from smss.store.sqlite_workflows import SqliteWorkflows
from smss.workflow.engine import Engine
from smss.workflow.spec import spec_hash, validate_workflow

log = logging.getLogger(__name__)


def _load_usage(path: Path) -> UsageSnapshot | None:
    """Usage metered before the last shutdown, so `smss cost` spans restarts."""
    try:
        return decode_snapshot(path.read_bytes())
    except (OSError, SmssError, msgspec.MsgspecError):
        return None


def _load_period(path: Path) -> float:
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return 0.0


def save_usage(ctx: AppContext) -> None:
    snapshot = ctx.platform.controller.meter.snapshot(time.monotonic())
    tmp = ctx.settings.data_dir / "usage.json.tmp"
    tmp.write_bytes(snapshot.to_json())
    os.replace(tmp, ctx.settings.data_dir / "usage.json")
    (ctx.settings.data_dir / "usage_period").write_text(str(ctx.metered_period_s()))


@dataclass(frozen=True)
class ClusterParts:
    """What a controller on a cluster is built with instead of the local node: the
    backend (agents on the cluster's nodes), the channels that reach their instances,
    the load the gateways elsewhere report, and where this process routes from."""

    backend: ClusterBackend
    channels: ChannelFactory
    gateways: GatewayLoads
    proximity: Callable[[], Proximity]


def build(settings: Settings, cluster: ClusterParts | None = None) -> AppContext:
    """The object graph of one platform process. Raises SmssError (before anything is
    created) on settings this machine cannot honour, e.g. ``--cpus`` above its cores."""
    settings.check()
    faults.install(settings.faults)  # InvalidSpec on a bad spec, before anything starts
    if settings.faults:
        log.warning("fault points switched on: %s", settings.faults)
    if settings.token is not None and len(settings.token) < MIN_TOKEN_CHARS:
        log.warning(
            "the admin token has fewer than %d characters: use a long random one "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            MIN_TOKEN_CHARS,
        )
    backend: ClusterBackend
    if cluster is None:
        backend = local_node(settings)  # InvalidSpec on caps the machine cannot honour: nothing made yet
        channels: ChannelFactory = functools.partial(
            UnixChannel.connect, write_timeout_s=settings.serving.write_timeout_s
        )
    else:
        backend, channels = cluster.backend, cluster.channels
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)
    clock = SystemClock()
    metrics = PrometheusMetrics()
    controller = Controller(
        backend,
        channels,
        clock,
        settings.serving,
        metrics,
        parse_policy(
            settings.keep_alive_policy or f"fixed:{settings.serving.keep_alive_s}",
            settings.serving.keep_alive_s,
            objective=LatencyObjective(settings.latency_objective_ms, settings.latency_percentile),
            prices=load_prices(settings.prices_path),
        ),
        Meter(_load_usage(data / "usage.json")),
        gateways=cluster.gateways if cluster else None,
        proximity=cluster.proximity if cluster else None,
        # The tiers of readiness are the local node's (a Ray backend leaves them to its agents).
        tiers=backend if isinstance(backend, NodeAgent) else None,
    )
    stores = open_stores(settings)
    registry, event_log = stores.registry, stores.log
    workflows = WorkflowRegistry(stores.workflows, controller, shared=settings.store.postgres)
    engine = Engine(
        event_log,
        PlatformCaller(controller, clock, settings.serving),
        workflows.get,
        clock,
        settings.workflows,
        # With other engines on the log: resume the runs of any whose heartbeat stopped.
        rescan_s=max(0.5, settings.store.run_lease_s / 4) if settings.store.postgres else None,
    )
    platform = Platform(
        registry, ArtifactStore(data), controller, backend, clock, workflows, engine, event_log
    )
    ctx = AppContext(
        platform,
        settings,
        metrics,
        TokenAuth(settings.token, clock),
        prices=load_prices(settings.prices_path),
        previous_period_s=_load_period(data / "usage_period"),
    )
    ctx.on_shutdown += [
        lambda: save_usage(ctx),
        registry.close,
        workflows.close,
        event_log.close,
        stores.close,
    ]
    return ctx


def local_node(settings: Settings) -> NodeAgent:
    """This machine's node agent, the local backend."""
    inventory = discover(
        NODE,
        cpus=settings.cpus,
        memory_mb=settings.memory_mb,
        visible=settings.cuda_visible_devices,
    )
    for d in inventory.devices:
        log.info(
            "device %s (%s): capacity %s, reserved %s",
            d.key,
            d.name,
            amount_text(d.kind, d.capacity),
            amount_text(d.kind, d.reserved),
        )
    data = settings.data_dir
    data.mkdir(parents=True, exist_ok=True)  # after discovery: a refused cap makes nothing
    return NodeAgent(
        data / "logs",
        start_timeout_s=settings.serving.start_timeout_s,
        weight_budget_bytes=settings.weight_cache_bytes,
        mode="exec" if settings.start_mode == "exec" else "fork",
        spares=settings.spares,
        inventory=inventory,
        state_file=data / "node.json",
        adopt_window_s=settings.adopt_window_s,
    )


@dataclass(frozen=True)
class Stores:
    registry: RegistryStore
    workflows: WorkflowStore
    log: EventLog
    #: Releases what the three share (the PostgreSQL pool), after each was closed.
    close: Callable[[], None]


def open_stores(settings: Settings) -> Stores:
    """The registry, workflow definitions and workflow log of ``settings.store``: SQLite
    files in the data directory, or one PostgreSQL schema; blobs in the log's database
    or in ``--blob-dir``. Raises StorageUnavailable (StorageUnreachable) when they
    cannot be opened."""
    data, store, limits = settings.data_dir, settings.store, settings.workflows
    retention = (
        None
        if math.isinf(limits.log_retention_s)
        else Retention(limits.log_retention_s, every_s=limits.compact_every_s)
    )
    blobs = None if store.blob_dir is None else BlobDirectory(store.blob_dir)
    if not store.postgres:
        sqlite_log = SqliteEventLog(data / "log.db", fault=log_hooks(), retention=retention, blobs=blobs)
        return Stores(
            SqliteRegistry(data / "registry.db"), SqliteWorkflows(data / "workflows.db"), sqlite_log, _nothing
        )
    from smss.store._pg import PgDatabase
    from smss.store.postgres import PgRegistry, PgWorkflows
    from smss.store.postgres_log import PgEventLog

    db = PgDatabase(store.url, owner=engine_id(data))
    try:
        log_ = PgEventLog(db, fault=log_hooks(), retention=retention, blobs=blobs, lease_s=store.run_lease_s)
    except BaseException:
        db.close()
        raise
    log.info("store: PostgreSQL %s, schema %s, engine %s", db.url.redacted, db.schema, db.owner)
    return Stores(PgRegistry(db), PgWorkflows(db), log_, db.close)


def _nothing() -> None:
    pass


def engine_id(data: Path) -> str:
    """This data directory's engine, as the PostgreSQL log names the owner of a run:
    kept in the directory, so that a platform restarted on it resumes its runs at once
    (any other engine waits until it has seen its heartbeat stop for ``--run-lease``)."""
    path = data / "engine-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        name = f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        tmp = data / "engine-id.tmp"
        tmp.write_text(name)
        os.replace(tmp, path)
        return name


async def deploy_demo(platform: Platform, data_dir: Path) -> None:
    """Deploy the demo models (generated deterministically on first use) unless already deployed."""
    from smss.demo.behavior import behavior_workflow
    from smss.demo.generate import BEHAVIOR_MODELS, DEMO_MODELS, ensure_artifact, missing
    from smss.packaging import load_class

    dest = data_dir / "demo"
    names = (*DEMO_MODELS, *BEHAVIOR_MODELS)
    if todo := missing(dest, names):
        # Generating imports torch and onnx: in a process of its own, where the model
        # runtimes live, so that this gateway never imports one.
        generator = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "smss.demo.generate", str(dest), *todo, stdin=asyncio.subprocess.DEVNULL
        )
        if await generator.wait() != 0:
            raise RuntimeError(f"generating the demo weights failed (exit status {generator.returncode})")
    artifacts = [ensure_artifact(dest, name) for name in names]  # all there now: nothing generated
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
    workflow = behavior_workflow()
    existing_wf = platform.workflows.find(workflow.name)
    if existing_wf is None or spec_hash(existing_wf) != spec_hash(
        validate_workflow(workflow, platform.workflows.functions())
    ):
        platform.workflows.deploy(workflow)
        log.info("deployed demo workflow %s", workflow.name)


class _Server(uvicorn.Server):
    """uvicorn server that deploys the demo models once the platform is up."""

    def __init__(self, config: uvicorn.Config, ctx: AppContext) -> None:
        super().__init__(config)
        self._ctx = ctx

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._ctx.settings.demo and not self.should_exit:
            await deploy_demo(self._ctx.platform, self._ctx.settings.data_dir)
            self._ctx.ready = True
        # What is alive now lives as long as the server: full collections skip it.
        heap.settle()
        print(f"smss serving on http://{self._ctx.settings.host}:{self.config.port}", flush=True)


def serve(settings: Settings) -> None:
    run(build(settings))


def run(ctx: AppContext) -> None:
    """Serve a built platform under uvicorn until SIGINT/SIGTERM."""
    settings = ctx.settings
    app = create_app(ctx)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=protocol_class(settings.serving),
        log_config=None,
        access_log=False,
        # The connection cap is the protocol's (a JSON 503 with Retry-After); uvicorn's
        # own limit, a plain-text 503, only bounds the tasks of requests whose
        # clients went away, above it.
        limit_concurrency=2 * settings.serving.max_connections + 64,
        timeout_keep_alive=30,
        # How long uvicorn waits for the requests in flight once it stopped accepting.
        timeout_graceful_shutdown=max(1, math.ceil(settings.serving.drain_grace_s)),
    )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # The gateway only forks to exec (zygotes, exec-mode instances) and no child uses
    # gRPC: grpc's fork handlers would only pause its threads around each spawn.
    # Read by grpc when it is first imported (by the app's lifespan, below).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    # uvicorn handles SIGTERM (drain, then the lifespan's shutdown) and afterwards
    # raises it again under the handler it found: this one, so that a drained stop
    # ends with exit status 0 instead of death by the signal.
    previous = signal.signal(signal.SIGTERM, _drained)
    try:
        _Server(config, ctx).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _drained(signum: int, frame: FrameType | None) -> None:
    log.info("stopped on SIGTERM after draining")
