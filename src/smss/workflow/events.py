"""The workflow log's record types.

Every event is a tagged msgspec struct, stored as msgpack (never pickle) with
a sequence number the log assigns. Order comes from ``seq``, never from
``ts`` (wall time, for humans only). Tensors are never in events: they are
content-addressed blobs, referenced by ``BlobRef`` (sha256 of the encoded tensor).
"""

from __future__ import annotations

import msgspec

BlobRef = str  # hex sha256 of the blob's bytes
TensorRefs = dict[str, BlobRef]


class RunStarted(msgspec.Struct, tag="RunStarted", frozen=True):
    workflow: str
    spec_hash: str
    session: str | None
    inputs: TensorRefs
    idempotency_key: str | None = None
    replay_of: str | None = None


class StageScheduled(msgspec.Struct, tag="StageScheduled", frozen=True):
    stage: str
    attempt: int


class StageStarted(msgspec.Struct, tag="StageStarted", frozen=True):
    stage: str
    attempt: int
    function: str
    inputs: TensorRefs
    state_version: int | None = None


class StageCompleted(msgspec.Struct, tag="StageCompleted", frozen=True):
    """The stage's recorded effect. At most one per (run, stage): a later one is
    dropped by the log. ``state_version`` is the session state version this
    completion wrote (the write is committed in the same transaction)."""

    stage: str
    attempt: int
    outputs: TensorRefs
    instance: str = ""
    node: str = ""
    state_version: int | None = None
    duration_ms: float = 0.0


class StageFailed(msgspec.Struct, tag="StageFailed", frozen=True):
    stage: str
    attempt: int
    error_type: str
    message: str
    traceback: str = ""
    instance: str = ""
    node: str = ""
    retryable: bool = True


class RunCompleted(msgspec.Struct, tag="RunCompleted", frozen=True):
    outputs: TensorRefs


class RunFailed(msgspec.Struct, tag="RunFailed", frozen=True):
    stage: str | None
    error_type: str
    message: str


class RunResumed(msgspec.Struct, tag="RunResumed", frozen=True):
    """An operator resumed a failed run: it is running again, completed stages
    stay completed, and each stage's retry budget starts afresh."""

    reason: str = "resumed"


class RunParked(msgspec.Struct, tag="RunParked", frozen=True):
    """The run cannot continue safely (its workflow changed under it); nothing more runs."""

    reason: str


Event = (
    RunStarted
    | StageScheduled
    | StageStarted
    | StageCompleted
    | StageFailed
    | RunCompleted
    | RunFailed
    | RunParked
    | RunResumed
)

TERMINAL = (RunCompleted, RunFailed, RunParked)


class Record(msgspec.Struct, frozen=True):
    """An event as stored: its run, its sequence number, its wall time."""

    seq: int
    run_id: str
    ts: float
    event: Event


class StateWrite(msgspec.Struct, frozen=True):
    """A conditional write of a session's state, committed atomically with the
    event it accompanies: it applies only if the stored version is ``expected``
    and, when ``base`` is given, the stored tensors are ``base`` (the state the
    write was computed from: a version number alone cannot tell two writers'
    states apart once one of them read a write that never took effect)."""

    workflow: str
    session: str
    expected: int
    tensors: TensorRefs
    base: TensorRefs | None = None


class SessionState(msgspec.Struct, frozen=True):
    version: int
    tensors: TensorRefs


class RunSummary(msgspec.Struct, frozen=True):
    run_id: str
    workflow: str
    session: str | None
    status: str  # running | completed | failed | parked
    created: float
    updated: float


def status_of(event: Event) -> str | None:
    if isinstance(event, RunCompleted):
        return "completed"
    if isinstance(event, RunFailed):
        return "failed"
    if isinstance(event, RunParked):
        return "parked"
    if isinstance(event, RunResumed):
        return "running"
    return None
