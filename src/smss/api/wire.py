"""The JSON bodies of the REST routes, as types.

Handlers build their responses as these types (mypy checks each key), and the
OpenAPI document derives every schema from them (:mod:`smss.api.operations`),
so the document says what the handlers send. Request bodies are the msgspec
structs the handlers decode (``DeployRequest``, ``RunRequest``, ...), beside
the handlers that use them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, TypedDict

import msgspec

from smss.app.platform import InstanceStatus
from smss.inventory import DeviceReport
from smss.spec import FunctionSpec
from smss.workflow.events import RunSummary
from smss.workflow.spec import WorkflowSpec

# --- requests ------------------------------------------------------------------------------


class DeployRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    spec: FunctionSpec
    source: str
    weights_sha256: str | None = None


class TierRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Put a function with no instance in this tier now: ``standby``, ``resident``,
    ``cold`` or ``no_runtime`` (its runtime's zygote stops)."""

    tier: Literal["standby", "resident", "cold", "no_runtime"]


class TrafficRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a name's unversioned requests go: ``default`` (null: the first version
    deployed) and a canary ``split`` of versions to shares in [0, 1], the rest going to
    the default. A field left out keeps its current value."""

    default: str | msgspec.UnsetType | None = msgspec.UNSET
    split: dict[str, float] | msgspec.UnsetType = msgspec.UNSET


class RunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``inputs``: a list of tensors as in an infer request (decoded once the workflow's
    inputs are known)."""

    inputs: msgspec.Raw
    session: str | None = None
    wait: bool = True
    #: How long a waiting caller waits (at most an hour); a run goes on past it.
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    durable: bool = True


class ReplayRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    stage: str = msgspec.field(name="from")
    wait: bool = True


class RunsQuery(msgspec.Struct, frozen=True):
    """The query of ``GET /v1/runs``."""

    status: str | None = None
    workflow: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class InferHeaders(msgspec.Struct, frozen=True):
    """Headers of an infer request. With the binary extension the body starts with this
    many bytes of JSON, followed by the raw tensors. ``x-request-timeout-seconds``: the
    seconds this request may take, cut to the server's maximum (smss.api.deadlines)."""

    header_length: int | None = msgspec.field(default=None, name="Inference-Header-Content-Length")
    request_timeout: Annotated[float, msgspec.Meta(gt=0)] | None = msgspec.field(
        default=None, name="x-request-timeout-seconds"
    )


# --- responses -----------------------------------------------------------------------------


class ErrorBody(TypedDict):
    """Every error: a plain message and a stable code."""

    error: str
    code: str
    #: A model error's id in the server log, where its message and traceback are.
    request_id: NotRequired[str]


class Live(TypedDict):
    live: bool


class Ready(TypedDict):
    ready: bool


class ServerMetadata(TypedDict):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(TypedDict):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(TypedDict):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(TypedDict):
    name: str
    ready: bool


class BinaryParameters(TypedDict):
    binary_data_size: int


class TensorJson(TypedDict):
    """One tensor in JSON form: ``data`` flat, row-major (``NaN`` / ``Infinity`` tokens
    for non-finite floats, as Triton writes them)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | msgspec.Raw


class OutputTensor(TypedDict):
    """An output tensor: ``data`` in JSON, or (binary extension) ``parameters`` giving
    the size of its bytes, which follow the JSON header in output order."""

    name: str
    datatype: str
    shape: list[int]
    data: NotRequired[list[Any] | msgspec.Raw]
    parameters: NotRequired[BinaryParameters]


class InferResponse(TypedDict):
    model_name: str
    model_version: str
    id: NotRequired[str]
    outputs: list[OutputTensor]


RepositoryState = Literal["READY", "UNAVAILABLE", "UNLOADED"]


class RepositoryEntry(TypedDict):
    name: str
    version: str
    state: RepositoryState
    reason: str


class Empty(TypedDict):
    pass


class Uploaded(TypedDict):
    sha256: str
    size: int


class Deployed(TypedDict):
    name: str
    version: str
    generation: int


class FunctionJson(TypedDict):
    name: str
    version: str
    generation: int
    runtime: str
    spec: FunctionSpec
    instances: list[InstanceStatus]
    starting: int
    queued: int
    cold_starts: int
    last_error: str | None
    state: str
    replaced: int
    #: Its tier of readiness: warm, standby, resident, cold, no_runtime (None: unknown).
    tier: str | None


class FunctionList(TypedDict):
    functions: list[FunctionJson]


class TrafficJson(TypedDict):
    name: str
    default: str
    split: dict[str, float]


class Deleted(TypedDict):
    deleted: str


class Stepped(TypedDict):
    name: str
    tier: str | None


class Evicted(TypedDict):
    name: str
    evicted: bool


class Devices(TypedDict):
    devices: list[DeviceReport]


class ClusterNode(msgspec.Struct, frozen=True):
    """One node of the platform: its id, address, relay and gateway (None: none serves there)."""

    node: str
    ip: str = ""
    relay: str = ""
    gateway: str | None = None


class ClusterJson(msgspec.Struct, frozen=True):
    """``GET /v1/cluster``: the backend (``local`` or ``ray``), its nodes, and the round
    trips the agents measured between them (ms, from the outer key's node to the inner's)."""

    backend: str
    nodes: list[ClusterNode]
    rtt_ms: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)


#: Per node: entries, bytes, budget_bytes, hits, misses, evictions, templates.
WeightCache = dict[str, dict[str, Any]]
LogStats = dict[str, int]


class WorkflowList(TypedDict):
    workflows: list[WorkflowSpec]


class WorkflowDeployed(TypedDict):
    name: str
    stages: list[str]


class RunOutcomeJson(TypedDict):
    run_id: str
    status: str  # running | completed | failed | parked
    outputs: NotRequired[dict[str, TensorJson]]
    error: NotRequired[str]


class RunList(TypedDict):
    runs: list[RunSummary]


class RunDetail(TypedDict):
    run_id: str
    status: str
    outputs: dict[str, TensorJson] | None
    error: NotRequired[str]
    workflow: str
    session: str | None
    events: list[dict[str, Any]]
