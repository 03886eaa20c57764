"""The workflow log in one SQLite file: WAL mode, ``synchronous=FULL``, one writer
thread with group commit. Implements :class:`smss.ports.EventLog`.

Guarantees:

* **Write-ahead.** ``start_run`` and ``append`` return only after the COMMIT of the
  transaction holding their events, blobs and state write (and so its fsync of the
  ``-wal`` file) has returned. Whatever was acknowledged survives a killed process.
* **Group commit.** One thread owns the write connection. It takes every queued
  request, applies each inside one ``BEGIN IMMEDIATE`` transaction and commits
  once: one fsync for all of them. A request checks before it writes, so one
  refused (a conflict, an unknown run) leaves the others intact; an error once it
  has started writing loses the whole transaction (its requests all fail, none is
  acknowledged). A *lazy* request (``lazy=True``: its
  caller will wait for a later request of its own anyway) does not start a commit:
  it waits up to ``lazy_delay_s`` for one that is not lazy, so a run's records
  share the commit of its end instead of costing a commit each. It is applied to
  the open transaction soon after it is made (uncommitted: invisible to readers,
  lost in a crash, acknowledged only by the commit), so that the commit a caller
  waits for has little left to do but COMMIT. That application runs on the
  caller's event loop, two iterations after the request (when the caller awaits
  the stage it started), unless the writer holds the connection: work that needs
  no hand-off of the GIL there, while the writer thread's Python between SQLite
  calls would compete with the loop for it.
* **All or nothing.** A batch of events with its blobs and state write is never
  partly present, before or after a crash: a request is refused before its first
  write, or its error rolls back the transaction it is in.
* **Failures are not acknowledged.** A failed write fails every request of its
  batch with :class:`StorageUnavailable`. A failed COMMIT or checkpoint (where the
  fsyncs are) is fatal: after an fsync error the kernel may have dropped the dirty
  pages and cleared the error, so a retry that "succeeds" proves nothing. Every later
  write fails at once; reopening recovers from what is on disk.
* **A bounded queue.** A new run (``start_run``) is refused with :class:`Overloaded`
  while ``max_queued`` requests wait for the writer: a store that fell behind sheds
  new work instead of queueing without bound. Appends of runs already started are
  always taken (refusing them would strand those runs); the engine bounds how many
  runs there are, and so how many appends can wait.
* **Order from seq.** ``events.seq`` is assigned by the single writer in commit
  order; runs are ordered by the seq of their ``RunStarted``, never by wall time.
* **A damaged file is refused, never half-read.** Opening runs ``PRAGMA
  integrity_check`` (``quick_check`` above ``_log_schema.FULL_CHECK_MAX_BYTES``) and
  checks the ``-wal`` file for intact commits past a damaged frame, which SQLite's
  recovery would silently drop (see :mod:`smss.store._wal`). A torn tail of the last,
  unacknowledged transaction is recovered from, as SQLite does. Each event body
  carries a CRC-32, and a blob is checked against its sha256 when read.

**Bounded by compaction.** With a :class:`Retention`, the writer removes finished
runs older than its age (their events, and the blobs nothing left refers to) after
a commit, a bounded number at a time (:mod:`smss.store._log_compact`); a run still
running is never removed. The file's pages are reused, not returned to the OS, so
under churn its size levels off instead of growing.

The log checkpoints itself (at open, and after a commit once the current ``-wal``
generation passes ``checkpoint_bytes``) instead of SQLite's auto-checkpoint. A
checkpoint is ``wal_checkpoint(RESTART)`` followed at once by a one-frame write that
starts the next generation (new salts in the ``-wal`` header, so every older frame is
void). So the ``-wal`` file holds valid frames already copied into the database only
while a checkpoint runs (or when a reader kept one from completing): a ``-wal`` tail
lost after a crash then costs a suffix of transactions, never consistency. The file
is reused, not truncated: a commit overwrites blocks the file already has, so its
fsync need not also journal a larger file size (about half the cost of a commit's
fsync on ext4). ``journal_size_limit`` keeps a burst from leaving it large.

Five modules, one per concern: this one (submitting, the writer thread and group
commit, reads), :mod:`smss.store._log_batch` (queued requests, the open batch,
answering callers), :mod:`smss.store._log_ops` (what one request writes),
:mod:`smss.store._log_compact` (retention) and :mod:`smss.store._log_schema`
(refusing a damaged file, the schema).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import sqlite3
import threading
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smss import faults
from smss.errors import NotFound, Overloaded, SmssError, StorageUnavailable
from smss.ports import AppendResult, Clock, SystemClock
from smss.store import _log_ops as ops
from smss.store._log_batch import MAX_BATCH_BYTES, MAX_BATCH_ITEMS, Item, OpenBatch, settle
from smss.store._log_compact import compact
from smss.store._log_schema import (
    BUSY_TIMEOUT_S,
    SCHEMA_VERSION,
    reason,
    refuse_damaged,
    unavailable,
)
from smss.store._log_schema import setup as setup_schema
from smss.store._wal import WalIndex
from smss.workflow.events import (
    Event,
    Record,
    RunStarted,
    RunSummary,
    SessionState,
    StageCompleted,
    StateWrite,
)

logger = logging.getLogger(__name__)

#: How long a lazy request may wait for a commit to share: its records become durable
#: this long after it was made at the latest, or with the next request that is not lazy.
LAZY_DELAY_S = 0.02
#: A lazy request larger than this waits only ``BULKY_DELAY_S`` (see ``_submit``).
LAZY_MAX_BYTES = 1024 * 1024
BULKY_DELAY_S = 0.002
#: A lazy request is applied (not committed) this long after it was made.
APPLY_DELAY_S = 0.001
#: Requests waiting for the writer past which a new run is refused.
MAX_QUEUED = 10_000

_EVENT_TYPES: tuple[type, ...] = typing.get_args(Event)


@dataclass(frozen=True)
class Retention:
    """Log compaction (:mod:`smss.store._log_compact`): finished runs last updated more
    than ``age_s`` ago are removed, with the blobs only they referred to, by the
    writer after a commit at most every ``every_s``, ``max_runs`` at a time."""

    age_s: float
    every_s: float = 60.0
    max_runs: int = 1000


@dataclass(frozen=True)
class FaultHooks:
    """Named fault points, for tests only (:func:`log_hooks` builds them from the points
    of :mod:`smss.faults`). Each runs on the writer thread; an exception it raises
    counts as a failure of the step it is attached to (a failed COMMIT or checkpoint:
    fatal)."""

    before_commit: Callable[[], None] | None = None
    after_commit: Callable[[], None] | None = None
    before_checkpoint: Callable[[], None] | None = None
    #: Called only when a checkpoint completed (the ``-wal`` file was emptied).
    after_checkpoint: Callable[[], None] | None = None


def log_hooks(lookup: Callable[[str], Callable[[], None] | None] = faults.point) -> FaultHooks:
    """The log's hooks from ``lookup`` (point name -> action): by default the points
    installed in this process (:func:`smss.faults.install`)."""
    return FaultHooks(
        before_commit=lookup("log.before_commit"),
        after_commit=lookup("log.after_commit"),
        before_checkpoint=lookup("log.before_checkpoint"),
        after_checkpoint=lookup("log.after_checkpoint"),
    )


class SqliteEventLog:
    """:class:`smss.ports.EventLog` on an SQLite file, created if missing.

    Opening raises :class:`StorageUnavailable` when the file is corrupt, unreadable,
    newer than this code, or its ``-wal`` file holds intact commits that SQLite
    would drop. Reads are synchronous and use their own connection: under WAL they
    run beside the writer and see every acknowledged write. ``close`` lets queued
    writes finish, then stops the writer and closes both connections.

    A cancelled ``append`` may still be written (it was queued): like a crash after
    the commit and before the answer, which the engine's replay handles anyway.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        fault: FaultHooks | None = None,
        clock: Clock | None = None,
        checkpoint_bytes: int = 4 * 1024 * 1024,
        lazy_delay_s: float = LAZY_DELAY_S,
        max_queued: int = MAX_QUEUED,
        retention: Retention | None = None,
    ) -> None:
        self.path = Path(path)
        self._retention = retention
        self._next_compaction = -float("inf")
        self._max_queued = max_queued
        self._faults = fault or FaultHooks()
        self._clock: Clock = clock or SystemClock()
        self._checkpoint_bytes = checkpoint_bytes
        self._lazy_delay_s = lazy_delay_s
        self._earliest = float("inf")  # the earliest ``ready_at`` in the queue
        #: When the writer's wait ends (inf: when notified); -inf while it is awake.
        self._wake_at = -float("inf")
        self._cond = threading.Condition()
        self._queue: collections.deque[Item] = collections.deque()
        self._closing = False
        self._failure: str | None = None  # set once a COMMIT or checkpoint failed
        self._counters = dict.fromkeys(
            (
                "appends",
                "events",
                "commits",
                "dropped_completions",
                "state_conflicts",
                "voided",
                "fenced",
                "runs_started",
                "compacted_runs",
                "compacted_events",
                "compacted_blobs",
            ),
            0,
        )
        self._read_lock = threading.Lock()
        # The write connection and the open transaction: the writer thread uses them, and
        # so may a caller's event loop, to apply lazy requests (``_apply_on_loop``).
        self._db_lock = threading.Lock()
        self._open = OpenBatch()
        self._helping = False  # an ``_apply_on_loop`` is scheduled
        self._wal_index = WalIndex(Path(f"{self.path}-shm"))
        refuse_damaged(self.path)
        self._wdb = self._connect()
        try:
            setup_schema(self._wdb, self.path)
            # What a crash left in the -wal file goes into the database now, once.
            self._checkpoint()
            self._rdb = self._connect()
        except BaseException as e:
            self._wdb.close()
            if isinstance(e, sqlite3.Error | OSError):
                raise unavailable(self.path, "the workflow log could not be opened", e) from None
            raise
        try:
            self._rdb.execute("PRAGMA query_only = ON")
        except sqlite3.Error as e:
            self._rdb.close()
            self._wdb.close()
            raise unavailable(self.path, "the workflow log could not be opened", e) from None
        self._writer = threading.Thread(target=self._writer_main, name="smss-log-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------ writes

    def start_run(
        self, run_id: str, started: RunStarted, blobs: Mapping[str, bytes], *, lazy: bool = False
    ) -> asyncio.Future[tuple[str, bool]]:
        if not isinstance(started, RunStarted):
            raise TypeError(f"start_run needs a RunStarted, not {type(started).__name__}")
        row = ops.row_of(started)
        blob_rows = ops.blob_rows(blobs)
        op = ops.StartRun(run_id, started, row, blob_rows)
        return self._submit(op, len(row.body) + ops.size_of(blob_rows), lazy)

    def append(
        self,
        run_id: str,
        events: Sequence[Event],
        *,
        blobs: Mapping[str, bytes] | None = None,
        state: StateWrite | None = None,
        requires: Sequence[StageCompleted] = (),
        lazy: bool = False,
    ) -> asyncio.Future[AppendResult]:
        rows = []
        for event in events:
            if isinstance(event, RunStarted) or not isinstance(event, _EVENT_TYPES):
                raise TypeError(f"cannot append {type(event).__name__}: RunStarted is written by start_run")
            rows.append(ops.row_of(event))
        if state is not None and not isinstance(state, StateWrite):
            raise TypeError(f"state must be a StateWrite, not {type(state).__name__}")
        needed = []
        for completion in requires:
            if not isinstance(completion, StageCompleted):
                raise TypeError(f"requires holds StageCompleted events, not {type(completion).__name__}")
            needed.append((completion.stage, ops.encode(completion)))
        blob_rows = ops.blob_rows(blobs or {})
        op = ops.Append(
            run_id, rows, blob_rows, state, ops.encode(dict(state.tensors)) if state else b"", needed
        )
        size = sum(len(r.body) for r in rows) + ops.size_of(blob_rows)
        return self._submit(op, size, lazy)

    def _submit(self, op: ops.StartRun | ops.Append, size: int, lazy: bool) -> asyncio.Future[Any]:
        """Queue a request now (requests are applied in the order they were made);
        its answer comes in the returned future. Raises at once when the log cannot
        take it."""
        now = time.monotonic()
        if not lazy:
            due = ready_at = now
        elif size > LAZY_MAX_BYTES:
            # Very large blobs get a commit of their own soon, in the background (after
            # the caller's next step, not in its way), so that the commit that ends a
            # run is never a large one.
            due = ready_at = now + BULKY_DELAY_S
        else:
            # Applied soon (uncommitted, while the caller waits on something else), so
            # that the commit that takes it has only its COMMIT left to do.
            due, ready_at = now + self._lazy_delay_s, now + APPLY_DELAY_S
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._failure is not None:
                raise StorageUnavailable(self._failure)
            if self._closing:
                raise StorageUnavailable("the workflow log is closed")
            if isinstance(op, ops.StartRun) and len(self._queue) >= self._max_queued:
                raise Overloaded(
                    f"the workflow log is behind: {len(self._queue)} writes are waiting", retry_after_s=1.0
                )
            self._queue.append(Item(op, size, loop, future, due, ready_at))
            self._earliest = min(self._earliest, ready_at)
            # A lazy request is applied by this loop soon (below): the writer need only
            # be up by its ``due``. Woken only when its wait must end sooner than planned.
            if (due if lazy else ready_at) < self._wake_at:
                self._cond.notify()
            help_ = lazy and not self._helping
            self._helping = self._helping or help_
        if help_:
            # Two iterations on: one lets the task that made the request reach its next
            # await; a run's start is made before the task that drives it has run at all.
            loop.call_soon(loop.call_soon, self._apply_on_loop)
        return future

    def _apply_on_loop(self) -> None:
        """Apply the queued requests to the open transaction on the caller's event loop,
        soon after a lazy one was made: by then the caller has gone on to await
        something (the stage it just started), so this work is off its path, and done
        where it needs no hand-off of the GIL to the writer thread, whose own Python
        work between SQLite calls would otherwise compete with the loop's. Skipped when
        the writer holds the connection (it applies them itself, when they are ready).
        Requests stay in order: whoever holds the connection takes them from the head of
        the queue, the writer too."""
        with self._cond:
            self._helping = False
        if not self._db_lock.acquire(blocking=False):
            return
        try:
            with self._cond:
                if self._failure is not None or self._closing or not self._queue:
                    return
                items = self._pop_batch(self._open)
            self._apply_all(self._open, items)
            with self._cond:
                # What the batch limits left queued, or a transaction due sooner than
                # the writer plans to wake, is the writer's to do.
                if self._queue or self._open.due < self._wake_at:
                    self._cond.notify()
        finally:
            self._db_lock.release()

    # ------------------------------------------------------------ reads

    def read_run(self, run_id: str) -> list[Record]:
        """The run's records in seq order; empty for an unknown run."""
        rows = self._read(
            lambda db: db.execute(
                "SELECT seq, ts, CAST(body AS BLOB), crc FROM events WHERE run_id = ? ORDER BY seq", (run_id,)
            ).fetchall()
        )
        return [Record(seq, run_id, ts, ops.decode_event(seq, body, crc)) for seq, ts, body, crc in rows]

    def run_summary(self, run_id: str) -> RunSummary | None:
        row = self._read(lambda db: db.execute(f"{_SUMMARY} WHERE run_id = ?", (run_id,)).fetchone())
        return None if row is None else RunSummary(*row)

    def list_runs(
        self, status: str | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[RunSummary]:
        """Newest first (by the seq of each run's RunStarted)."""
        where = " AND ".join(
            c for c, v in (("status = :status", status), ("workflow = :workflow", workflow)) if v is not None
        )
        sql = f"{_SUMMARY} {'WHERE ' + where if where else ''} ORDER BY started_seq DESC LIMIT :limit"
        args = {"status": status, "workflow": workflow, "limit": max(0, limit)}
        return [RunSummary(*r) for r in self._read(lambda db: db.execute(sql, args).fetchall())]

    def unfinished_runs(self) -> list[str]:
        """Runs still ``running``, oldest first."""
        rows = self._read(
            lambda db: db.execute(
                "SELECT run_id FROM runs WHERE status = 'running' ORDER BY started_seq"
            ).fetchall()
        )
        return [r[0] for r in rows]

    def get_blob(self, ref: str) -> bytes:
        row = self._read(lambda db: db.execute("SELECT data FROM blobs WHERE ref = ?", (ref,)).fetchone())
        if row is None:
            raise NotFound(f"unknown blob {ref[:12]}")
        data = bytes(row[0])
        if hashlib.sha256(data).hexdigest() != ref:
            logger.error("blob %s in %s does not match its sha256", ref, self.path)
            raise StorageUnavailable(f"blob {ref[:12]} is corrupt (content hash mismatch)")
        return data

    def get_state(self, workflow: str, session: str) -> SessionState:
        row = self._read(
            lambda db: db.execute(
                "SELECT version, tensors FROM session_state WHERE workflow = ? AND session = ?",
                (workflow, session),
            ).fetchone()
        )
        if row is None:
            return SessionState(0, {})
        return SessionState(row[0], ops.state_tensors(row[1], workflow, session))

    def stats(self) -> dict[str, int]:
        """Since this object was opened: appends (acknowledged ``append`` calls), events
        (written), commits (one fsync each), dropped_completions, state_conflicts,
        voided (appends refused for a ``requires`` not met), fenced (appends refused for
        a stale attempt's result), runs_started, compacted_runs / _events / _blobs
        (removed by compaction); and queued
        (requests waiting for the writer now)."""
        with self._cond:
            return {**self._counters, "queued": len(self._queue)}

    def close(self) -> None:
        """Finish queued writes (each is acknowledged or fails), then release everything.
        Idempotent. Safe to call from the event loop: the writer never waits for it."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        with self._read_lock:
            self._rdb.close()
        # The writer closes its connection last, which checkpoints and removes the -wal file.
        self._writer.join()

    # ------------------------------------------------------------ the writer thread

    def _writer_main(self) -> None:
        """Apply queued requests to an open transaction as they become ready, commit
        once one of them is due (see ``_submit``): requests that were applied while
        their callers waited leave only the COMMIT on the path of the one that is due."""
        open_ = self._open
        try:
            while (apply := self._wait(open_)) is not None:
                with self._db_lock:
                    # Taken only now, holding the connection: a caller's loop that applies
                    # later requests meanwhile (``_apply_on_loop``) cannot overtake these.
                    items = self._pop_ready(open_) if apply else []
                    if self._failure is not None:
                        self._settle_all(
                            [*open_.take(), *items], ops.Outcome(error=StorageUnavailable(self._failure))
                        )
                        continue
                    if items:
                        self._apply_all(open_, items)
                    if open_.items and (open_.due <= time.monotonic() or open_.full() or self._closing):
                        self._commit(open_)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            logger.exception("workflow log writer crashed")
            self._fatal("the workflow log writer stopped", e)
            with self._db_lock:
                self._rollback()
                self._settle_all(open_.take(), ops.Outcome(error=StorageUnavailable(self._failure or "")))
            while self._wait(open_) is not None:
                failed = ops.Outcome(error=StorageUnavailable(self._failure or ""))
                self._settle_all(self._pop_ready(open_), failed)
        finally:
            self._wal_index.close()
            with self._db_lock, contextlib.suppress(sqlite3.Error):
                self._wdb.close()

    def _wait(self, open_: OpenBatch) -> bool | None:
        """Wait until there is work: True once a queued request is ready to be applied,
        False once the open transaction is due; None once closing and drained."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._queue and (self._closing or self._earliest <= now or open_.full()):
                    return True
                if open_.items and (open_.due <= now or self._closing):
                    return False
                if not self._queue and not open_.items and self._closing:
                    return None
                wake = min(self._earliest if self._queue else float("inf"), open_.due)
                self._wake_at = wake
                self._cond.wait(None if wake == float("inf") else max(0.0, wake - now))
                self._wake_at = -float("inf")  # awake: it looks at the queue before it waits again

    def _pop_ready(self, open_: OpenBatch) -> list[Item]:
        """What is queued now, up to the batch limits (perhaps nothing: a caller's loop
        may have applied it)."""
        with self._cond:
            return self._pop_batch(open_) if self._queue else []

    def _pop_batch(self, open_: OpenBatch) -> list[Item]:
        """The head of the (non-empty) queue, up to the batch limits; under ``_cond``."""
        items = [self._queue.popleft()]
        size = open_.size + items[0].size
        while (
            self._queue
            and len(open_.items) + len(items) < MAX_BATCH_ITEMS
            and size + self._queue[0].size <= MAX_BATCH_BYTES
        ):
            items.append(self._queue.popleft())
            size += items[-1].size
        self._earliest = min((item.ready_at for item in self._queue), default=float("inf"))
        return items

    def _apply_all(self, open_: OpenBatch, items: list[Item]) -> None:
        db = self._wdb
        now = self._clock.time()
        try:
            if not db.in_transaction:
                db.execute("BEGIN IMMEDIATE")
            for item in items:
                open_.add(item, self._apply(db, item.op, now))
        except Exception as e:  # the transaction is lost; nothing was fsynced, so not fatal
            if not isinstance(e, sqlite3.Error | OSError):
                logger.exception("workflow log request failed")
            self._rollback()
            applied = open_.take()
            failed = applied + [i for i in items if not any(i is a for a in applied)]
            self._settle_all(failed, ops.Outcome(error=self._storage_error("could not be written", e)))

    def _commit(self, open_: OpenBatch) -> None:
        db = self._wdb
        try:
            _call(self._faults.before_commit)
            db.execute("COMMIT")
            _call(self._faults.after_commit)
        except BaseException as e:
            self._fatal("the workflow log could not be written", e)
            self._rollback()
            self._settle_all(open_.take(), ops.Outcome(error=StorageUnavailable(self._failure or "")))
            return
        answers = open_.take_with_outcomes()
        with self._cond:
            self._counters["commits"] += 1
            for _, outcome in answers:
                for name, value in vars(outcome.counts).items():
                    self._counters[name] += value
        settle(answers)
        self._maybe_checkpoint()
        self._maybe_compact()

    def _apply(self, db: sqlite3.Connection, op: ops.StartRun | ops.Append, now: float) -> ops.Outcome:
        """One request: refused alone (unknown run, run id used) when its checks fail,
        which happens before it writes anything (see :mod:`smss.store._log_ops`); any
        other error, once it may have written part of itself, propagates and loses
        the batch, so that no request is ever partly in a commit."""
        try:
            return ops.start_run(db, op, now) if isinstance(op, ops.StartRun) else ops.append(db, op, now)
        except SmssError as e:
            return ops.Outcome(error=e)

    def _maybe_checkpoint(self) -> None:
        size = self._wal_index.wal_bytes()
        if size is None:  # no index to read: the file's size is an upper bound
            try:
                size = Path(f"{self.path}-wal").stat().st_size
            except FileNotFoundError:
                return
        if size < self._checkpoint_bytes:
            return
        try:
            self._checkpoint()
        except BaseException as e:
            self._fatal("the workflow log could not be checkpointed", e)

    def _maybe_compact(self) -> None:
        """After a commit, once ``retention.every_s`` has passed since the last pass:
        remove finished runs past the retention age (at most ``max_runs`` a pass, so
        the writer is held up briefly; a full pass makes the next one due at once)."""
        r = self._retention
        if r is None or self._failure is not None or self._clock.monotonic() < self._next_compaction:
            return
        db = self._wdb
        try:
            db.execute("BEGIN IMMEDIATE")
            done = compact(db, self._clock.time() - r.age_s, r.max_runs)
        except (sqlite3.Error, StorageUnavailable) as e:  # nothing committed: try at the next pass
            logger.error("workflow log compaction failed: %s", e)
            self._rollback()
            self._next_compaction = self._clock.monotonic() + r.every_s
            return
        try:
            db.execute("COMMIT")
        except BaseException as e:  # as any failed COMMIT: fatal
            self._fatal("the workflow log could not be written", e)
            self._rollback()
            return
        full = done.runs >= r.max_runs
        self._next_compaction = -float("inf") if full else self._clock.monotonic() + r.every_s
        if done.runs:
            logger.info(
                "workflow log compacted: %d runs, %d events, %d blobs", done.runs, done.events, done.blobs
            )
        with self._cond:
            self._counters["compacted_runs"] += done.runs
            self._counters["compacted_events"] += done.events
            self._counters["compacted_blobs"] += done.blobs

    def _checkpoint(self) -> None:
        """Copy the -wal file into the database (fsynced), then start its next
        generation at once (see the module's docstring)."""
        _call(self._faults.before_checkpoint)
        db = self._wdb
        busy, frames, _ = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        if busy:  # a reader held an old snapshot; try after a later commit
            return
        if frames > 0:  # void them: a write of one frame (the schema version, unchanged)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        _call(self._faults.after_checkpoint)

    def _fatal(self, message: str, cause: BaseException) -> None:
        logger.error("%s: %s (%r); no more writes until it is reopened", message, self.path, cause)
        with self._cond:
            if self._failure is None:
                self._failure = f"{message}: {reason(cause)}; it must be reopened"

    def _rollback(self) -> None:
        if self._wdb.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._wdb.execute("ROLLBACK")

    def _settle_all(self, items: list[Item], outcome: ops.Outcome) -> None:
        answers = []
        for item in items:
            # One exception object per waiter: each gets its own traceback.
            error = outcome.error
            if isinstance(error, SmssError):
                error = type(error)(error.message)
            answers.append((item, ops.Outcome(error=error)))
        settle(answers)

    def _storage_error(self, what: str, cause: BaseException) -> StorageUnavailable:
        logger.error("the workflow log %s: %s (%r)", what, self.path, cause)
        return StorageUnavailable(f"the workflow log {what}: {reason(cause)}")

    # ------------------------------------------------------------ internals

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
            )
        except sqlite3.Error as e:
            raise unavailable(self.path, "the workflow log could not be opened", e) from None

    def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._read_lock:
            if self._closing:
                raise StorageUnavailable("the workflow log is closed")
            try:
                return fn(self._rdb)
            except sqlite3.Error as e:
                raise unavailable(self.path, "the workflow log could not be read", e) from None


_SUMMARY = "SELECT run_id, workflow, session, status, created, updated FROM runs"


def _call(hook: Callable[[], None] | None) -> None:
    if hook is not None:
        hook()


if TYPE_CHECKING:  # SqliteEventLog satisfies the port (checked by mypy, never run)
    from smss.ports import EventLog

    _check: EventLog = SqliteEventLog("log.db")
