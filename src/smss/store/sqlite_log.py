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

The modules, one per concern: this one (the writer thread and group commit on
SQLite, applying on the caller's loop, checkpoints); shared with the PostgreSQL log
(:mod:`smss.store.postgres_log`): :mod:`smss.store._log_queue` (requests, the
queue, counters), :mod:`smss.store._log_batch` (the open batch, answering callers),
:mod:`smss.store._log_ops` (what one request writes), :mod:`smss.store._log_reads`,
:mod:`smss.store._log_compact` (retention), in the SQL of :mod:`smss.store._log_tx`;
and SQLite's own :mod:`smss.store._log_schema` (refusing a damaged file, the schema).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from smss.errors import StorageUnavailable
from smss.ports import AppendResult, BlobStore, Clock, SystemClock
from smss.store import _log_ops as ops
from smss.store import _log_reads as reads
from smss.store._log_batch import Item, OpenBatch, settle
from smss.store._log_compact import compact
from smss.store._log_queue import (
    LAZY_DELAY_S,
    MAX_QUEUED,
    RequestQueue,
    append_request,
    fail_all,
    start_request,
)
from smss.store._log_schema import (
    BUSY_TIMEOUT_S,
    SCHEMA_VERSION,
    reason,
    refuse_damaged,
    unavailable,
)
from smss.store._log_schema import setup as setup_schema
from smss.store._log_tx import SqliteTx
from smss.store._wal import WalIndex
from smss.store.log_options import FaultHooks, Retention, call, log_hooks
from smss.workflow.events import (
    Event,
    RunStarted,
    StageCompleted,
    StateWrite,
)

__all__ = ["FaultHooks", "Retention", "SqliteEventLog", "log_hooks"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SqliteEventLog(reads.LogReads):
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
        blobs: BlobStore | None = None,
    ) -> None:
        self.path = Path(path)
        self._blobs = blobs
        self._retention = retention
        self._next_compaction = -float("inf")
        self._faults = fault or FaultHooks()
        self._clock: Clock = clock or SystemClock()
        self._checkpoint_bytes = checkpoint_bytes
        # Its ``failure`` is set once a COMMIT or checkpoint failed.
        self._q = RequestQueue(lazy_delay_s=lazy_delay_s, max_queued=max_queued)
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
        self._wtx, self._rtx = SqliteTx(self._wdb), SqliteTx(self._rdb)
        self._writer = threading.Thread(target=self._writer_main, name="smss-log-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------ writes

    def start_run(
        self, run_id: str, started: RunStarted, blobs: Mapping[str, bytes], *, lazy: bool = False
    ) -> asyncio.Future[tuple[str, bool]]:
        return self._submit(*start_request(run_id, started, blobs), lazy)

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
        return self._submit(*append_request(run_id, events, blobs, state, requires), lazy)

    def claim_runs(self) -> list[str]:
        """Every unfinished run: this process is the log's only writer."""
        return self.unfinished_runs()

    def _submit(self, op: ops.StartRun | ops.Append, size: int, lazy: bool) -> asyncio.Future[Any]:
        """Queue a request now (requests are applied in the order they were made);
        its answer comes in the returned future. Raises at once when the log cannot
        take it."""
        q = self._q
        with q.cond:
            future = q.submit(op, size, lazy)
            # Not with a blob store: its writes and fsyncs must stay off the loop.
            help_ = lazy and not self._helping and self._blobs is None
            self._helping = self._helping or help_
        if help_:
            # Two iterations on: one lets the task that made the request reach its next
            # await; a run's start is made before the task that drives it has run at all.
            loop = asyncio.get_running_loop()
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
        q = self._q
        with q.cond:
            self._helping = False
        if not self._db_lock.acquire(blocking=False):
            return
        try:
            with q.cond:
                if q.failure is not None or q.closing or not q.items:
                    return
                items = q.pop_batch(self._open)
            self._apply_all(self._open, items)
            with q.cond:
                # What the batch limits left queued, or a transaction due sooner than
                # the writer plans to wake, is the writer's to do.
                if q.items or self._open.due < q.wake_at:
                    q.cond.notify()
        finally:
            self._db_lock.release()

    # ------------------------------------------------------------ reads

    @property
    def _blob_origin(self) -> object:
        return self.path

    def stats(self) -> dict[str, int]:
        """Since this object was opened: appends (acknowledged ``append`` calls), events
        (written), commits (one fsync each), dropped_completions, state_conflicts,
        voided (appends refused for a ``requires`` not met), fenced (appends refused for
        a stale attempt's result), runs_started, compacted_runs / _events / _blobs
        (removed by compaction); and queued
        (requests waiting for the writer now)."""
        return self._q.stats()

    def close(self) -> None:
        """Finish queued writes (each is acknowledged or fails), then release everything.
        Idempotent. Safe to call from the event loop: the writer never waits for it."""
        self._q.close()
        with self._read_lock:
            self._rdb.close()
        # The writer closes its connection last, which checkpoints and removes the -wal file.
        self._writer.join()

    # ------------------------------------------------------------ the writer thread

    def _writer_main(self) -> None:
        """Apply queued requests to an open transaction as they become ready, commit
        once one of them is due (see ``_submit``): requests that were applied while
        their callers waited leave only the COMMIT on the path of the one that is due."""
        open_, q = self._open, self._q
        try:
            while (apply := q.wait(open_)) is not None:
                with self._db_lock:
                    # Taken only now, holding the connection: a caller's loop that applies
                    # later requests meanwhile (``_apply_on_loop``) cannot overtake these.
                    items = q.pop_ready(open_) if apply else []
                    if q.failure is not None:
                        fail_all([*open_.take(), *items], StorageUnavailable(q.failure))
                        continue
                    if items:
                        self._apply_all(open_, items)
                    if open_.items and (open_.due <= time.monotonic() or open_.full() or q.closing):
                        self._commit(open_)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            logger.exception("workflow log writer crashed")
            self._fatal("the workflow log writer stopped", e)
            with self._db_lock:
                self._rollback()
                fail_all(open_.take(), StorageUnavailable(q.failure or ""))
            while q.wait(open_) is not None:
                fail_all(q.pop_ready(open_), StorageUnavailable(q.failure or ""))
        finally:
            self._wal_index.close()
            with self._db_lock, contextlib.suppress(sqlite3.Error):
                self._wdb.close()

    def _apply_all(self, open_: OpenBatch, items: list[Item]) -> None:
        db = self._wdb
        now = self._clock.time()
        try:
            if not db.in_transaction:
                db.execute("BEGIN IMMEDIATE")
            for item in items:
                open_.add(item, ops.apply(self._wtx, item.op, now, self._blobs))
        except Exception as e:  # the transaction is lost; nothing was fsynced, so not fatal
            if not isinstance(e, sqlite3.Error | OSError):
                logger.exception("workflow log request failed")
            self._rollback()
            applied = open_.take()
            failed = applied + [i for i in items if not any(i is a for a in applied)]
            fail_all(failed, self._storage_error("could not be written", e))

    def _commit(self, open_: OpenBatch) -> None:
        db = self._wdb
        try:
            call(self._faults.before_commit)
            db.execute("COMMIT")
            call(self._faults.after_commit)
        except BaseException as e:
            self._fatal("the workflow log could not be written", e)
            self._rollback()
            fail_all(open_.take(), StorageUnavailable(self._q.failure or ""))
            return
        answers = open_.take_with_outcomes()
        self._q.committed(answers)
        settle(answers)
        self._maybe_checkpoint()
        self._maybe_compact()

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
        if r is None or self._q.failure is not None or self._clock.monotonic() < self._next_compaction:
            return
        db = self._wdb
        try:
            db.execute("BEGIN IMMEDIATE")
            cutoff = self._clock.time() - r.age_s
            done = compact(self._wtx, cutoff, r.max_runs, blobs_in_db=self._blobs is None)
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
        if self._blobs is not None and done.orphans:  # only once nothing committed refers to them
            try:
                self._blobs.delete(done.orphans)
            except OSError as e:
                logger.warning("workflow log compaction: blobs left in the blob store: %s", e)
        full = done.runs >= r.max_runs
        self._next_compaction = -float("inf") if full else self._clock.monotonic() + r.every_s
        if done.runs:
            logger.info(
                "workflow log compacted: %d runs, %d events, %d blobs", done.runs, done.events, done.blobs
            )
        self._q.count(compacted_runs=done.runs, compacted_events=done.events, compacted_blobs=done.blobs)

    def _checkpoint(self) -> None:
        """Copy the -wal file into the database (fsynced), then start its next
        generation at once (see the module's docstring)."""
        call(self._faults.before_checkpoint)
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
        call(self._faults.after_checkpoint)

    def _fatal(self, message: str, cause: BaseException) -> None:
        logger.error("%s: %s (%r); no more writes until it is reopened", message, self.path, cause)
        self._q.fail(f"{message}: {reason(cause)}; it must be reopened")

    def _rollback(self) -> None:
        if self._wdb.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._wdb.execute("ROLLBACK")

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

    def _read(self, fn: Callable[[SqliteTx], T]) -> T:
        with self._read_lock:
            if self._q.closing:
                raise StorageUnavailable("the workflow log is closed")
            try:
                return fn(self._rtx)
            except sqlite3.Error as e:
                raise unavailable(self.path, "the workflow log could not be read", e) from None


if TYPE_CHECKING:  # SqliteEventLog satisfies the port (checked by mypy, never run)
    from smss.ports import EventLog

    _check: EventLog = SqliteEventLog("log.db")
