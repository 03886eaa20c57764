"""What one request of the workflow log writes, in the writer's open transaction:
the SQL of a run's start and of an append, and the encoding of rows. Shared by both
backends (:mod:`smss.store.sqlite_log`, :mod:`smss.store.postgres_log`) through
:class:`smss.store._log_tx.Tx`.

Each request checks first and writes after: it raises an :class:`~smss.errors.SmssError`
(a refusal of this request alone) only before its first write, so the transaction
it shares with other requests never holds part of a refused one. With several
writers (PostgreSQL) the checks run under the run's row lock (``Tx.lock_run``) and
the locks of the idempotency key, run id and session they read, so no other writer's
record can come between a check and the write it allows."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from smss.errors import Conflict, NotFound, SmssError, StorageUnavailable
from smss.ports import AppendResult, BlobStore
from smss.store._log_tx import Tx
from smss.workflow.events import (
    Event,
    RunCompleted,
    RunStarted,
    StageCompleted,
    StageStarted,
    StateWrite,
    status_of,
)

logger = logging.getLogger("smss.store.log")

encode = msgspec.msgpack.encode
_event_decoder = msgspec.msgpack.Decoder(Event)
_refs_decoder = msgspec.msgpack.Decoder(dict[str, str])


@dataclass(frozen=True)
class Row:
    type: str
    stage: str | None
    attempt: int | None
    body: bytes
    status: str | None
    #: The blob refs the event names (kept in ``blob_refs`` for compaction).
    refs: tuple[str, ...] = ()


@dataclass(frozen=True)
class StartRun:
    run_id: str
    started: RunStarted
    row: Row
    blobs: list[tuple[str, bytes]]


@dataclass(frozen=True)
class Append:
    run_id: str
    rows: list[Row]
    blobs: list[tuple[str, bytes]]
    state: StateWrite | None
    state_tensors: bytes  # msgpack of state.tensors
    #: (stage, body) of each completion the request relies on: each must be the one recorded.
    requires: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class Counts:
    appends: int = 0
    events: int = 0
    dropped_completions: int = 0
    state_conflicts: int = 0
    runs_started: int = 0
    voided: int = 0
    fenced: int = 0


@dataclass
class Outcome:
    result: Any = None
    error: BaseException | None = None
    counts: Counts = field(default_factory=Counts)


def apply(tx: Tx, op: StartRun | Append, now: float, blobs: BlobStore | None = None) -> Outcome:
    """One request: refused alone (unknown run, run id used) when its checks fail,
    which happens before it writes anything; any other error, once it may have
    written part of itself, propagates and loses the batch, so that no request is
    ever partly in a commit. ``blobs``: the store of the log's blobs when they are not
    in its database; a request's blobs are written there once its checks passed,
    before the transaction that refers to them commits (only their references go into
    the database)."""
    try:
        if isinstance(op, StartRun):
            return start_run(tx, op, now, blobs)
        return append(tx, op, now, blobs)
    except SmssError as e:
        return Outcome(error=e)


def start_run(tx: Tx, op: StartRun, now: float, blobs: BlobStore | None = None) -> Outcome:
    key = op.started.idempotency_key
    # Another writer's start with this key or id commits before these checks, or waits.
    tx.lock(f"run:{op.run_id}", *(() if key is None else (f"key:{key}",)))
    if key is not None:
        row = tx.one("SELECT run_id FROM runs WHERE idempotency_key = ?", (key,))
        if row is not None:
            return Outcome(result=(row[0], False))
    if tx.one("SELECT 1 FROM runs WHERE run_id = ?", (op.run_id,)):
        raise Conflict(f"run id {op.run_id!r} is already used")
    put_blobs(tx, op.blobs, blobs)
    seq = _insert(tx, op.run_id, op.row, now)()
    add_refs(tx, op.run_id, [*op.row.refs, *(ref for ref, _ in op.blobs)])
    tx.write(
        "INSERT INTO runs (run_id, workflow, session, status, created, updated, idempotency_key, "
        "started_seq) VALUES (?, ?, ?, 'running', ?, ?, ?, ?)",
        (op.run_id, op.started.workflow, op.started.session, now, now, key, seq),
    )
    return Outcome(result=(op.run_id, True), counts=Counts(events=1, runs_started=1))


def append(tx: Tx, op: Append, now: float, blobs: BlobStore | None = None) -> Outcome:
    exists = tx.lock_run(op.run_id)
    if exists is False:
        raise NotFound(f"unknown run {op.run_id!r}")
    refused = _refusal(tx, op)
    if refused is not None:  # nothing is written; an unknown run is still told as such
        if exists is None and tx.one("SELECT 1 FROM runs WHERE run_id = ?", (op.run_id,)) is None:
            raise NotFound(f"unknown run {op.run_id!r}")
        return refused
    status = next((r.status for r in reversed(op.rows) if r.status is not None), None)
    update = "UPDATE runs SET updated = ?, status = coalesce(?, status) WHERE run_id = ?"
    if exists:
        tx.write(update, (now, status, op.run_id))
    # The first write, and the last check: an unknown run updates no row.
    elif tx.run(update, (now, status, op.run_id)) != 1:
        raise NotFound(f"unknown run {op.run_id!r}")
    if (w := op.state) is not None:
        tx.write(
            "INSERT INTO session_state (workflow, session, version, tensors) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (workflow, session) "
            "DO UPDATE SET version = excluded.version, tensors = excluded.tensors",
            (w.workflow, w.session, w.expected + 1, op.state_tensors),
        )
        set_state_refs(tx, w.workflow, w.session, w.tensors.values())
    put_blobs(tx, op.blobs, blobs)
    inserted = [_insert(tx, op.run_id, row, now) for row in op.rows]
    # Refs of dropped rows too: their blobs were written, and go with the run.
    add_refs(tx, op.run_id, [*(ref for row in op.rows for ref in row.refs), *(ref for ref, _ in op.blobs)])
    seqs = [seq() for seq in inserted]  # answered together, after every write was sent
    dropped = seqs.count(0)
    counts = Counts(appends=1, events=len(seqs) - dropped, dropped_completions=dropped)
    return Outcome(result=AppendResult(tuple(seqs)), counts=counts)


def _refusal(tx: Tx, op: Append) -> Outcome | None:
    """Why the append writes nothing, or None: its checks, made before any write."""
    if not all(_recorded_as(tx, op.run_id, stage, body) for stage, body in op.requires):
        # Computed from a completion that never took effect (or lost to another): void.
        void = AppendResult(tuple(0 for _ in op.rows), void=True)
        return Outcome(result=void, counts=Counts(appends=1, voided=1))
    stale = _stale_attempts(tx, op)
    if stale:
        # Fencing: the stage was reassigned (a later attempt started) since this attempt
        # began; its result is rejected whether or not the later attempt has finished.
        logger.warning("run %s: rejected results of stale attempts %s", op.run_id, stale)
        fenced = AppendResult(tuple(0 for _ in op.rows), fenced=True)
        return Outcome(result=fenced, counts=Counts(appends=1, fenced=1))
    if op.state is None:
        return None
    if _completion_recorded(tx, op):
        # The stage's effect is already recorded (by an earlier attempt or a fenced-off
        # worker): its state write must not apply a second time.
        dropped = len(op.rows)
        return Outcome(result=AppendResult((0,) * dropped), counts=Counts(appends=1, dropped_completions=1))
    s = op.state
    tx.lock(f"state:{s.workflow}\0{s.session}")  # until this write commits, or the batch ends
    row = tx.one(
        "SELECT version, tensors FROM session_state WHERE workflow = ? AND session = ?",
        (s.workflow, s.session),
    )
    if not _state_is(row, s):
        conflict = AppendResult(tuple(0 for _ in op.rows), state_conflict=True)
        return Outcome(result=conflict, counts=Counts(appends=1, state_conflicts=1))
    return None


def _stale_attempts(tx: Tx, op: Append) -> list[tuple[str, int]]:
    """(stage, attempt) of each result in ``op`` older than its stage's latest start."""
    stale = []
    for row in op.rows:
        if row.type not in ("StageCompleted", "StageFailed") or row.attempt is None:
            continue
        found = tx.one(
            "SELECT max(attempt) FROM events WHERE run_id = ? AND stage = ? AND type = 'StageStarted'",
            (op.run_id, row.stage),
        )
        latest = None if found is None else found[0]
        if latest is not None and row.attempt < latest:
            stale.append((str(row.stage), row.attempt))
    return stale


