"""PostgreSQL for the tests (a pytest plugin, loaded by tests/conftest.py).

The shared server is the machine's: ``127.0.0.1:5432``, database ``test``, user
``postgres``, trust authentication (``SMSS_TEST_PG`` names another). ``scripts/services``
starts it. Each test gets a fresh schema of its own (``pg_url``), dropped afterwards.
In CI (``CI=true``) a missing server fails the tests that need it; elsewhere they skip.

A test that stops its server (the fault tests) runs a private one instead
(:class:`PrivateServer`): ``initdb`` in a temporary directory, its own port, run as the
``postgres`` user (initdb refuses root), never the shared one.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest

SERVER = os.environ.get("SMSS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BIN = Path("/usr/lib/postgresql/15/bin")


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a test whose service is missing fails)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server() -> str:
    try:
        psycopg.connect(SERVER, connect_timeout=3).close()
    except psycopg.Error as e:
        missing(f"PostgreSQL is not reachable at {SERVER} (run scripts/services): {e}".strip())
    return SERVER


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A ``--store`` URL naming a fresh schema on the shared server."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield f"{pg_server}?schema={schema}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def pg_execute(url: str, sql: str, args: Sequence[object] = ()) -> list[tuple[object, ...]]:
    """Run one statement (``?`` placeholders) in the schema of a ``--store`` URL, as
    someone tampering with the database would; its rows, if any."""
    server, _, query = url.partition("?")
    schema = dict(p.split("=", 1) for p in query.split("&") if p).get("schema", "smss")
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        cur = conn.execute(sql.replace("?", "%s"), args)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """A PostgreSQL server of the test's own, in ``root``, on a free port."""

    def __init__(self, root: Path) -> None:
        if not (BIN / "initdb").exists():
            missing(f"PostgreSQL's server binaries are not in {BIN}")
        self.data = root / "pgdata"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:  # the server runs as postgres: the directory is its own
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
        self._as_postgres(
            str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"
        )
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                "fsync = on\nsynchronous_commit = on\nmax_connections = 50\n"
            )
        self.log = root / "server.log"

    def _as_postgres(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        prefix: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            runuser = shutil.which("runuser")
            if runuser is None:
                missing("runuser is needed to run a private PostgreSQL as the postgres user")
            prefix = [str(runuser), "-u", "postgres", "--"]
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, check=check)

    def start(self) -> None:
        self._as_postgres(
            str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")


@pytest.fixture
def private_pg() -> Iterator[PrivateServer]:
    """A private PostgreSQL, started; stopped and removed at the end whatever the test
    did to it. (Not under pytest's tmp_path: its parents are root's alone.)"""
    root = Path(tempfile.mkdtemp(prefix="smss-pg-"))
    try:
        server = PrivateServer(root)
        server.start()
        try:
            yield server
        finally:
            server.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
