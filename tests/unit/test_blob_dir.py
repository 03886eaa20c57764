"""Blobs in a directory (``--blob-dir``): the store itself, and the log keeping its
blobs there instead of in its database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smss.errors import NotFound, StorageUnavailable
from smss.store.blob_dir import BlobDirectory
from smss.store.sqlite_log import SqliteEventLog
from smss.workflow.blobs import ref_of
from smss.workflow.events import RunStarted, StageCompleted, StateWrite


def test_blobs_are_files_named_by_their_hash(tmp_path: Path) -> None:
    store = BlobDirectory(tmp_path / "blobs")
    data = b"tensor bytes" * 10
    ref = ref_of(data)
    store.put([(ref, data)])
    store.put([(ref, data)])  # again: a no-op
    assert (tmp_path / "blobs" / ref[:2] / ref).read_bytes() == data
    assert store.get(ref) == data
    assert store.get("0" * 64) is None
    assert not list((tmp_path / "blobs").glob("*/.tmp-*"))  # nothing half-written left
    assert store.delete([ref, "0" * 64]) == 1
    assert store.get(ref) is None
    for bad in ("../../etc/passwd", "ab", "Z" * 64):
        with pytest.raises(StorageUnavailable, match="not a blob reference"):
            store.get(bad)


def test_the_log_keeps_its_blobs_in_the_directory(tmp_path: Path) -> None:
    """Written before the commit that refers to them; read back checked against their
    hash; a blob only a refused request wrote is not the log's."""
    blobs = BlobDirectory(tmp_path / "blobs")
    log = SqliteEventLog(tmp_path / "log.db", blobs=blobs)
    kept, refused = b"input tensor", b"state of a refused write"

    async def scenario() -> None:
        await log.start_run("r1", RunStarted("wf", "h", "u", {"x": ref_of(kept)}), {ref_of(kept): kept})
        stale = StateWrite("wf", "u", 5, {"h": ref_of(refused)})  # expects version 5: conflicts
        result = await log.append(
            "r1",
            [StageCompleted("a", 1, {"h": ref_of(refused)})],
            blobs={ref_of(refused): refused},
            state=stale,
        )
        assert result.state_conflict

    try:
        asyncio.run(scenario())
        assert log.get_blob(ref_of(kept)) == kept
        with pytest.raises(NotFound):
            log.get_blob(ref_of(refused))
        (tmp_path / "blobs" / ref_of(kept)[:2] / ref_of(kept)).write_bytes(b"rotten")
        with pytest.raises(StorageUnavailable, match="corrupt"):
            log.get_blob(ref_of(kept))
    finally:
        log.close()
