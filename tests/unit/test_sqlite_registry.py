"""The registry port: the same behaviour from SQLite files, PostgreSQL (a fresh schema
each) and the in-memory fake."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from postgres_fixtures import pg_execute
from smss.errors import StorageUnavailable
from smss.ports import Clock, FunctionRecord, RegistryStore
from smss.spec import FunctionSpec, TensorSpec
from smss.store._pg import PgDatabase
from smss.store.postgres import PgRegistry
from smss.store.sqlite import SCHEMA_VERSION, SqliteRegistry
from smss.testing import FakeClock, MemoryRegistry


def record(name: str = "resnet", version: str = "1", at: float = 100.0) -> FunctionRecord:
    spec = FunctionSpec(
        name=name,
        inputs=(TensorSpec("x", "FP32", (-1, 3)),),
        outputs=(TensorSpec("y", "FP32", (-1,)),),
        entrypoint="model.py:Model",
        version=version,
    )
    return FunctionRecord(spec=spec, artifact_dir=f"/data/functions/{name}", deployed_at=at)


Factory = Callable[[], RegistryStore]


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
def open_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Opens a fresh registry of the kind under test."""
    opened: list[RegistryStore] = []
    databases: list[PgDatabase] = []

    def factory() -> RegistryStore:
        store: RegistryStore
        if request.param == "sqlite":
            store = SqliteRegistry(tmp_path / f"registry-{len(opened)}.db")
        elif request.param == "postgresql":
            url = request.getfixturevalue("pg_url")
            databases.append(PgDatabase(f"{url}_{len(opened)}", owner="test"))
            store = PgRegistry(databases[-1])
        else:
            store = MemoryRegistry()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
    for db in databases:
        pg_execute(db.url.conninfo, f'DROP SCHEMA "{db.schema}" CASCADE')
        db.close()


def test_round_trip(open_registry: Factory) -> None:
    reg = open_registry()
    assert reg.get_function("resnet") is None
    stored = reg.put_function(record())
    assert stored == msgspec.structs.replace(record(), generation=1)
    assert reg.get_function("resnet") == stored
    assert reg.list_functions() == [stored]


def test_replace_bumps_generation(open_registry: Factory) -> None:
    reg = open_registry()
    assert reg.put_function(record(version="1")).generation == 1
    second = reg.put_function(record(version="2", at=200.0))
    assert second.generation == 2
    assert second.spec.version == "2"
    assert reg.get_function("resnet") == second
    assert len(reg.list_functions()) == 1


def test_generation_of_the_caller_is_ignored(open_registry: Factory) -> None:
    reg = open_registry()
    stored = reg.put_function(msgspec.structs.replace(record(), generation=41))
    assert stored.generation == 1


def test_delete(open_registry: Factory) -> None:
    reg = open_registry()
    reg.put_function(record("a"))
    reg.put_function(record("b"))
    assert reg.delete_function("a") is True
    assert reg.delete_function("a") is False
    assert reg.delete_function("never") is False
    assert reg.get_function("a") is None
    assert [r.spec.name for r in reg.list_functions()] == ["b"]


def test_generation_survives_delete(open_registry: Factory) -> None:
    """Anything cached under (name, generation) must not match a redeployment."""
    reg = open_registry()
    reg.put_function(record())
    reg.delete_function("resnet")
    assert reg.put_function(record()).generation == 2


def test_list_is_sorted_by_name(open_registry: Factory) -> None:
    reg = open_registry()
    for name in ["c", "a", "b"]:
        reg.put_function(record(name))
    assert [r.spec.name for r in reg.list_functions()] == ["a", "b", "c"]


def test_closed_registry_refuses(open_registry: Factory) -> None:
    reg = open_registry()
    reg.close()
    reg.close()  # idempotent
    with pytest.raises(StorageUnavailable):
        reg.get_function("a")
    with pytest.raises(StorageUnavailable):
        reg.put_function(record())


