"""Deployed workflow definitions, in SQLite (WAL, synchronous=FULL), stored as JSON."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import msgspec

from smss.errors import StorageUnavailable
from smss.workflow.spec import WorkflowSpec


class SqliteWorkflows:
    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS workflows "
                "(name TEXT PRIMARY KEY, spec BLOB NOT NULL, deployed_at REAL)"
            )
        except sqlite3.Error as e:
            raise StorageUnavailable(f"cannot open the workflow registry: {e}") from None
        self._lock = threading.Lock()

    def put(self, spec: WorkflowSpec) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO workflows (name, spec, deployed_at) VALUES (?, ?, ?)",
                (spec.name, msgspec.json.encode(spec), time.time()),
            )

    def get(self, name: str) -> WorkflowSpec | None:
        with self._lock:
            row = self._db.execute("SELECT spec FROM workflows WHERE name = ?", (name,)).fetchone()
        return None if row is None else msgspec.json.decode(row[0], type=WorkflowSpec)

    def list(self) -> list[WorkflowSpec]:
        with self._lock:
            rows = self._db.execute("SELECT spec FROM workflows ORDER BY name").fetchall()
        return [msgspec.json.decode(r[0], type=WorkflowSpec) for r in rows]

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM workflows WHERE name = ?", (name,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
