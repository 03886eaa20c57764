"""The function registry and the workflow definitions in PostgreSQL (``--store
postgresql://...``), in the schema of :class:`smss.store._pg.PgDatabase`, with the
SQLite stores' semantics: records as msgspec JSON, never pickled; every write
committed (``synchronous_commit = on``) before the call returns; ``generation`` per
name never reused, not even across a delete (a tombstone row keeps it).

Several gateways may write at once: ``put_function`` takes the name's row lock
(``SELECT ... FOR UPDATE``, or the insert's conflict) before it reads the last
generation, so two deployments of one name get two generations, never one twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import msgspec

from smss.errors import StorageUnavailable
from smss.ports import FunctionRecord
from smss.store._pg import PgDatabase, PgTx
from smss.workflow.spec import WorkflowSpec

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_record = msgspec.json.Decoder(FunctionRecord)
_spec = msgspec.json.Decoder(WorkflowSpec)


def _decode_record(data: bytes) -> FunctionRecord:
    try:
        return _record.decode(data)
    except msgspec.DecodeError:
        raise StorageUnavailable("a function registry record is unreadable") from None


class PgRegistry:
    """:class:`smss.ports.RegistryStore` in PostgreSQL."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db
        self._closed = False

    def put_function(self, record: FunctionRecord) -> FunctionRecord:
        name = record.spec.name

        def put(tx: PgTx) -> FunctionRecord:
            # The row exists (a placeholder at generation 0 if new) and is locked: the
            # generation read next cannot change before this commits.
            tx.run("INSERT INTO functions (name, generation) VALUES (?, 0) ON CONFLICT DO NOTHING", (name,))
            row = tx.one("SELECT generation FROM functions WHERE name = ? FOR UPDATE", (name,))
            stored = msgspec.structs.replace(record, generation=(row[0] if row else 0) + 1)
            tx.run(
                "UPDATE functions SET generation = ?, record = ? WHERE name = ?",
                (stored.generation, _encoder.encode(stored), name),
            )
            return stored

        return self._write(put)

    def next_generation(self, name: str) -> int:
        row = self._read(lambda tx: tx.one("SELECT generation FROM functions WHERE name = ?", (name,)))
        return int(row[0]) + 1 if row else 1

    def get_function(self, name: str) -> FunctionRecord | None:
        row = self._read(
            lambda tx: tx.one("SELECT record FROM functions WHERE name = ? AND record IS NOT NULL", (name,))
        )
        return None if row is None else _decode_record(bytes(row[0]))

    def list_functions(self) -> list[FunctionRecord]:
        rows = self._read(
            lambda tx: tx.all("SELECT record FROM functions WHERE record IS NOT NULL ORDER BY name")
        )
        return [_decode_record(bytes(r[0])) for r in rows]

    def delete_function(self, name: str) -> bool:
        return self._write(
            lambda tx: (
                tx.run("UPDATE functions SET record = NULL WHERE name = ? AND record IS NOT NULL", (name,))
                > 0
            )
        )

    def close(self) -> None:
        self._closed = True  # the pool is the PgDatabase's, closed by its owner

    def _read(self, fn: Callable[[PgTx], T]) -> T:
        if self._closed:
            raise StorageUnavailable("the function registry is closed")
        return self._db.read("the function registry could not be read", fn)

    def _write(self, fn: Callable[[PgTx], T]) -> T:
        if self._closed:
            raise StorageUnavailable("the function registry is closed")
        return self._db.write("the function registry could not be written", fn)


class PgWorkflows:
    """:class:`smss.ports.WorkflowStore` in PostgreSQL."""

    def __init__(self, db: PgDatabase) -> None:
        self._db = db

    def put(self, spec: WorkflowSpec) -> None:
        self._db.write(
            "the workflow registry could not be written",
            lambda tx: tx.run(
                "INSERT INTO workflows (name, spec, deployed_at) VALUES (?, ?, ?) ON CONFLICT (name) "
                "DO UPDATE SET spec = excluded.spec, deployed_at = excluded.deployed_at",
                (spec.name, msgspec.json.encode(spec), time.time()),
            ),
        )

    def get(self, name: str) -> WorkflowSpec | None:
        row = self._db.read(
            "the workflow registry could not be read",
            lambda tx: tx.one("SELECT spec FROM workflows WHERE name = ?", (name,)),
        )
        return None if row is None else _spec.decode(bytes(row[0]))

    def list(self) -> list[WorkflowSpec]:
        rows = self._db.read(
            "the workflow registry could not be read",
            lambda tx: tx.all("SELECT spec FROM workflows ORDER BY name"),
        )
        return [_spec.decode(bytes(r[0])) for r in rows]

    def delete(self, name: str) -> bool:
        return self._db.write(
            "the workflow registry could not be written",
            lambda tx: tx.run("DELETE FROM workflows WHERE name = ?", (name,)) > 0,
        )

    def close(self) -> None:
        pass  # the pool is the PgDatabase's


if TYPE_CHECKING:  # both satisfy their ports (checked by mypy, never run)
    from smss.ports import RegistryStore, WorkflowStore

    _registry: RegistryStore = PgRegistry(PgDatabase("postgresql://", owner=""))
    _workflows: WorkflowStore = PgWorkflows(PgDatabase("postgresql://", owner=""))
