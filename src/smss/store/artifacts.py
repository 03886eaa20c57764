"""Artifacts on disk: uploaded weights (content-addressed) and each function's code directory.

Everything lives under the data directory. Names are checked by
:func:`smss.spec.check_name` and every path is resolved and verified to stay
inside its root, so ``..``, absolute paths, NUL bytes and symlinks cannot
write outside it. Weights are accepted only as safetensors (header checked)
or ONNX; pickle formats are refused before anything is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

from smss.errors import InvalidSpec, NotFound, PayloadTooLarge, UnsafeArtifact
from smss.safetensors_header import read_header
from smss.spec import FunctionSpec, check_stored_name

_SHA256 = re.compile(r"[0-9a-f]{64}")  # fullmatch: "$" would let a final newline in
MAX_SOURCE_BYTES = 1 << 20
#: An upload is written (and hashed) in a worker thread this many bytes at a time.
UPLOAD_WRITE_BYTES = 4 * 1024 * 1024
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uploads = self.root / "uploads"
        self.functions = self.root / "functions"
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.functions.mkdir(parents=True, exist_ok=True)

    def _inside(self, base: Path, *parts: str) -> Path:
        path = base.joinpath(*parts).resolve()
        if not path.is_relative_to(base):
            raise UnsafeArtifact("path escapes the data directory")
        return path

    # ------------------------------------------------------------ uploads

    def upload_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise InvalidSpec("an upload is named by the sha256 of its content (64 hex digits)")
        return self._inside(self.uploads, sha256)

    async def save_upload(self, sha256: str, chunks: AsyncIterator[bytes], limit: int) -> int:
        """Stream an upload to disk, verify its hash, then publish it atomically. The
        hashing, writing and fsync run in a worker thread, a few MiB at a time, so a
        large upload never holds up the event loop."""
        target = self.upload_path(sha256)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = await asyncio.to_thread(tempfile.mkstemp, dir=self.uploads, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                pending: list[bytes] = []
                pending_bytes = 0
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes")
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= UPLOAD_WRITE_BYTES:
                        await asyncio.to_thread(_write, f, digest, pending)
                        pending, pending_bytes = [], 0
                await asyncio.to_thread(_write, f, digest, pending, sync=True)
            if digest.hexdigest() != sha256:
                raise InvalidSpec("upload content does not match its sha256 name")
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # not in a thread: this also runs when the upload is cancelled
        return size

    # ------------------------------------------------------------ functions

    def install(self, spec: FunctionSpec, source: str, weights_sha256: str | None, generation: int) -> Path:
        """Write a function's code and weights into a fresh directory; return it."""
        check_stored_name(spec.name)
        if len(source.encode()) > MAX_SOURCE_BYTES:
            raise PayloadTooLarge("model source exceeds 1 MiB")
        file_name = spec.entrypoint.partition(":")[0]
        directory = self._inside(self.functions, spec.name, f"g{generation}")
        staging = Path(tempfile.mkdtemp(dir=self.functions, prefix=".staging-"))
        try:
            (staging / file_name).write_text(source)
            if spec.weights is not None:
                if weights_sha256 is None:
                    raise InvalidSpec(f"model {spec.name!r} declares weights but none were uploaded")
                upload = self.upload_path(weights_sha256)
                if not upload.is_file():
                    raise NotFound("the weights upload was not found; upload it first")
                check_weights(upload, spec.weights_format or "")
                os.link(upload, staging / spec.weights)
            directory.parent.mkdir(parents=True, exist_ok=True)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    def remove(self, name: str) -> None:
        check_stored_name(name)
        shutil.rmtree(self._inside(self.functions, name), ignore_errors=True)

    def prune(self, name: str, keep: Path) -> None:
        """Drop older generations of a function once a new one is installed."""
        base = self._inside(self.functions, name)
        for child in base.iterdir():
            if child.resolve() != keep.resolve():
                shutil.rmtree(child, ignore_errors=True)


def _write(f: BinaryIO, digest: Any, chunks: list[bytes], *, sync: bool = False) -> None:
    for chunk in chunks:
        digest.update(chunk)
        f.write(chunk)
    if sync:
        f.flush()
        os.fsync(f.fileno())


def check_weights(path: Path, fmt: str) -> None:
    """Refuse pickles and malformed safetensors before any runtime reads the file."""
    with path.open("rb") as f:
        head = f.read(8)
        if head.startswith(_PICKLE_MAGIC):
            raise UnsafeArtifact("weights look like a pickle or a zip archive (torch.save); use safetensors")
        if fmt == "safetensors":
            f.seek(0)
            read_header(f, path.stat().st_size)
        elif fmt != "onnx":
            raise UnsafeArtifact(f"unsupported weights format {fmt!r}: use safetensors or onnx")
