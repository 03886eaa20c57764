"""The one SQL dialect the workflow log's requests are written in, and its SQLite end.

Both backends of the log (:mod:`smss.store.sqlite_log`, :mod:`smss.store.postgres_log`)
run the same requests (:mod:`smss.store._log_ops`), reads (:mod:`smss.store._log_reads`)
and compaction (:mod:`smss.store._log_compact`) through a :class:`Tx`: SQL that SQLite
and PostgreSQL both accept (``?`` placeholders, ``ON CONFLICT DO NOTHING``,
``RETURNING``), plus the few things only a database with several writers needs,
which SQLite's single writer does without (:meth:`Tx.lock_run`, :meth:`Tx.lock`).
So each rule of the log (a second completion is dropped, a stale attempt is fenced,
a state write is conditional) has one copy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

Row = tuple[Any, ...]


class Tx(Protocol):
    """A connection inside the log's transaction (or, for reads, outside one)."""

    #: The database's name for a byte string column type (``BLOB`` / ``BYTEA``).
    BLOB: str

    def one(self, sql: str, args: Sequence[object] = ()) -> Row | None: ...

    def all(self, sql: str, args: Sequence[object] = ()) -> list[Row]: ...

    def run(self, sql: str, args: Sequence[object] = ()) -> int:
        """Execute a write; the number of rows it changed."""
        ...

    def write(self, sql: str, args: Sequence[object] = ()) -> None:
        """A write whose answer nobody reads: it may travel with the statements after it
        (PostgreSQL pipelines them), and its error surfaces at the next statement that
        is answered, which fails the whole transaction anyway."""
        ...

    def many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """:meth:`write` for each of ``rows``."""
        ...

    def later(self, sql: str, args: Sequence[object] = ()) -> Callable[[], Row | None]:
        """A statement whose one row (or None) is read later, by calling the result:
        sent now, with the writes around it, answered when it is read."""
        ...

    def lock_run(self, run_id: str) -> bool | None:
        """Hold the run's row until the transaction ends, so that the checks of an
        append and its writes see no other writer's records of the run in between;
        raises :class:`smss.errors.RunNotOwned` (before anything is written) when
        another live process drives the run. Whether the run exists, or None when that
        is not known (with one writer: SQLite takes no row lock, it holds the database)."""
        ...

    def lock(self, *names: str) -> None:
        """Hold a lock on each name (an idempotency key, a session) until the
        transaction ends. No-op with one writer."""
        ...


class SqliteTx:
    """:class:`Tx` on the single writer's (or a reader's) SQLite connection."""

    BLOB = "BLOB"

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def one(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        row: Row | None = self.db.execute(sql, args).fetchone()
        return row

    def all(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return self.db.execute(sql, args).fetchall()

    def run(self, sql: str, args: Sequence[object] = ()) -> int:
        return int(self.db.execute(sql, args).rowcount)

    def write(self, sql: str, args: Sequence[object] = ()) -> None:
        self.db.execute(sql, args)

    def many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self.db.executemany(sql, rows)

    def later(self, sql: str, args: Sequence[object] = ()) -> Callable[[], Row | None]:
        row: Row | None = self.db.execute(sql, args).fetchone()
        return lambda: row

    def lock_run(self, run_id: str) -> bool | None:
        return None  # one writer, in a BEGIN IMMEDIATE transaction

    def lock(self, *names: str) -> None:
        pass


if TYPE_CHECKING:  # SqliteTx satisfies the protocol (checked by mypy, never run)
    _check: Tx = SqliteTx(sqlite3.connect(":memory:"))
