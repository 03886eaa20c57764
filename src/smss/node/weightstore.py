"""The node's weight store: one resident copy of each model's weights in shared memory.

A model's safetensors (or ONNX) file is copied once into a segment under
``/dev/shm``; every instance of that model on the node maps the segment
read-only and builds its tensors as views of it (:mod:`smss.node.attach`), so
N instances hold one copy. Segments outlive scale-to-zero and are evicted
least-recently-used, only while no instance uses them, when a new one would
exceed the memory budget.

Guarantees:

* space is reserved with ``posix_fallocate`` before anything is written, so a
  full ``/dev/shm`` is a clear :class:`StorageUnavailable`, never a SIGBUS;
* a segment is published (renamed to its final name) only after its bytes and
  a header carrying the magic, length, generation and a CRC-32 of the data are
  complete, so an attacher never sees a torn segment; a template verifies the
  checksum when it attaches (:func:`smss.node.attach.verify`), so damage done
  to a segment after it was made (a stray write to ``/dev/shm``, bad memory)
  fails that function's start instead of serving wrong weights;
* instances map read-only: a write through the mapping faults in that instance
  alone and cannot corrupt the copy the others use;
* ``close`` unlinks every segment the store made (mappings already held stay valid).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smss.errors import StorageUnavailable

log = logging.getLogger(__name__)

MAGIC = b"SMSSWGT2"
HEADER = struct.Struct("<8sQQQI")  # magic, generation, data length, data offset, crc32 of the data
HEADER_SIZE = 4096  # data starts page-aligned so tensor views are aligned
SHM_DIR = Path("/dev/shm")


@dataclass
class Segment:
    key: str
    path: Path
    size: int
    generation: int
    load_ms: float
    users: int = 0
    checksum: int = 0


@dataclass(frozen=True)
class StoreStats:
    entries: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int
    evictions: int
    models: tuple[str, ...]


class WeightStore:
    def __init__(self, budget_bytes: int, *, prefix: str | None = None, shm_dir: Path = SHM_DIR) -> None:
        self.budget_bytes = budget_bytes
        self._dir = shm_dir
        self._prefix = prefix or f"smss-{os.getpid()}"
        self._segments: OrderedDict[str, Segment] = OrderedDict()
        self._generations = itertools.count(1)
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        #: Called with the key of each evicted segment (the agent stops the model's template).
        self.on_evict: Callable[[str], None] = lambda _key: None

    def keys(self) -> list[str]:
        return list(self._segments)

    def get(self, key: str) -> Segment | None:
        return self._segments.get(key)

    def acquire(self, key: str, source: Path) -> tuple[Segment, bool]:
        """The segment for ``key`` (loading ``source`` on a miss), marked in use.
        Returns (segment, hit)."""
        segment = self._segments.get(key)
        if segment is not None and segment.path.exists():
            self._segments.move_to_end(key)
            segment.users += 1
            self.hits += 1
            return segment, True
        if segment is not None:  # unlinked behind our back: reload
            del self._segments[key]
        self.misses += 1
        size = source.stat().st_size
        self._make_room(HEADER_SIZE + size)
        segment = self._load(key, source, size)
        segment.users += 1
        self._segments[key] = segment
        return segment, False

    def release(self, key: str, generation: int | None = None) -> None:
        """One user of ``key`` is done with it; with ``generation``, only if the segment
        is still that one (not a reload after :meth:`drop`)."""
        segment = self._segments.get(key)
        if segment is None or (generation is not None and segment.generation != generation):
            return
        if segment.users > 0:
            segment.users -= 1

    def evict(self, key: str) -> bool:
        """Drop a segment nobody uses (explicit eviction, e.g. for a benchmark or a delete)."""
        segment = self._segments.get(key)
        if segment is None or segment.users > 0:
            return False
        del self._segments[key]
        _unlink(segment.path)
        self.evictions += 1
        self.on_evict(key)
        return True

    def drop(self, key: str) -> None:
        """Forget a segment found damaged and unlink it, even while in use (mappings
        already held stay valid): the next :meth:`acquire` loads a fresh copy.
        Releases of the dropped segment's users then find no segment (a no-op)."""
        segment = self._segments.pop(key, None)
        if segment is not None:
            _unlink(segment.path)
            self.on_evict(key)

    def resident_bytes(self) -> int:
        return sum(HEADER_SIZE + s.size for s in self._segments.values())

    def stats(self) -> StoreStats:
        return StoreStats(
            entries=len(self._segments),
            bytes=self.resident_bytes(),
            budget_bytes=self.budget_bytes,
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            models=tuple(self._segments),
        )

    def close(self) -> None:
        for segment in self._segments.values():
            _unlink(segment.path)
        self._segments.clear()

    def _make_room(self, needed: int) -> None:
        for key in list(self._segments):
            if self.resident_bytes() + needed <= self.budget_bytes:
                return
            if self._segments[key].users == 0:
                log.info("weight store: evicting %s (least recently used)", key)
                self.evict(key)
        if self.resident_bytes() + needed > self.budget_bytes:
            log.warning(
                "weight store over budget: %d + %d > %d bytes (all resident models are in use)",
                self.resident_bytes(),
                needed,
                self.budget_bytes,
            )

    def _load(self, key: str, source: Path, size: int) -> Segment:
        started = time.perf_counter()
        generation = next(self._generations)
        final = self._dir / f"{self._prefix}-{_safe(key)}-{generation}"
        partial = final.with_name(final.name + ".partial")
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, HEADER_SIZE + size)
            except OSError as e:
                raise StorageUnavailable(
                    f"not enough shared memory for the weights of {key!r} ({size} bytes)"
                ) from e
            os.lseek(fd, HEADER_SIZE, os.SEEK_SET)
            with open(source, "rb") as src:
                copied = 0
                while copied < size:
                    n = os.sendfile(fd, src.fileno(), copied, size - copied)  # kernel copy
                    if n == 0:
                        raise StorageUnavailable(f"weights file of {key!r} shrank while loading")
                    copied += n
            checksum = _crc32(fd, HEADER_SIZE, size)
            os.pwrite(fd, HEADER.pack(MAGIC, generation, size, HEADER_SIZE, checksum), 0)
            os.rename(partial, final)
        except BaseException:
            _unlink(partial)
            raise
        finally:
            os.close(fd)
        load_ms = (time.perf_counter() - started) * 1000
        log.info("weight store: loaded %s (%d bytes) in %.1f ms", key, size, load_ms)
        return Segment(key, final, size, generation, load_ms, checksum=checksum)


def crc32(data: memoryview | bytes) -> int:
    """CRC-32 of ``data`` (zlib's, which releases the GIL), in chunks."""
    crc = 0
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        crc = zlib.crc32(view[start : start + CHUNK], crc)
    return crc


CHUNK = 64 << 20


def _crc32(fd: int, offset: int, size: int) -> int:
    """CRC-32 of ``size`` bytes of ``fd`` from ``offset`` (read back from the segment:
    what instances will map, not what the file held)."""
    if size == 0:
        return 0
    with mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
        view = memoryview(mapped)
        try:
            return crc32(view[offset:])
        finally:
            view.release()


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:80]


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
