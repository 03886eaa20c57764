"""An in-memory :class:`smss.ports.RegistryStore` with the SQLite registry's behaviour."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import msgspec

from smss.errors import StorageUnavailable
from smss.ports import FunctionRecord

if TYPE_CHECKING:
    from smss.ports import RegistryStore


class MemoryRegistry:
    """Same contract as :class:`smss.store.sqlite.SqliteRegistry`: ``put_function``
    stores the record with the next generation of its name (which never goes back,
    not even across a delete), listing is by name, and any call after ``close``
    raises :class:`StorageUnavailable`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, FunctionRecord] = {}
        self._generations: dict[str, int] = {}
        self._closed = False

    def put_function(self, record: FunctionRecord) -> FunctionRecord:
        name = record.spec.name
        with self._lock:
            self._check_open()
            generation = self._generations.get(name, 0) + 1
            stored = msgspec.structs.replace(record, generation=generation)
            self._generations[name] = generation
            self._records[name] = stored
            return stored

    def next_generation(self, name: str) -> int:
        with self._lock:
            self._check_open()
            return self._generations.get(name, 0) + 1

    def get_function(self, name: str) -> FunctionRecord | None:
        with self._lock:
            self._check_open()
            return self._records.get(name)

    def list_functions(self) -> list[FunctionRecord]:
        with self._lock:
            self._check_open()
            return [self._records[name] for name in sorted(self._records)]

    def delete_function(self, name: str) -> bool:
        with self._lock:
            self._check_open()
            return self._records.pop(name, None) is not None

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StorageUnavailable("the function registry is closed")


if TYPE_CHECKING:  # MemoryRegistry satisfies the port (checked by mypy, never run)
    _check: RegistryStore = MemoryRegistry()