def _state_is(row: tuple[Any, ...] | None, write: StateWrite) -> bool:
    """Whether the stored state is the one ``write`` was computed from."""
    version, tensors = row if row is not None else (0, None)
    if version != write.expected:
        return False
    if write.base is None:
        return True
    stored = {} if tensors is None else state_tensors(bytes(tensors), write.workflow, write.session)
    return stored == write.base


def state_tensors(data: bytes, workflow: str, session: str) -> dict[str, str]:
    """A stored session state's tensor references."""
    try:
        return _refs_decoder.decode(data)
    except msgspec.DecodeError:
        raise StorageUnavailable(f"the session state of {workflow}/{session} is unreadable") from None


def _recorded_as(tx: Tx, run_id: str, stage: str, body: bytes) -> bool:
    row = tx.one(
        "SELECT body FROM events WHERE run_id = ? AND stage = ? AND type = 'StageCompleted'", (run_id, stage)
    )
    return row is not None and bytes(row[0]) == body


def _completion_recorded(tx: Tx, op: Append) -> bool:
    stages = [r.stage for r in op.rows if r.type == "StageCompleted"]
    return any(
        tx.one(
            "SELECT 1 FROM events WHERE run_id = ? AND stage = ? AND type = 'StageCompleted'",
            (op.run_id, stage),
        )
        is not None
        for stage in stages
    )


