"""Typed, frozen settings. The only module that reads environment variables;
it does so when :func:`from_env` is called at an entry point, never at import."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from smss.errors import InvalidSpec


@dataclass(frozen=True)
class Limits:
    """Input limits, checked before anything is allocated."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_upload_bytes: int = 4 * 1024 * 1024 * 1024
    max_inputs: int = 64
    max_tensor_elements: int = 64 * 1024 * 1024
    #: Elements of one BYTES tensor: each becomes a Python ``bytes`` object (tens of bytes
    #: of overhead), so strings get a tighter bound than numbers to keep memory flat.
    max_bytes_elements: int = 1024 * 1024
    max_json_depth: int = 64


@dataclass(frozen=True)
class ServingSettings:
    """Data-plane settings of every function unless its spec overrides them."""

    keep_alive_s: float = 300.0
    queue_limit: int = 256
    request_timeout_s: float = 60.0
    start_timeout_s: float = 120.0
    retry_after_s: float = 1.0
    tick_s: float = 0.2
    drain_grace_s: float = 10.0
    #: An instance holding a request this long past the request's deadline is stalled
    #: (a hung predict): it is replaced.
    stall_grace_s: float = 5.0
    #: Every ready instance is pinged this often; one that does not answer within
    #: ``ping_timeout_s`` (a stopped process) is replaced.
    health_interval_s: float = 1.0
    ping_timeout_s: float = 3.0
    #: How long an instance may take nothing from its connection (requests queued for
    #: it) before it counts as lost.
    write_timeout_s: float = 5.0
    #: Consecutive failed starts of a function before no more are tried (its requests
    #: then get 503 naming the last failure until it is redeployed or loaded again).
    max_start_failures: int = 6
    #: A request's headers must be in within this long of its first byte; a body may go
    #: this long without a byte arriving. Slower clients get 408 and are closed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    #: A connection closed while its request body still arrives (an early 413) reads and
    #: drops the rest for at most this long, so the client can read the answer.
    linger_s: float = 30.0
    #: Client connections held at once; one more is answered 503 with ``Retry-After``
    #: and closed, so idle or slow clients cannot take every socket (the header
    #: timeout then frees the idle ones). Connections already open are unaffected.
    max_connections: int = 1024


@dataclass(frozen=True)
class WorkflowLimits:
    """Bounds on what clients can make the workflow engine hold."""

    #: Runs driven at once (with or without a waiting caller); one more is refused (429).
    max_runs: int = 10_000
    #: Sessions whose state non-durable runs (``durable: false``) keep in memory; past
    #: it the least recently used session's state is dropped.
    max_direct_sessions: int = 10_000
    #: A non-durable session's state unused for this long is dropped.
    direct_state_ttl_s: float = 3600.0
    #: Finished runs (and the blobs only they refer to) are removed from the log this
    #: long after they finished (``inf``: never); checked at most every ``compact_every_s``.
    log_retention_s: float = 7 * 86400.0
    compact_every_s: float = 60.0


@dataclass(frozen=True)
class ClusterSettings:
    """``smss serve --backend ray``: where the Ray cluster is and how it is watched."""

    #: A Ray cluster's address (``host:port`` of its GCS), ``auto`` (the one this machine
    #: runs, as ``ray start`` recorded it) or ``local`` (start one here, for trying it).
    address: str = "auto"
    #: Ray node ids (or their IP addresses) that run a gateway; empty: every node.
    gateway_nodes: tuple[str, ...] = ()
    #: How often agents report (heartbeat) and probe each other's round trips.
    heartbeat_s: float = 0.5
    probe_interval_s: float = 1.0
    #: An agent silent this long is gone: its node's instances are dropped (they are
    #: replaced sooner, as soon as their connections end or a health check fails), its
    #: agent killed. Generous, so a loaded node is not declared dead by mistake.
    node_timeout_s: float = 5.0
    #: The Ray namespace of SMSS's named actors.
    namespace: str = "smss"


