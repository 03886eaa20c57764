"""Compaction of the workflow log: finished runs older than the retention age go,
with their events and every blob nothing else refers to. Shared by both backends
(:mod:`smss.store.sqlite_log`, :mod:`smss.store.postgres_log`).

Which blobs a run or a session state refers to is kept in two tables written with
the records (``blob_refs``: run -> ref, for every ref its events name and every
blob its requests wrote; ``state_refs``: session -> the refs of its current state),
so compaction touches only the runs it removes and the blobs they referred to,
never the whole log. A blob goes once no remaining run and no session state refers
to it. A run that has not finished (``running``) is never removed, however old.
With several writers (PostgreSQL) a pass holds a lock that every write transaction
shares, so no writer can add a reference to a blob between the check that finds it
unreferenced and its removal.

Removing a finished run forgets its idempotency key too: a retry with that key after
the retention age starts a new run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from smss.store import _log_ops as ops
from smss.store._log_tx import Tx

logger = logging.getLogger("smss.store.log")

FINISHED = ("completed", "failed", "parked")


@dataclass(frozen=True)
class Compacted:
    runs: int = 0
    events: int = 0
    blobs: int = 0
    #: With blobs kept outside the database: the refs nothing refers to any more, for
    #: the caller to remove from the blob store once this pass has committed.
    orphans: tuple[str, ...] = ()


def compact(tx: Tx, cutoff: float, max_runs: int, *, blobs_in_db: bool = True) -> Compacted:
    """Remove up to ``max_runs`` finished runs last updated before ``cutoff`` (wall
    time, as ``runs.updated``), oldest first, in the caller's transaction."""
    victims = [
        r[0]
        for r in tx.all(
            "SELECT run_id FROM runs WHERE status IN (?, ?, ?) AND updated < ? ORDER BY updated LIMIT ?",
            (*FINISHED, cutoff, max_runs),
        )
    ]
    if not victims:
        return Compacted()
    tx.run("CREATE TEMP TABLE IF NOT EXISTS compacting (run_id TEXT PRIMARY KEY)")
    tx.run("DELETE FROM compacting")
    tx.many("INSERT INTO compacting (run_id) VALUES (?)", [(r,) for r in victims])
    candidates = [
        r[0]
        for r in tx.all(
            "SELECT DISTINCT ref FROM blob_refs WHERE run_id IN (SELECT run_id FROM compacting) ORDER BY ref"
        )
    ]
    events = tx.run("DELETE FROM events WHERE run_id IN (SELECT run_id FROM compacting)")
    tx.run("DELETE FROM blob_refs WHERE run_id IN (SELECT run_id FROM compacting)")
    tx.run("DELETE FROM runs WHERE run_id IN (SELECT run_id FROM compacting)")
    tx.run("DELETE FROM compacting")
    blobs = 0
    orphans = []
    for ref in candidates:
        if tx.one("SELECT 1 FROM blob_refs WHERE ref = ? LIMIT 1", (ref,)):
            continue
        if tx.one("SELECT 1 FROM state_refs WHERE ref = ? LIMIT 1", (ref,)):
            continue
        if blobs_in_db:
            blobs += tx.run("DELETE FROM blobs WHERE ref = ?", (ref,))
        else:
            orphans.append(ref)
    return Compacted(len(victims), int(events), blobs + len(orphans), tuple(orphans))


def backfill(tx: Tx) -> None:
    """Fill the reference tables of a log written before they existed (a migration).
    Blobs that nothing refers to are left alone: they are not any run's to remove."""
    for run_id, seq, body, crc in tx.all("SELECT run_id, seq, body, crc FROM events"):
        ops.add_refs(tx, run_id, list(ops.refs_of(ops.decode_event(seq, bytes(body), crc))))
    for workflow, session, tensors in tx.all("SELECT workflow, session, tensors FROM session_state"):
        ops.set_state_refs(
            tx, workflow, session, ops.state_tensors(bytes(tensors), workflow, session).values()
        )
    logger.info("workflow log: blob references indexed for compaction")
