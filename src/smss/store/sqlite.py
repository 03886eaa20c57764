"""The function registry in one SQLite file (WAL mode, ``synchronous=FULL``).

Records are stored as msgspec JSON, never pickled. Every write is committed (and,
with ``synchronous=FULL``, fsynced) before the call returns. One connection serves
all threads behind a lock: the registry is small and written rarely, so a lock is
simpler than a pool and cannot deadlock on SQLite's own locks.

``generation`` counts deployments of a name and never goes back, not even across a
delete and redeploy, so anything cached under ``(name, generation)`` cannot be
mistaken for the current deployment. Deleted names leave a tombstone row for that.

The schema version lives in ``PRAGMA user_version``; :data:`_MIGRATIONS` brings an
older file forward, and a file newer than this code is refused rather than guessed at.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec

from smss.errors import StorageUnavailable
from smss.ports import FunctionRecord, RegistryStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Index i holds the statements taking the schema from version i to i + 1; each step
# runs in one transaction together with its ``user_version`` bump.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE functions (
            name TEXT PRIMARY KEY,
            generation INTEGER NOT NULL,
            record BLOB  -- msgspec JSON of FunctionRecord; NULL once deleted (a tombstone)
        ) WITHOUT ROWID""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(FunctionRecord)


class SqliteRegistry:
    """:class:`smss.ports.RegistryStore` on an SQLite file (the server keeps it in its data
    dir). Opening checks the file's integrity and raises :class:`StorageUnavailable`
    if it is corrupt or unreadable; the file is created if missing."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as e:
            raise self._unavailable("could not open the function registry", e) from None
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------ RegistryStore

    def put_function(self, record: FunctionRecord) -> FunctionRecord:
        def put(db: sqlite3.Connection) -> FunctionRecord:
            row = db.execute(
                "SELECT generation FROM functions WHERE name = ?", (record.spec.name,)
            ).fetchone()
            stored = msgspec.structs.replace(record, generation=row[0] + 1 if row else 1)
            db.execute(
                "INSERT INTO functions (name, generation, record) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET "
                "generation = excluded.generation, record = excluded.record",
                (record.spec.name, stored.generation, _encoder.encode(stored)),
            )
            return stored

        return self._run(put, write=True)

    def next_generation(self, name: str) -> int:
        def next_(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT generation FROM functions WHERE name = ?", (name,)).fetchone()
            return int(row[0]) + 1 if row else 1

        return self._run(next_)

    def get_function(self, name: str) -> FunctionRecord | None:
        def get(db: sqlite3.Connection) -> FunctionRecord | None:
            row = db.execute(
                "SELECT record FROM functions WHERE name = ? AND record IS NOT NULL", (name,)
            ).fetchone()
            return None if row is None else _decode(row[0])

        return self._run(get)

    def list_functions(self) -> list[FunctionRecord]:
        def list_(db: sqlite3.Connection) -> list[FunctionRecord]:
            rows = db.execute(
                "SELECT record FROM functions WHERE record IS NOT NULL ORDER BY name"
            ).fetchall()
            return [_decode(r[0]) for r in rows]

        return self._run(list_)

    def delete_function(self, name: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE functions SET record = NULL WHERE name = ? AND record IS NOT NULL",
                (name,),
            )
            return cur.rowcount > 0

        return self._run(delete, write=True)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # ------------------------------------------------------------ internals

    def _setup(self) -> None:
        db = self._db
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            db.execute("PRAGMA synchronous = FULL")
            problems = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            # Said at start-up to the operator: SQLite's words ("file is not a database")
            # help and hold no path.
            raise self._unavailable(f"the function registry file is corrupt or unreadable ({e})", e) from None
        if problems != ["ok"]:
            raise self._unavailable(
                "the function registry file is corrupt (integrity check failed)",
                "; ".join(map(str, problems[:5])),
            )
        if str(mode).lower() != "wal":
            raise self._unavailable("the function registry cannot use WAL mode", mode)
        if version > SCHEMA_VERSION:
            raise self._unavailable(
                f"the function registry has schema version {version}, newer than this "
                f"SMSS supports ({SCHEMA_VERSION}); upgrade SMSS",
                version,
            )
        for v in range(version, SCHEMA_VERSION):
            self._run(functools.partial(_migrate, version=v), write=True, lock=False)

    def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False, lock: bool = True) -> T:
        """Run ``fn`` under the lock; writes inside one immediate transaction."""
        if lock:
            with self._lock:
                return self._run(fn, write=write, lock=False)
        if self._closed:
            raise StorageUnavailable("the function registry is closed")
        db = self._db
        try:
            if not write:
                return fn(db)
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # also after a failed COMMIT (disk full, I/O error)
                    with contextlib.suppress(sqlite3.Error):
                        db.rollback()
                raise
            return result
        except sqlite3.Error as e:
            raise self._unavailable("the function registry could not be read or written", e) from None

    def _unavailable(self, message: str, cause: object) -> StorageUnavailable:
        # The message may reach clients, so the path and SQLite's words go to the log only.
        logger.error("%s: %s (%s)", message, self.path, cause)
        return StorageUnavailable(message)


def _migrate(db: sqlite3.Connection, version: int) -> None:
    for statement in _MIGRATIONS[version]:
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {version + 1}")


def _decode(data: bytes) -> FunctionRecord:
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as e:
        logger.error("undecodable function registry record: %s", e)
        raise StorageUnavailable("a function registry record is unreadable") from None


if TYPE_CHECKING:  # SqliteRegistry satisfies the port (checked by mypy, never run)
    _check: RegistryStore = SqliteRegistry("registry.db")