def test_concurrent_puts_from_threads(open_registry: Factory) -> None:
    reg = open_registry()
    results: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(10):
            generation = reg.put_function(record()).generation
            with lock:
                results.append(generation)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 41))
    stored = reg.get_function("resnet")
    assert stored is not None
    assert stored.generation == 40


def test_gateways_on_one_postgresql_schema_never_share_a_generation(pg_url: str) -> None:
    """Two registries on one schema (two gateways' pools) deploying one name at once:
    every deployment gets its own generation, and both see the last."""
    dbs = [PgDatabase(pg_url, owner=f"g{i}") for i in range(2)]
    try:
        regs = [PgRegistry(db) for db in dbs]
        results: list[int] = []
        lock = threading.Lock()

        def work(reg: RegistryStore) -> None:
            for _ in range(10):
                generation = reg.put_function(record()).generation
                with lock:
                    results.append(generation)

        threads = [threading.Thread(target=work, args=(regs[i % 2],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == list(range(1, 41))
        assert [r.get_function("resnet").generation for r in regs] == [40, 40]  # type: ignore[union-attr]
        assert regs[0].delete_function("resnet")
        assert regs[1].get_function("resnet") is None
        assert regs[1].next_generation("resnet") == 41
    finally:
        for db in dbs:
            db.close()


# ---------------------------------------------------------------- SQLite only


def test_survives_reopen(tmp_path: Path) -> None:
    reg = SqliteRegistry(tmp_path / "registry.db")
    reg.put_function(record("a"))
    reg.put_function(record("a", version="2"))
    reg.put_function(record("b"))
    reg.delete_function("b")
    reg.close()
    again = SqliteRegistry(tmp_path / "registry.db")
    try:
        assert [(r.spec.name, r.generation, r.spec.version) for r in again.list_functions()] == [
            ("a", 2, "2")
        ]
        assert again.put_function(record("b")).generation == 2
    finally:
        again.close()


def test_wal_mode_and_full_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "registry.db"
    connections: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def spy(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connections.append(real_connect(*args, **kwargs))
        return connections[-1]

    monkeypatch.setattr(sqlite3, "connect", spy)
    reg = SqliteRegistry(path)
    try:
        (conn,) = connections
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL (per connection)
    finally:
        reg.close()
    monkeypatch.undo()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # stored in the file
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_stored_as_json_not_pickle(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    reg = SqliteRegistry(path)
    reg.put_function(record())
    reg.close()
    db = sqlite3.connect(path)
    try:
        (blob,) = db.execute("SELECT record FROM functions").fetchone()
    finally:
        db.close()
    assert msgspec.json.decode(blob)["spec"]["name"] == "resnet"


def test_garbage_file_is_storage_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a database, just some bytes " * 200)
    with pytest.raises(StorageUnavailable, match="corrupt"):
        SqliteRegistry(path)


def test_damaged_pages_are_storage_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    reg = SqliteRegistry(path)
    for i in range(200):
        reg.put_function(record(f"f{i:03d}"))
    reg.close()  # checkpoints the WAL into the main file
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[page + 8 : 3 * page] = b"\xa5" * (2 * page - 8)  # scribble over b-tree pages
    path.write_bytes(bytes(data))
    with pytest.raises(StorageUnavailable, match="corrupt"):
        SqliteRegistry(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SqliteRegistry(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StorageUnavailable, match="newer than this SMSS supports"):
        SqliteRegistry(path)


def test_unreadable_location_is_storage_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailable):
        SqliteRegistry(tmp_path / "no" / "such" / "dir" / "registry.db")


def test_fakes_satisfy_the_ports() -> None:
    """mypy checks these assignments (``mypy tests/unit/test_sqlite_registry.py``)."""
    clock: Clock = FakeClock(start=5.0, wall_start=1000.0)
    registry: RegistryStore = MemoryRegistry()
    assert clock.monotonic() == 5.0
    assert clock.time() == 1000.0
    fake = FakeClock()
    assert fake.advance(2.5) == 2.5
    assert fake.time() - fake.monotonic() == 1_700_000_000.0
    with pytest.raises(ValueError, match="forward"):
        fake.advance(-1)
    registry.close()