def _insert(tx: Tx, run_id: str, row: Row, now: float) -> Callable[[], int]:
    """The new event's seq (when called), or 0 when it was a second StageCompleted (dropped)."""
    inserted = tx.later(
        "INSERT INTO events (run_id, type, stage, attempt, ts, body, crc) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING seq",
        (run_id, row.type, row.stage, row.attempt, now, row.body, zlib.crc32(row.body)),
    )

    def seq() -> int:
        found = inserted()
        return 0 if found is None else int(found[0])

    return seq


def put_blobs(tx: Tx, blobs: list[tuple[str, bytes]], store: BlobStore | None = None) -> None:
    if not blobs:
        return
    if store is not None:  # durable before the commit that refers to them
        store.put(blobs)
        return
    tx.many("INSERT INTO blobs (ref, data) VALUES (?, ?) ON CONFLICT DO NOTHING", sorted(blobs))


def row_of(event: Event) -> Row:
    stage = getattr(event, "stage", None)
    attempt = getattr(event, "attempt", None)
    tag = event.__struct_config__.tag
    return Row(str(tag), stage, attempt, encode(event), status_of(event), refs_of(event))


def refs_of(event: Event) -> tuple[str, ...]:
    """The blob refs an event names."""
    if isinstance(event, RunStarted | StageStarted):
        return tuple(event.inputs.values())
    if isinstance(event, StageCompleted | RunCompleted):
        return tuple(event.outputs.values())
    return ()


def add_refs(tx: Tx, run_id: str, refs: list[str]) -> None:
    if refs:
        # Sorted: two writers adding refs of one blob take its index entries in one order.
        tx.many(
            "INSERT INTO blob_refs (ref, run_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(r, run_id) for r in sorted(set(refs))],
        )


def set_state_refs(tx: Tx, workflow: str, session: str, refs: Iterable[str]) -> None:
    tx.write("DELETE FROM state_refs WHERE workflow = ? AND session = ?", (workflow, session))
    rows = [(r, workflow, session) for r in sorted(set(refs))]
    if rows:
        tx.many(
            "INSERT INTO state_refs (ref, workflow, session) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", rows
        )


def blob_rows(blobs: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    # A copy: the caller may reuse a bytearray before the writer gets to it.
    return [(ref, bytes(data)) for ref, data in blobs.items()]


def size_of(blobs: list[tuple[str, bytes]]) -> int:
    return sum(len(data) for _, data in blobs)


def decode_event(seq: int, body: bytes, crc: int) -> Event:
    try:
        if zlib.crc32(body) != crc:
            raise ValueError("checksum mismatch")
        event: Event = _event_decoder.decode(body)
    except (ValueError, msgspec.DecodeError) as e:
        logger.error("workflow log record seq %d is unreadable: %s", seq, e)
        raise StorageUnavailable(f"the workflow log record seq {seq} is corrupt or unreadable") from None
    return event
