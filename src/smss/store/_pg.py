"""PostgreSQL for the stores: the ``--store`` URL, the connection pool, the schema, a
:class:`~smss.store._log_tx.Tx` on a psycopg connection, and what each error means.

**The URL.** ``postgresql://[user[:password]@]host[:port]/dbname[?param=value...]``,
libpq's own URI with one parameter of SMSS's: ``schema=NAME`` (default ``smss``), the
PostgreSQL schema that holds every table of this platform, created if missing, so
one database can hold several platforms (tests use a fresh schema each). Every other
parameter goes to libpq as it is (``sslmode``, ``connect_timeout``, ...).

**Connections.** Every connection is configured the same: ``search_path`` to the
schema, ``synchronous_commit = on`` (a COMMIT returns once its WAL is flushed on the
server), TCP keepalives and a user timeout (a server that vanished is noticed in
seconds, not at the kernel's default of minutes), and ``smss.owner``: the identity of
this process's engine, which new runs take as their owner (see ``runs.owner``).
Reads and small writes (registry) share a pool that checks a connection before
handing it out, so the first request after the server restarted gets a fresh one;
the log's writer keeps its own connection and reconnects after a failure.

**Errors** (:func:`storage_error`): a lost connection, a server shutting down or not
accepting connections is :class:`~smss.errors.StorageUnreachable` (retryable: 503
with ``Retry-After``); a deadlock or serialization failure is retried by the caller
(:data:`RETRY`); anything else is :class:`~smss.errors.StorageUnavailable`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

from smss.errors import InvalidSpec, RunNotOwned, StorageUnavailable, StorageUnreachable
from smss.store._log_tx import Row, Tx
from smss.store._pg_schema import setup

logger = logging.getLogger("smss.store.postgres")

T = TypeVar("T")

_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
DEFAULT_SCHEMA = "smss"
#: Seconds to wait for a connection (from the pool, or a new one) before a request fails.
CONNECT_TIMEOUT_S = 3.0
#: After a request found the server unreachable, others fail at once for this long.
FAIL_FAST_S = 1.0
#: How many times a transaction that lost a deadlock or a serialization check is retried.
MAX_RETRIES = 5
#: Errors after which the whole transaction is simply run again.
RETRY: tuple[type[Exception], ...] = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


@dataclass(frozen=True)
class StoreUrl:
    """A parsed ``--store postgresql://...``: libpq's URL without ``schema``, and the schema."""

    conninfo: str
    schema: str

    @property
    def redacted(self) -> str:
        """The URL without its password, for logs and messages."""
        parts = urllib.parse.urlsplit(self.conninfo)
        if parts.password is None:
            return self.conninfo
        netloc = parts.netloc.rsplit("@", 1)[-1]
        user = parts.username or ""
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def parse_store_url(url: str) -> StoreUrl:
    """Raises :class:`InvalidSpec` on a URL that is not PostgreSQL's or a bad schema name."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise InvalidSpec(f"--store takes sqlite or a postgresql:// URL, not {parts.scheme or url!r}")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_SCHEMA
    if not _SCHEMA.fullmatch(schema):
        raise InvalidSpec(
            f"schema {schema!r}: use lower-case letters, digits and _ (at most 63, not starting with a digit)"
        )
    rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "schema"])
    return StoreUrl(urllib.parse.urlunsplit(parts._replace(query=rest)), schema)


def storage_error(what: str, e: BaseException) -> StorageUnavailable:
    """The SMSS error for a failure of ``what`` (the message reaches clients: no SQL or
    server words in it; those go to the log)."""
    if unreachable(e):
        logger.warning("PostgreSQL: %s: the server cannot be reached (%s)", what, e)
        return StorageUnreachable(f"{what}: the database cannot be reached; retry")
    logger.error("PostgreSQL: %s (%r)", what, e)
    return StorageUnavailable(f"{what} ({type(e).__name__})")


def unreachable(e: BaseException) -> bool:
    """Whether ``e`` says the server is gone (for now), not that a statement failed."""
    if isinstance(e, PoolTimeout | psycopg.InterfaceError | StorageUnreachable):
        return True
    if isinstance(e, psycopg.OperationalError) and not isinstance(e, RETRY):
        state = e.sqlstate
        # No SQLSTATE: the client lost the connection; 08: connection exceptions;
        # 57P0x: admin / crash shutdown, cannot connect now.
        return state is None or state.startswith(("08", "57P"))
    return False


def lock_key(schema: str, name: str) -> int:
    """A 64-bit advisory lock key for ``name`` in ``schema`` (advisory locks are the
    database's, not a schema's: two platforms in one database must not share them)."""
    digest = hashlib.blake2b(f"{schema}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@functools.lru_cache(maxsize=512)
def _sql(text: str) -> str:
    """``?`` placeholders (the log's one dialect) as psycopg's ``%s``."""
    return text.replace("%", "%%").replace("?", "%s")


class PgTx:
    """:class:`~smss.store._log_tx.Tx` on a psycopg connection (autocommit; the caller
    runs ``BEGIN`` / ``COMMIT``). With ``pipeline`` (the log's writer applies its
    requests in psycopg's pipeline mode) writes and locks are sent without waiting for
    their answers: the server runs them in order, so a lock is held before the
    statement after it runs, and a request costs a round trip per answer it reads."""

    BLOB = "BYTEA"

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        schema: str,
        owner: str,
        pipeline: psycopg.Pipeline | None = None,
    ) -> None:
        self.conn = conn
        self.schema = schema
        self.owner = owner
        self.pipeline = pipeline

    def one(self, sql: str, args: Sequence[object] = ()) -> Row | None:
        row: Row | None = self.conn.execute(_sql(sql), args).fetchone()
        return row

    def all(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return self.conn.execute(_sql(sql), args).fetchall()

    def run(self, sql: str, args: Sequence[object] = ()) -> int:
        cur = self.conn.execute(_sql(sql), args)
        if self.pipeline is not None:
            self.pipeline.sync()  # its row count is known once it was answered
        return cur.rowcount

    def write(self, sql: str, args: Sequence[object] = ()) -> None:
        self.conn.execute(_sql(sql), args)

    def many(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_sql(sql), rows)

    def later(self, sql: str, args: Sequence[object] = ()) -> Callable[[], Row | None]:
        return self.conn.execute(_sql(sql), args).fetchone

    def lock_run(self, run_id: str) -> bool:
        """The run's row, locked until the transaction ends; the run is this engine's
        from now on when it is nobody's: finished, or of an engine that stopped (a run of
        one that died is handed over by ``claim_runs`` once its heartbeat stopped)."""
        row = self.conn.execute(
            "SELECT r.owner = %(me)s, r.owner IS NULL OR r.status <> 'running' OR NOT EXISTS ("
            "  SELECT 1 FROM engines e WHERE e.owner = r.owner) "
            "FROM runs r WHERE r.run_id = %(run)s FOR UPDATE OF r",
            {"me": self.owner, "run": run_id},
        ).fetchone()
        if row is None:
            return False
        if row[0]:
            return True  # ours
        if not row[1]:
            raise RunNotOwned(f"run {run_id} is driven by another engine")
        self.conn.execute("UPDATE runs SET owner = %s WHERE run_id = %s", (self.owner, run_id))
        return True

    def lock(self, *names: str) -> None:
        if names:
            keys = sorted(lock_key(self.schema, n) for n in names)  # one order: no deadlock between two
            self.conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (keys,))


class PgDatabase:
    """One PostgreSQL schema for the registry, the workflow definitions and the workflow
    log of this process: the pool, the schema (created and migrated at open), and the
    identity (``owner``) of this process's engine.

    Opening raises :class:`StorageUnreachable` when the server cannot be reached and
    :class:`StorageUnavailable` when the schema is newer than this code."""

    def __init__(self, url: StoreUrl | str, *, owner: str, max_connections: int = 16) -> None:
        self.url = parse_store_url(url) if isinstance(url, str) else url
        self.schema = self.url.schema
        self.owner = owner
        self._down_until = -float("inf")
        self._max = max_connections
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(1, round(CONNECT_TIMEOUT_S)),
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
            "tcp_user_timeout": 10_000,
        }
        try:
            with psycopg.connect(self.url.conninfo, **self._kwargs) as conn:
                setup(conn, self.schema, lock_key(self.schema, "schema"))
        except psycopg.Error as e:
            what = f"the PostgreSQL store at {self.url.redacted} could not be opened"
            raise storage_error(what, e) from None
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.url.conninfo,
            kwargs=self._kwargs,
            min_size=1,
            max_size=max_connections,
            open=True,
            configure=self.configure,
            check=ConnectionPool.check_connection,
            timeout=CONNECT_TIMEOUT_S,
            reconnect_timeout=24 * 3600.0,  # keep trying: the server comes back
            name=f"smss-{self.schema}",
        )

    def configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "SELECT set_config('search_path', %s, false), set_config('synchronous_commit', 'on', false), "
            "set_config('smss.owner', %s, false)",
            (f'"{self.schema}"', self.owner),
        )

    def connect(self) -> psycopg.Connection[Any]:
        """A new configured connection of its own (the log's writer holds one)."""
        conn = psycopg.connect(self.url.conninfo, **self._kwargs)
        try:
            self.configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def tx(self, conn: psycopg.Connection[Any], pipeline: psycopg.Pipeline | None = None) -> PgTx:
        return PgTx(conn, self.schema, self.owner, pipeline)

    def read(self, what: str, fn: Callable[[PgTx], T]) -> T:
        """``fn`` on a pooled connection, outside a transaction."""
        self._fail_fast(what)
        try:
            with self.pool.connection() as conn:
                return fn(self.tx(conn))
        except (psycopg.Error, PoolTimeout) as e:
            raise self._failed(what, e) from None

    def write(self, what: str, fn: Callable[[PgTx], T]) -> T:
        """``fn`` in a transaction on a pooled connection, committed before this
        returns; run again after a deadlock or serialization failure."""
        self._fail_fast(what)
        for attempt in range(MAX_RETRIES + 1):
            try:
                with self.pool.connection() as conn, conn.transaction():
                    return fn(self.tx(conn))
            except RETRY as e:
                if attempt == MAX_RETRIES:
                    raise storage_error(what, e) from None
            except (psycopg.Error, PoolTimeout) as e:
                raise self._failed(what, e) from None
        raise AssertionError("unreachable")

    def _fail_fast(self, what: str) -> None:
        """While the server is known to be down, fail at once: a request would otherwise
        wait the pool's whole timeout for a connection that cannot be made."""
        if time.monotonic() < self._down_until:
            raise StorageUnreachable(f"{what}: the database cannot be reached; retry")

    def _failed(self, what: str, e: BaseException) -> StorageUnavailable:
        # No connection within the timeout: the server is down when the pool could not
        # make one (it has room for more), merely busy when every one was in use.
        busy = isinstance(e, PoolTimeout) and self.pool.get_stats().get("pool_size", 0) >= self._max
        if unreachable(e) and not busy:  # the next ones fail fast for a moment; then one tries
            self._down_until = time.monotonic() + FAIL_FAST_S
        return storage_error(what, e)

    def close(self) -> None:
        self.pool.close()


if TYPE_CHECKING:  # PgTx satisfies the protocol (checked by mypy, never run)
    _check: Tx = PgTx(psycopg.Connection.connect(""), "s", "o")
