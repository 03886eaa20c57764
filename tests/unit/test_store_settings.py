"""``smss serve --store`` / ``--blob-dir`` / ``--run-lease``: what is taken, what is
refused before anything is built, and how a PostgreSQL URL is read."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from smss.config import Settings, StoreSettings
from smss.errors import InvalidSpec
from smss.store._pg import DEFAULT_SCHEMA, parse_store_url


@pytest.mark.parametrize(
    ("store", "message"),
    [
        (StoreSettings("mysql://db/x"), "--store takes sqlite or a postgresql:// URL"),
        (StoreSettings("/var/lib/smss.db"), "--store takes sqlite or a postgresql:// URL"),
        (StoreSettings(run_lease_s=0.0), "--run-lease must be a positive number"),
        (StoreSettings(run_lease_s=math.nan), "--run-lease must be a positive number"),
    ],
)
def test_nonsense_is_refused(store: StoreSettings, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        Settings(store=store).check()


def test_sqlite_is_the_default_and_postgresql_is_taken() -> None:
    assert not Settings().check().store.postgres
    store = StoreSettings("postgresql://u@db:5432/smss?schema=prod", Path("/mnt/blobs"), 5.0)
    assert Settings(store=store).check().store.postgres


def test_a_url_names_its_schema_and_keeps_libpq_parameters() -> None:
    url = parse_store_url("postgresql://smss:s3cret@db.internal:5433/plat?sslmode=require&schema=prod_1")
    assert url.schema == "prod_1"
    assert url.conninfo == "postgresql://smss:s3cret@db.internal:5433/plat?sslmode=require"
    assert "s3cret" not in url.redacted
    assert url.redacted == "postgresql://smss:***@db.internal:5433/plat?sslmode=require"
    assert parse_store_url("postgres://h/db").schema == DEFAULT_SCHEMA


@pytest.mark.parametrize("schema", ["Prod", "1st", "a-b", 'x";drop', "x" * 64, ""])
def test_a_schema_name_that_is_not_a_plain_identifier_is_refused(schema: str) -> None:
    with pytest.raises(InvalidSpec, match="schema"):
        parse_store_url(f"postgresql://h/db?schema={schema}")
