"""The workflow log in PostgreSQL (``--store postgresql://...``): the same requests,
reads, rules and compaction as the SQLite log (:mod:`smss.store._log_ops`,
:mod:`smss.store._log_reads`, :mod:`smss.store._log_compact`), shared by several
engines on several nodes. Implements :class:`smss.ports.EventLog`.

Guarantees:

* **Write-ahead, group commit.** One writer thread per process holds one connection.
  It applies queued requests to an open transaction as they become ready and commits
  once one of them is due (a request that is not lazy is due at once; a lazy one
  within ``lazy_delay_s``), one COMMIT (``synchronous_commit = on``: the WAL flushed on
  the server) for every request that arrived meanwhile. A request is acknowledged only
  after that COMMIT returned.
* **The rules hold across processes.** Every append locks its run's row first
  (``SELECT ... FOR UPDATE``) and each start the advisory locks of its run id and
  idempotency key, each state write its session's: the checks of a request (the
  recorded completion it requires, the latest attempt started, the state's version)
  and its writes see no other writer's records of that run or session in between.
  ``one_completion``, a unique index, keeps one ``StageCompleted`` per stage.
* **One engine drives a run.** ``runs.owner`` is the engine that started it (or
  took it over). Each engine counts up its heartbeat in ``engines`` every third of
  ``lease_s``; every other engine watches it on its own monotonic clock (no clock is
  compared across nodes, and the database's wall clock plays no part): one whose
  heartbeat has not moved for ``lease_s`` while the watcher could see it is dead, and
  :meth:`claim_runs` hands its unfinished runs to the watcher (one claim at a time,
  under an advisory lock). An append to a run another engine owns is refused
  (:class:`RunNotOwned`), so an engine that stalled past its lease cannot write over
  the one that took its runs (fencing). ``close`` removes the engine's heartbeat, so
  the runs of an engine that stopped are taken over at once. Engines sharing a log
  should share ``lease_s`` (``--run-lease``).
* **Failures are retryable, and not fatal.** A lost connection (the server stopped,
  restarted, unreachable) fails the requests of the open batch with
  :class:`StorageUnreachable` (503, ``Retry-After``); the writer reconnects for the next
  one. Nothing failed was acknowledged; a batch whose COMMIT was cut off may still have
  committed (the engine reads the log back before it goes on). A deadlock between two
  writers' batches (PostgreSQL aborts one) is retried: the batch is applied again.
* **Order from seq.** ``events.seq`` comes from one sequence; within a run (whose
  appends are serialised by its row lock) it is the commit order. Across runs of
  different writers it is only the order in which rows were written.
* **Blobs.** In the ``blobs`` table, or with a :class:`~smss.ports.BlobStore`
  (``--blob-dir``) in files written (fsynced) while the transaction that refers to
  them is open, before it commits. Compaction, which removes blobs nothing refers to,
  holds an advisory lock every write transaction shares, and removes the files before
  it lets go of it, so no writer can refer anew to a blob being removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from smss.errors import StorageUnavailable, StorageUnreachable
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
from smss.store._pg import (
    MAX_RETRIES,
    RETRY,
    PgDatabase,
    PgTx,
    StoreUrl,
    lock_key,
    storage_error,
    unreachable,
)
from smss.store.log_options import FaultHooks, Retention, call
from smss.workflow.events import (
    Event,
    RunStarted,
    StageCompleted,
    StateWrite,
)

__all__ = ["PgEventLog"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds without a heartbeat (one every third of it) after which an engine's runs are
#: taken over.
LEASE_S = 10.0
_WRITE_FAILED = "the workflow log could not be written"


class PgEventLog(reads.LogReads):
    """:class:`smss.ports.EventLog` in the schema of ``db`` (a :class:`PgDatabase`,
    shared with the registry and closed by its owner; or a URL, for a database of the
    log's own, closed with it). ``db.owner`` names this process's engine.

    Opening raises :class:`StorageUnreachable` when the server cannot be reached.
    ``close`` lets queued writes finish (each is acknowledged or fails), stops the
    writer and ends this engine's lease."""

    def __init__(
        self,
        db: PgDatabase | StoreUrl | str,
        *,
        owner: str | None = None,
        fault: FaultHooks | None = None,
        clock: Clock | None = None,
        lazy_delay_s: float = LAZY_DELAY_S,
        max_queued: int = MAX_QUEUED,
        retention: Retention | None = None,
        blobs: BlobStore | None = None,
        lease_s: float = LEASE_S,
    ) -> None:
        self._owns_db = not isinstance(db, PgDatabase)
        if not isinstance(db, PgDatabase):
            db = PgDatabase(db, owner=owner or _new_owner())
        self._db = db
        self.owner = db.owner
        self._faults = fault or FaultHooks()
        self._clock: Clock = clock or SystemClock()
        self._retention = retention
        self._next_compaction = -float("inf")
        self._blobs = blobs
        self._lease_s = lease_s
        self._q = RequestQueue(lazy_delay_s=lazy_delay_s, max_queued=max_queued)
        self._open = OpenBatch()
        self._conn: psycopg.Connection[Any] | None = None  # the writer's
        self._in_tx = False
        self._shared = lock_key(db.schema, "compaction")
        #: Other engines' heartbeats as last seen by ``claim_runs``: (beat, when first seen).
        self._seen: dict[str, tuple[int, float]] = {}
        self._stop = threading.Event()
        try:
            self._renew()  # this engine is alive before it writes or claims anything
        except BaseException:
            if self._owns_db:
                db.close()
            raise
        self._writer = threading.Thread(target=self._writer_main, name="smss-log-writer", daemon=True)
        self._keeper = threading.Thread(target=self._keep_lease, name="smss-log-lease", daemon=True)
        self._writer.start()
        self._keeper.start()

    # ------------------------------------------------------------ writes

    def start_run(
        self, run_id: str, started: RunStarted, blobs: Mapping[str, bytes], *, lazy: bool = False
    ) -> asyncio.Future[tuple[str, bool]]:
        op, size = start_request(run_id, started, blobs)
        with self._q.cond:
            return self._q.submit(op, size, lazy)

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
        op, size = append_request(run_id, events, blobs, state, requires)
        with self._q.cond:
            return self._q.submit(op, size, lazy)

    def claim_runs(self) -> list[str]:
        """The unfinished runs this engine owns, after taking over those of engines that
        stopped or whose heartbeat stopped (one claim at a time, so no run is taken by
        two), oldest first."""

        def claim(tx: PgTx) -> list[str]:
            tx.conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(self._db.schema, "claim"),))
            self._renew_in(tx)
            beats = {str(o): int(b) for o, b in tx.all("SELECT owner, beat FROM engines")}
            dead = self._watch(beats, time.monotonic())
            taken = tx.run(
                "UPDATE runs SET owner = ? WHERE status = 'running' AND owner IS DISTINCT FROM ? "
                "AND (owner IS NULL OR owner = ANY(?) "
                "OR NOT EXISTS (SELECT 1 FROM engines e WHERE e.owner = runs.owner))",
                (self.owner, self.owner, dead),
            )
            if taken:
                logger.warning("took over %d unfinished runs of engines that stopped", taken)
            rows = tx.all(
                "SELECT run_id FROM runs WHERE status = 'running' AND owner = ? ORDER BY started_seq",
                (self.owner,),
            )
            return [r[0] for r in rows]

        self._check_open()
        try:
            return self._db.write("the workflow log's runs could not be claimed", claim)
        except StorageUnavailable:
            # Not seen meanwhile: a heartbeat that did not move while the database was
            # out of reach says nothing of its engine.
            self._seen.clear()
            raise

    def _watch(self, beats: dict[str, int], now: float) -> list[str]:
        """The engines (other than this one) whose heartbeat has not moved for ``lease_s``
        of this engine's monotonic clock, watched since this log was opened."""
        seen = self._seen
        for owner in [o for o in seen if o not in beats]:
            del seen[owner]
        dead = []
        for owner, beat in beats.items():
            if owner == self.owner:
                continue
            last = seen.get(owner)
            if last is None or last[0] != beat:
                seen[owner] = (beat, now)
            elif now - last[1] >= self._lease_s:
                dead.append(owner)
        return dead

    # ------------------------------------------------------------ reads

    @property
    def _blob_origin(self) -> object:
        return "PostgreSQL"

    def stats(self) -> dict[str, int]:
        """As the SQLite log's: appends, events, commits (one COMMIT, so one WAL flush on
        the server, each), dropped_completions, state_conflicts, voided, fenced,
        runs_started, compacted_*; and queued."""
        return self._q.stats()

    def close(self) -> None:
        """Finish queued writes, stop the writer, end the lease. Idempotent."""
        self._q.close()
        self._writer.join()
        if not self._stop.is_set():
            self._stop.set()
            self._keeper.join()
            # The runs it leaves unfinished are for another engine to take now (or, when the
            # database cannot be reached, once the lease lapses by itself).
            with contextlib.suppress(StorageUnavailable):
                self._db.write(
                    "the engine's lease could not be ended",
                    lambda tx: tx.run("DELETE FROM engines WHERE owner = ?", (self.owner,)),
                )
            if self._owns_db:
                self._db.close()

    def _check_open(self) -> None:
        if self._q.closing:
            raise StorageUnavailable("the workflow log is closed")

    def _read(self, fn: Callable[[PgTx], T]) -> T:
        self._check_open()
        return self._db.read("the workflow log could not be read", fn)

    # ------------------------------------------------------------ the lease

    def _renew(self) -> None:
        self._db.write("the engine's lease could not be renewed", self._renew_in)

    def _renew_in(self, tx: PgTx) -> None:
        tx.run(
            "INSERT INTO engines (owner, beat) VALUES (?, 1) "
            "ON CONFLICT (owner) DO UPDATE SET beat = engines.beat + 1",
            (self.owner,),
        )

    def _keep_lease(self) -> None:
        while not self._stop.wait(self._lease_s / 3):
            with contextlib.suppress(StorageUnavailable):  # logged; tried again at the next beat
                self._renew()

    # ------------------------------------------------------------ the writer thread

    def _writer_main(self) -> None:
        open_, q = self._open, self._q
        try:
            while (apply := q.wait(open_)) is not None:
                items = q.pop_ready(open_) if apply else []
                if items:
                    self._apply_all(open_, items)
                if open_.items and (open_.due <= time.monotonic() or open_.full() or q.closing):
                    self._commit(open_)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            logger.exception("workflow log writer crashed")
            q.fail(f"the workflow log writer stopped ({type(e).__name__}); it must be reopened")
            self._drop()
            fail_all(open_.take(), StorageUnavailable(q.failure or ""))
            while q.wait(open_) is not None:
                fail_all(q.pop_ready(open_), StorageUnavailable(q.failure or ""))
        finally:
            self._drop()

    def _apply_all(self, open_: OpenBatch, items: list[Item]) -> None:
        """Apply ``items`` to the open transaction (opened if none is). After a deadlock
        the transaction is gone: what it held is applied again, with ``items``, in a new
        one. A connection found dead as a transaction began (the server restarted since
        the last batch) is replaced once, at once: nothing was sent on it yet."""
        reconnected = False
        for attempt in range(MAX_RETRIES + 1):
            now = self._clock.time()
            fresh = not self._in_tx
            try:
                conn = self._connection()
                with conn.pipeline() as pipeline:
                    tx = self._begin(conn, pipeline)
                    outcomes = [ops.apply(tx, item.op, now, self._blobs) for item in items]
            except RETRY as e:
                self._abort(e)
                items = [*open_.take(), *items]
                if attempt < MAX_RETRIES:
                    logger.info("workflow log: a batch lost a deadlock with another writer; applied again")
                    continue
                fail_all(items, storage_error(_WRITE_FAILED, e))
                return
            except Exception as e:  # the transaction is lost; nothing was acknowledged
                if fresh and not reconnected and unreachable(e) and self._conn is not None:
                    reconnected = True
                    self._drop()
                    logger.info("workflow log: the database connection was lost; reconnecting")
                    continue
                error = storage_error(_WRITE_FAILED, e)
                self._abort(e)
                fail_all([*open_.take(), *items], error)
                return
            for item, outcome in zip(items, outcomes, strict=True):
                open_.add(item, outcome)
            return

    def _commit(self, open_: OpenBatch) -> None:
        try:
            call(self._faults.before_commit)
            conn = self._conn
            if conn is None:
                raise StorageUnreachable(_WRITE_FAILED)
            conn.execute("COMMIT")
            self._in_tx = False
            call(self._faults.after_commit)
        except Exception as e:
            error = storage_error(_WRITE_FAILED, e)
            self._abort(e)
            fail_all(open_.take(), error)
            return
        answers = open_.take_with_outcomes()
        self._q.committed(answers)
        settle(answers)
        self._maybe_compact()

    def _connection(self) -> psycopg.Connection[Any]:
        """The writer's connection (a new one after a failure)."""
        if self._conn is None or self._conn.closed:
            self._conn = self._db.connect()
            self._in_tx = False
        return self._conn

    def _begin(self, conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline) -> PgTx:
        """``conn`` in a transaction (opened if none is) that shares the compaction lock."""
        if not self._in_tx:  # sent with the first request's statements
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (self._shared,))
            self._in_tx = True
        return self._db.tx(conn, pipeline)

    def _abort(self, cause: BaseException) -> None:
        """End the open transaction after ``cause``: rolled back, or the connection dropped
        when it is lost (the next batch gets a new one)."""
        conn, self._in_tx = self._conn, False
        if conn is None:
            return
        if unreachable(cause) or conn.broken:
            self._drop()
            return
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn, self._in_tx = self._conn, None, False
        if conn is not None:
            conn.close()

    def _maybe_compact(self) -> None:
        """After a commit, once ``retention.every_s`` has passed since the last pass:
        remove finished runs past the retention age, ``max_runs`` at most a pass, holding
        the compaction lock exclusively (no write transaction of any engine runs meanwhile)."""
        r, conn = self._retention, self._conn
        if r is None or conn is None or self._clock.monotonic() < self._next_compaction:
            return
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (self._shared,))
            try:
                with conn.transaction():
                    done = compact(
                        self._db.tx(conn),
                        self._clock.time() - r.age_s,
                        r.max_runs,
                        blobs_in_db=self._blobs is None,
                    )
                if self._blobs is not None and done.orphans:  # committed: nothing refers to them
                    self._blobs.delete(done.orphans)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (self._shared,))
        except (psycopg.Error, OSError) as e:  # nothing lost: tried again at the next pass
            logger.error("workflow log compaction failed: %s", e)
            self._abort(e)
            self._next_compaction = self._clock.monotonic() + r.every_s
            return
        full = done.runs >= r.max_runs
        self._next_compaction = -float("inf") if full else self._clock.monotonic() + r.every_s
        if done.runs:
            logger.info(
                "workflow log compacted: %d runs, %d events, %d blobs", done.runs, done.events, done.blobs
            )
        self._q.count(compacted_runs=done.runs, compacted_events=done.events, compacted_blobs=done.blobs)


def _new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


if TYPE_CHECKING:  # PgEventLog satisfies the port (checked by mypy, never run)
    from smss.ports import EventLog

    _check: EventLog = PgEventLog("postgresql://")
