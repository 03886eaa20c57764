"""Opening the workflow log: refuse a damaged file before anything writes to it,
then pragmas and the versioned schema. (Part of :mod:`smss.store.sqlite_log`.)"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from smss.errors import StorageUnavailable
from smss.store._log_compact import backfill
from smss.store._log_tx import SqliteTx, Tx
from smss.store._wal import page_size, wal_damage

logger = logging.getLogger("smss.store.sqlite_log")

#: Each migration: SQL statements, or functions of the connection, in one transaction.
_MIGRATIONS: tuple[tuple[str | Callable[[Tx], None], ...], ...] = (
    (
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            workflow TEXT NOT NULL,
            session TEXT,
            status TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            idempotency_key TEXT UNIQUE,
            started_seq INTEGER NOT NULL  -- seq of its RunStarted: the order of runs
        )""",
        "CREATE INDEX runs_by_status ON runs (status, started_seq)",
        "CREATE INDEX runs_by_workflow ON runs (workflow, started_seq)",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            type TEXT NOT NULL,
            stage TEXT,
            attempt INTEGER,
            ts REAL NOT NULL,
            body BLOB NOT NULL,  -- msgpack of the tagged Event union, never pickle
            crc INTEGER NOT NULL  -- zlib.crc32 of body
        )""",
        "CREATE INDEX events_by_run ON events (run_id, seq)",
        # The first StageCompleted of a stage wins; INSERT OR IGNORE drops later ones.
        "CREATE UNIQUE INDEX one_completion ON events (run_id, stage) WHERE type = 'StageCompleted'",
        "CREATE TABLE blobs (ref TEXT PRIMARY KEY, data BLOB NOT NULL)",
        """CREATE TABLE session_state (
            workflow TEXT NOT NULL,
            session TEXT NOT NULL,
            version INTEGER NOT NULL,
            tensors BLOB NOT NULL,  -- msgpack of name -> blob ref
            PRIMARY KEY (workflow, session)
        ) WITHOUT ROWID""",
    ),
    (
        # What compaction needs (smss.store._log_compact): which runs and session
        # states refer to each blob, and finished runs by age.
        """CREATE TABLE blob_refs (
            ref TEXT NOT NULL,
            run_id TEXT NOT NULL,
            PRIMARY KEY (ref, run_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX blob_refs_by_run ON blob_refs (run_id)",
        """CREATE TABLE state_refs (
            ref TEXT NOT NULL,
            workflow TEXT NOT NULL,
            session TEXT NOT NULL,
            PRIMARY KEY (ref, workflow, session)
        ) WITHOUT ROWID""",
        "CREATE INDEX state_refs_by_session ON state_refs (workflow, session)",
        "CREATE INDEX runs_by_updated ON runs (status, updated)",
        backfill,
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

#: Files up to this size get ``PRAGMA integrity_check`` at open; larger ones ``quick_check``.
FULL_CHECK_MAX_BYTES = 256 * 1024 * 1024
#: The size a reused ``-wal`` file is cut back to when a new generation starts.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024
#: Seconds a connection waits for a lock held by another connection.
BUSY_TIMEOUT_S = 10.0


def reason(e: BaseException) -> str:
    """Words safe to show a client: SQLite's or the OS's, without paths."""
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return str(e) or type(e).__name__


def unavailable(path: Path, message: str, cause: object) -> StorageUnavailable:
    # The message may reach clients, so the path and SQLite's words go to the log only.
    logger.error("%s: %s (%s)", message, path, cause)
    return StorageUnavailable(message)


def refuse_damaged(path: Path) -> None:
    """Refuse a damaged file before anything writes to it. A read-write connection must
    not be opened first: closing it would checkpoint what SQLite recovered and delete
    the -wal file, evidence and intact later commits with it. So the -wal file is read
    directly and the database through a read-only connection, which leaves both as
    they are. (The log has one writer; another process writing meanwhile could make an
    intact -wal file look damaged, never the reverse.)"""
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        damage = wal_damage(Path(f"{path}-wal"), page_size(path))
        probe = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            big = path.stat().st_size > FULL_CHECK_MAX_BYTES
            problems = [
                r[0] for r in probe.execute(f"PRAGMA {'quick' if big else 'integrity'}_check").fetchall()
            ]
            version = probe.execute("PRAGMA user_version").fetchone()[0]
        finally:
            probe.close()
    except (sqlite3.Error, OSError) as e:
        raise unavailable(path, f"the workflow log file is corrupt or unreadable ({reason(e)})", e) from None
    if damage:
        raise unavailable(
            path,
            f"the workflow log's -wal file is damaged: {damage} committed transaction(s) after a "
            "damaged frame would be silently lost, so it is not opened. Restore it from a copy, or "
            "accept the loss: `sqlite3 <file> 'PRAGMA wal_checkpoint(TRUNCATE)'` keeps what precedes "
            "the damage",
            damage,
        )
    if problems != ["ok"]:
        raise unavailable(
            path,
            "the workflow log file is corrupt (integrity check failed)",
            "; ".join(map(str, problems[:5])),
        )
    if version > SCHEMA_VERSION:
        raise unavailable(
            path,
            f"the workflow log has schema version {version}, newer than this SMSS supports "
            f"({SCHEMA_VERSION}); upgrade SMSS",
            version,
        )


def setup(db: sqlite3.Connection, path: Path) -> None:
    """Pragmas and the schema, on the checked file; raises StorageUnavailable."""
    try:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA wal_autocheckpoint = 0")  # the writer checkpoints itself
        # The -wal file is reused after a checkpoint; one that a burst made large is cut
        # back to this when its next generation starts.
        db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as e:
        raise unavailable(path, f"the workflow log file is corrupt or unreadable ({reason(e)})", e) from None
    if str(mode).lower() != "wal":
        raise unavailable(path, "the workflow log cannot use WAL mode", mode)
    for v in range(version, SCHEMA_VERSION):
        try:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("PRAGMA user_version").fetchone()[0] == v:  # not done by another process meanwhile
                for step in _MIGRATIONS[v]:
                    if isinstance(step, str):
                        db.execute(step)
                    else:
                        step(SqliteTx(db))
                db.execute(f"PRAGMA user_version = {v + 1}")
            db.execute("COMMIT")
        except (sqlite3.Error, StorageUnavailable) as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise unavailable(path, "the workflow log schema could not be created", e) from None