@dataclass(frozen=True)
class StoreSettings:
    """Where the registry, the workflow definitions, the workflow log and session state live."""

    #: ``sqlite`` (files in the data directory: the embedded default) or a PostgreSQL URL,
    #: ``postgresql://user@host:port/db?schema=NAME`` (see :mod:`smss.store._pg`), for
    #: several gateways and engines on several nodes.
    url: str = "sqlite"
    #: Workflow blobs (intermediate tensors) in this directory, one every node can reach,
    #: instead of in the log's database.
    blob_dir: Path | None = None
    #: PostgreSQL: seconds without a heartbeat after which an engine counts as dead: the
    #: runs of one that died are resumed by a live one about this long after.
    run_lease_s: float = 10.0

    @property
    def postgres(self) -> bool:
        return self.url != "sqlite"

    def check(self) -> None:
        if self.url != "sqlite" and not self.url.startswith(("postgresql://", "postgres://")):
            raise InvalidSpec(f"--store takes sqlite or a postgresql:// URL, not {self.url.split(':')[0]!r}")
        if not (math.isfinite(self.run_lease_s) and self.run_lease_s > 0):
            raise InvalidSpec(f"--run-lease must be a positive number of seconds, not {self.run_lease_s:g}")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    #: The Open Inference Protocol's gRPC service; 0 serves none (needs the ``grpc`` extra).
    grpc_port: int = 0
    data_dir: Path = field(default_factory=lambda: Path.home() / ".smss")
    token: str | None = None
    #: Host names, besides loopback and the bound address, that requests may name in
    #: their Host header (see smss.api.cross_site).
    allowed_hosts: tuple[str, ...] = ()
    demo: bool = False
    log_level: str = "info"
    #: Budget of each node's weight store; None = a quarter of the node's memory capacity (--memory).
    weight_cache_bytes: int | None = None
    #: "fork" (zygote + template, the fast path) or "exec" (a new interpreter per instance).
    start_mode: str = "fork"
    #: Each model template keeps its next instance forked and rehearsed (smss.node.spare).
    spares: bool = True
    #: How long instances outlive a killed ``smss serve``, waiting for the next one on
    #: this data directory to adopt them (fork mode); 0: they die with it.
    adopt_window_s: float = 30.0
    #: Keep-alive policy of every function without its own keep_alive_s: "fixed:SECONDS",
    #: "hybrid" or "tiered" (smss.control.keepalive).
    keep_alive_policy: str | None = None
    #: The latency a start may add at ``latency_percentile`` (the tiered policy keeps it).
    latency_objective_ms: float = 10.0
    latency_percentile: float = 99.0
    #: A TOML price table overriding the defaults (see smss.control.cost).
    prices_path: Path | None = None
    #: Cores / host memory (MiB) the platform may place on this node; None = what the
    #: machine has less the platform's reserve (see smss.node.devices).
    cpus: float | None = None
    memory_mb: int | None = None
    #: ``CUDA_VISIBLE_DEVICES`` of the server: the GPUs the platform may use (None = all).
    cuda_visible_devices: str | None = None
    #: ``local`` (this machine's node agent) or ``ray`` (agents on a Ray cluster's nodes).
    backend: str = "local"
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    limits: Limits = field(default_factory=Limits)
    serving: ServingSettings = field(default_factory=ServingSettings)
    workflows: WorkflowLimits = field(default_factory=WorkflowLimits)
    store: StoreSettings = field(default_factory=StoreSettings)
    #: Fault points to switch on (``SMSS_FAULT``, grammar in :mod:`smss.faults`): tests only.
    faults: str | None = None
    #: ``--allow-faults``: without it a platform refuses to start with ``faults`` set.
    allow_faults: bool = False

    def check(self) -> Settings:
        """Refuse settings that would expose code execution: deploying a model
        runs its code, so an open deploy route on a network is remote code execution."""
        if not is_loopback(self.host) and not self.token:
            raise InvalidSpec(
                f"refusing to bind {self.host} without a token: deploying a model runs its "
                "code, so an open admin API on a network is remote code execution. "
                "Set --token or SMSS_TOKEN, or bind 127.0.0.1."
            )
        if not 0 < self.port < 65536 and self.port != 0:
            raise InvalidSpec(f"invalid port {self.port}")
        if not 0 <= self.grpc_port < 65536 or (self.grpc_port and self.grpc_port == self.port):
            raise InvalidSpec(f"invalid gRPC port {self.grpc_port} (0 for none; not the HTTP port)")
        timeout = self.serving.request_timeout_s
        if not (math.isfinite(timeout) and timeout > 0):
            raise InvalidSpec(f"the request timeout must be a positive number of seconds, not {timeout:g}")
        if self.backend not in ("local", "ray"):
            raise InvalidSpec(f"--backend must be 'local' or 'ray', not {self.backend!r}")
        if self.backend == "ray" and self.start_mode != "fork":
            raise InvalidSpec("--backend ray starts instances by fork only (--start-mode fork)")
        if self.start_mode not in ("fork", "exec"):
            raise InvalidSpec(f"start mode must be 'fork' or 'exec', not {self.start_mode!r}")
        if self.cpus is not None and not (math.isfinite(self.cpus) and self.cpus > 0):
            raise InvalidSpec(f"--cpus must be a positive number of cores, not {self.cpus:g}")
        for name, value in (
            ("header timeout", self.serving.header_timeout_s),
            ("body timeout", self.serving.body_timeout_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise InvalidSpec(f"the {name} must be a positive number of seconds, not {value:g}")
        if not (math.isfinite(self.serving.drain_grace_s) and self.serving.drain_grace_s >= 0):
            raise InvalidSpec(
                f"--drain-timeout must be 0 or more seconds, not {self.serving.drain_grace_s:g}"
            )
        if self.serving.queue_limit < 1:
            raise InvalidSpec(f"--queue-limit must be at least 1, not {self.serving.queue_limit}")
        if self.serving.max_connections < 1:
            raise InvalidSpec(f"--max-connections must be at least 1, not {self.serving.max_connections}")
        if self.serving.max_start_failures < 1:
            raise InvalidSpec(
                f"--max-start-failures must be at least 1, not {self.serving.max_start_failures}"
            )
        if not (math.isfinite(self.adopt_window_s) and self.adopt_window_s >= 0):
            raise InvalidSpec(f"--adopt-window must be 0 or more seconds, not {self.adopt_window_s:g}")
        if self.memory_mb is not None and self.memory_mb < 1:
            raise InvalidSpec(f"--memory must be at least 1 MiB, not {self.memory_mb} MiB")
        if not self.workflows.log_retention_s >= 0:
            raise InvalidSpec(f"--log-retention must be >= 0 seconds, not {self.workflows.log_retention_s}")
        self.store.check()
        if self.faults and not self.allow_faults:
            raise InvalidSpec(
                "refusing to start with SMSS_FAULT set: fault points crash or stall the platform "
                "on purpose, for tests. Unset it, or pass --allow-faults in a test."
            )
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"512M"``, ``"4G"``, ``"1073741824"`` -> bytes."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        raise InvalidSpec(f"invalid size {text!r}: use e.g. 512M or 4G") from None
    if value <= 0:
        raise InvalidSpec(f"size must be positive, not {text!r}")
    return int(value * _UNITS[unit])


def env_faults() -> str | None:
    """``SMSS_FAULT``: fault points to switch on (see :mod:`smss.faults`), or None."""
    return os.environ.get("SMSS_FAULT") or None


def env_token() -> str | None:
    return os.environ.get("SMSS_TOKEN") or None


def env_url() -> str:
    return os.environ.get("SMSS_URL", "http://127.0.0.1:8000")


def env_cuda_visible_devices() -> str | None:
    """``CUDA_VISIBLE_DEVICES``: the GPUs the platform may use (unset: all of them)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def env_keep_alive() -> float | None:
    """``SMSS_KEEP_ALIVE_S`` overrides the default keep-alive (tests and demos)."""
    raw = os.environ.get("SMSS_KEEP_ALIVE_S")
    return float(raw) if raw else None


def read_flags_file(path: Path, known: Iterable[str]) -> dict[str, object]:
    """The settings of a TOML file for ``smss serve --config``: keys named as the flags
    (``request-timeout`` or ``request_timeout``), top-level or in a ``[serve]`` table;
    returned by parameter name (``request_timeout``). A key no flag has, or a file that
    cannot be read or parsed, is :class:`InvalidSpec` naming it."""
    import tomllib

    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise InvalidSpec(f"cannot read {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"{path} is not valid TOML: {e}") from None
    table = doc.get("serve", doc)
    if not isinstance(table, dict):
        raise InvalidSpec(f"{path}: [serve] must be a table")
    names = set(known)
    out: dict[str, object] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in names:
            raise InvalidSpec(f"{path}: no setting {key!r}; the settings are the flags of smss serve")
        out[name] = value
    return out
