"""Compaction of the workflow log: finished runs older than the retention age go,
with their events and every blob nothing else refers to. (Part of
:mod:`smss.store.sqlite_log`.)

Which blobs a run or a session state refers to is kept in two tables written with
the records (``blob_refs``: run -> ref, for every ref its events name and every
blob its requests wrote; ``state_refs``: session -> the refs of its current state),
so compaction touches only the runs it removes and the blobs they referred to,
never the whole log. A blob goes once no remaining run and no session state refers
to it. A run that has not finished (``running``) is never removed, however old.

Removing a finished run forgets its idempotency key too: a retry with that key after
the retention age starts a new run.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

from smss.store import _log_ops as ops

logger = logging.getLogger("smss.store.sqlite_log")

FINISHED = ("completed", "failed", "parked")


@dataclass(frozen=True)
class Compacted:
    runs: int = 0
    events: int = 0
    blobs: int = 0


def compact(db: sqlite3.Connection, cutoff: float, max_runs: int) -> Compacted:
    """Remove up to ``max_runs`` finished runs last updated before ``cutoff`` (wall
    time, as ``runs.updated``), oldest first, in the caller's transaction."""
    victims = [
        r[0]
        for r in db.execute(
            "SELECT run_id FROM runs WHERE status IN (?, ?, ?) AND updated < ? ORDER BY updated LIMIT ?",
            (*FINISHED, cutoff, max_runs),
        )
    ]
    if not victims:
        return Compacted()
    db.execute("CREATE TEMP TABLE IF NOT EXISTS compacting (run_id TEXT PRIMARY KEY)")
    db.execute("DELETE FROM compacting")
    db.executemany("INSERT INTO compacting (run_id) VALUES (?)", [(r,) for r in victims])
    candidates = [
        r[0]
        for r in db.execute(
            "SELECT DISTINCT ref FROM blob_refs WHERE run_id IN (SELECT run_id FROM compacting)"
        )
    ]
    events = db.execute("DELETE FROM events WHERE run_id IN (SELECT run_id FROM compacting)").rowcount
    db.execute("DELETE FROM blob_refs WHERE run_id IN (SELECT run_id FROM compacting)")
    db.execute("DELETE FROM runs WHERE run_id IN (SELECT run_id FROM compacting)")
    db.execute("DELETE FROM compacting")
    blobs = 0
    for ref in candidates:
        if db.execute("SELECT 1 FROM blob_refs WHERE ref = ? LIMIT 1", (ref,)).fetchone():
            continue
        if db.execute("SELECT 1 FROM state_refs WHERE ref = ? LIMIT 1", (ref,)).fetchone():
            continue
        blobs += db.execute("DELETE FROM blobs WHERE ref = ?", (ref,)).rowcount
    return Compacted(len(victims), int(events), blobs)


def backfill(db: sqlite3.Connection) -> None:
    """Fill the reference tables of a log written before they existed (a migration).
    Blobs that nothing refers to are left alone: they are not any run's to remove."""
    for run_id, seq, body, crc in db.execute("SELECT run_id, seq, body, crc FROM events").fetchall():
        ops.add_refs(db, run_id, list(ops.refs_of(ops.decode_event(seq, bytes(body), crc))))
    for workflow, session, tensors in db.execute(
        "SELECT workflow, session, tensors FROM session_state"
    ).fetchall():
        ops.set_state_refs(
            db, workflow, session, ops.state_tensors(bytes(tensors), workflow, session).values()
        )
    logger.info("workflow log: blob references indexed for compaction")
