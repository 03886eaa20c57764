"""Blobs in a directory (``--blob-dir``): a path every node can reach (NFS, a shared
volume), so that a stage's output written on one node is read on another.
Implements :class:`smss.ports.BlobStore`.

One file per blob, named by its sha256 (``ab/abcdef...``, 256 subdirectories). A blob
is written to a temporary file in its subdirectory, fsynced, renamed into place, and
the subdirectory fsynced: once ``put`` returns, the blob survives a crash of this
machine, and a reader on any node sees either nothing or the whole file, never part of
it. Writing a blob that is already there is skipped (same name, same bytes). Names
are checked to be 64 hex digits before they touch a path.

The log decides which blobs are its own: it writes a request's blobs here before the
transaction that refers to them commits (so nothing committed refers to a missing
file), and removes a blob only once compaction has committed that nothing refers to it.
A crash between those steps leaves an unreferenced file, never a dangling reference.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from smss.errors import StorageUnavailable

_REF = re.compile(r"[0-9a-f]{64}")


class BlobDirectory:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageUnavailable(f"the blob directory cannot be created ({e.strerror})") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageUnavailable("the blob directory is not writable")

    def _path(self, ref: str) -> Path:
        if not _REF.fullmatch(ref):
            raise StorageUnavailable(f"not a blob reference: {ref[:16]!r}")
        return self.root / ref[:2] / ref

    def put(self, blobs: Sequence[tuple[str, bytes]]) -> None:
        dirs: set[Path] = set()
        try:
            for ref, data in blobs:
                path = self._path(ref)
                if path.exists():
                    continue
                path.parent.mkdir(exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                dirs.add(path.parent)
            for d in dirs:  # the renames are durable once their directories are
                _fsync_dir(d)
            if dirs:
                _fsync_dir(self.root)
        except OSError as e:
            raise StorageUnavailable(f"a blob could not be written ({e.strerror})") from None

    def get(self, ref: str) -> bytes | None:
        try:
            return self._path(ref).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageUnavailable(f"blob {ref[:12]} could not be read ({e.strerror})") from None

    def delete(self, refs: Sequence[str]) -> int:
        removed = 0
        for ref in refs:
            with contextlib.suppress(FileNotFoundError):
                self._path(ref).unlink()
                removed += 1
        return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if TYPE_CHECKING:  # BlobDirectory satisfies the port (checked by mypy, never run)
    from smss.ports import BlobStore

    _check: BlobStore = BlobDirectory("blobs")
