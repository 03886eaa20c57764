"""The workflow log's reads, in the SQL both backends speak (:mod:`smss.store._log_tx`).
Each backend runs them on its own read connection and maps its errors."""

from __future__ import annotations

import abc
import hashlib
import logging
from collections.abc import Callable
from typing import TypeVar

from smss.errors import NotFound, StorageUnavailable
from smss.ports import BlobStore
from smss.store import _log_ops as ops
from smss.store._log_tx import Tx
from smss.workflow.events import Record, RunSummary, SessionState

logger = logging.getLogger("smss.store.log")

T = TypeVar("T")

SUMMARY = "SELECT run_id, workflow, session, status, created, updated FROM runs"


def read_run(tx: Tx, run_id: str) -> list[Record]:
    """The run's records in seq order; empty for an unknown run."""
    rows = tx.all(
        f"SELECT seq, ts, CAST(body AS {tx.BLOB}), crc FROM events WHERE run_id = ? ORDER BY seq", (run_id,)
    )
    return [Record(seq, run_id, ts, ops.decode_event(seq, bytes(body), crc)) for seq, ts, body, crc in rows]


def run_summary(tx: Tx, run_id: str) -> RunSummary | None:
    row = tx.one(f"{SUMMARY} WHERE run_id = ?", (run_id,))
    return None if row is None else RunSummary(*row)


def list_runs(tx: Tx, status: str | None, workflow: str | None, limit: int) -> list[RunSummary]:
    """Newest first (by the seq of each run's RunStarted)."""
    where = [(c, v) for c, v in (("status = ?", status), ("workflow = ?", workflow)) if v is not None]
    clause = f"WHERE {' AND '.join(c for c, _ in where)}" if where else ""
    sql = f"{SUMMARY} {clause} ORDER BY started_seq DESC LIMIT ?"
    return [RunSummary(*r) for r in tx.all(sql, (*(v for _, v in where), max(0, limit)))]


def unfinished_runs(tx: Tx) -> list[str]:
    """Runs still ``running``, oldest first."""
    return [r[0] for r in tx.all("SELECT run_id FROM runs WHERE status = 'running' ORDER BY started_seq")]


def stored_blob(tx: Tx, ref: str) -> bytes | None:
    """A blob kept in the database; None when it has none of that ref."""
    row = tx.one("SELECT data FROM blobs WHERE ref = ?", (ref,))
    return None if row is None else bytes(row[0])


def referenced(tx: Tx, ref: str) -> bool:
    """Whether a run or a session state of the log refers to the blob (with blobs kept
    outside the database: a file there may be left over from a refused request)."""
    return (
        tx.one("SELECT 1 FROM blob_refs WHERE ref = ? LIMIT 1", (ref,)) is not None
        or tx.one("SELECT 1 FROM state_refs WHERE ref = ? LIMIT 1", (ref,)) is not None
    )


def checked_blob(ref: str, data: bytes | None, where: object) -> bytes:
    """``data`` once it is known to be the blob ``ref`` names (its sha256)."""
    if data is None:
        raise NotFound(f"unknown blob {ref[:12]}")
    if hashlib.sha256(data).hexdigest() != ref:
        logger.error("blob %s in %s does not match its sha256", ref, where)
        raise StorageUnavailable(f"blob {ref[:12]} is corrupt (content hash mismatch)")
    return data


def get_state(tx: Tx, workflow: str, session: str) -> SessionState:
    row = tx.one(
        "SELECT version, tensors FROM session_state WHERE workflow = ? AND session = ?", (workflow, session)
    )
    if row is None:
        return SessionState(0, {})
    return SessionState(int(row[0]), ops.state_tensors(bytes(row[1]), workflow, session))


class LogReads(abc.ABC):
    """The reads of :class:`smss.ports.EventLog`, one copy for both backends: each runs
    them through its own ``_read`` (its read connection, its error mapping); blobs come
    from the log's database, or from ``_blobs`` when they live beside it."""

    _blobs: BlobStore | None

    @abc.abstractmethod
    def _read(self, fn: Callable[[Tx], T]) -> T: ...

    @property
    @abc.abstractmethod
    def _blob_origin(self) -> object:
        """Where blobs stored in the database come from, for a corrupt blob's error."""

    def read_run(self, run_id: str) -> list[Record]:
        """The run's records in seq order; empty for an unknown run."""
        return self._read(lambda tx: read_run(tx, run_id))

    def run_summary(self, run_id: str) -> RunSummary | None:
        return self._read(lambda tx: run_summary(tx, run_id))

    def list_runs(
        self, status: str | None = None, workflow: str | None = None, limit: int = 100
    ) -> list[RunSummary]:
        """Newest first (by the seq of each run's RunStarted)."""
        return self._read(lambda tx: list_runs(tx, status, workflow, limit))

    def unfinished_runs(self) -> list[str]:
        """Runs still ``running`` (whoever drives them), oldest first."""
        return self._read(unfinished_runs)

    def get_blob(self, ref: str) -> bytes:
        if self._blobs is None:
            return checked_blob(ref, self._read(lambda tx: stored_blob(tx, ref)), self._blob_origin)
        store = self._blobs
        data = store.get(ref) if self._read(lambda tx: referenced(tx, ref)) else None
        return checked_blob(ref, data, store)

    def get_state(self, workflow: str, session: str) -> SessionState:
        return self._read(lambda tx: get_state(tx, workflow, session))
