"""Reading SQLite's ``-wal`` file to tell a torn tail from lost commits.

SQLite's recovery reads the -wal file frame by frame (a 24-byte header, then one
page) while each frame's salts match the file header's and its checksum, chained
from the previous frame's, is right; it keeps every transaction up to the last
commit frame before the first bad frame and silently ignores the rest. After a
crash only the last transaction can be torn, and it was never acknowledged (its
fsync had not returned). An intact commit frame after a bad frame means that
committed, acknowledged transactions would vanish: damage, not a torn tail.

See https://www.sqlite.org/fileformat2.html#walformat for the format.
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import numpy as np


def page_size(path: Path) -> int | None:
    """The page size in a database file's header; None when it has none yet."""
    with path.open("rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return None
    (size,) = struct.unpack_from(">H", header, 16)
    return 65536 if size == 1 else int(size)


#: The wal-index header at the start of the ``-shm`` file (native byte order): iVersion,
#: unused, iChange, isInit, bigEndCksum, szPage, mxFrame. See
#: https://www.sqlite.org/walformat.html#the_wal_index_header
_INDEX_HEADER = struct.Struct("=IIIBBHI")
_INDEX_VERSION = 3007000


def index_bytes(header: bytes) -> int | None:
    """How many bytes of frames the current ``-wal`` generation holds (its ``mxFrame``
    times the frame size), from the first bytes of the ``-shm`` file (the wal-index);
    None when they are not a header this code knows. The ``-wal`` file's size says
    nothing once the file is reused after a checkpoint: it keeps the size of its
    largest generation."""
    if len(header) < _INDEX_HEADER.size:
        return None
    version, _, _, is_init, _, page, frames = _INDEX_HEADER.unpack_from(header)
    if version != _INDEX_VERSION or not is_init:
        return None
    return int(frames) * (24 + (65536 if page == 1 else int(page)))


class WalIndex:
    """The ``-shm`` file kept open by the log's writer, to read :func:`index_bytes`
    after every commit with one ``pread`` (None when it cannot be read)."""

    def __init__(self, shm: Path) -> None:
        self._path = shm
        self._fd: int | None = None

    def wal_bytes(self) -> int | None:
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            return index_bytes(os.pread(self._fd, _INDEX_HEADER.size, 0))
        except OSError:
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_WAL_MAGIC_LE, _WAL_MAGIC_BE = 0x377F0682, 0x377F0683
_WAL_HEADER = struct.Struct(">8I")
_MASK32 = 0xFFFFFFFF


def wal_damage(wal: Path, db_page_size: int | None) -> int:
    """How many intact commit frames lie beyond the point where SQLite's recovery of
    ``wal`` stops. Each frame's checksum is checked against the checksum stored in its
    predecessor, so a frame after a damaged one can still be recognised as intact."""
    try:
        f = wal.open("rb")
    except FileNotFoundError:
        return 0
    with f:
        header = f.read(32)
        if len(header) < 32:
            return 0
        magic, version, wal_page, _, salt1, salt2, ck1, ck2 = _WAL_HEADER.unpack(header)
        big_endian = magic == _WAL_MAGIC_BE
        page = db_page_size or wal_page
        if page not in {1 << k for k in range(9, 17)}:
            return 0
        header_ok = (
            magic in (_WAL_MAGIC_LE, _WAL_MAGIC_BE)
            and version == 3007000
            and wal_page == page
            and checksum(np.frombuffer(header[:24], np.uint8).reshape(1, 24), big_endian, [(0, 0)])[0]
            == (ck1, ck2)
        )
        salts = (salt1, salt2) if header_ok else None
        previous = (ck1, ck2)
        recovering = header_ok  # still inside what SQLite recovers
        lost = 0
        frame = 24 + page
        chunk = max(1, (1 << 22) // frame)
        while data := f.read(chunk * frame):
            n = len(data) // frame
            if n == 0:
                break
            frames = np.frombuffer(data, np.uint8, n * frame).reshape(n, frame)
            fields = frames[:, :24].copy().view(">u4")  # pgno, commit size, salt1, salt2, ck1, ck2
            stored = [(int(a), int(b)) for a, b in fields[:, 4:6]]
            sums = checksum(
                np.concatenate((frames[:, :8], frames[:, 24:]), axis=1), big_endian, [previous, *stored[:-1]]
            )
            for i in range(n):
                frame_salts = (int(fields[i, 2]), int(fields[i, 3]))
                if salts is None:  # the header is damaged: judge by the first frame's salts
                    salts = frame_salts
                intact = sums[i] == stored[i] and frame_salts == salts and int(fields[i, 0]) != 0
                recovering = recovering and intact
                if not recovering and intact and int(fields[i, 1]) != 0:
                    lost += 1
            previous = stored[-1]
        return lost


@functools.lru_cache(maxsize=8)
def _powers(pairs: int) -> np.ndarray:
    """M**k mod 2**64 for k = 0..pairs, M = [[1, 1], [1, 2]], as a (pairs + 1, 4) array."""
    out = np.empty((pairs + 1, 4), np.uint64)
    a, b, c, d = 1, 0, 0, 1
    mod = (1 << 64) - 1
    for k in range(pairs + 1):
        out[k] = (a, b, c, d)
        a, b, c, d = (a + c) & mod, (b + d) & mod, (a + 2 * c) & mod, (b + 2 * d) & mod
    return out


def checksum(data: np.ndarray, big_endian: bool, start: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """SQLite's WAL checksum of each row of ``data`` (uint8, a multiple of 8 bytes wide)
    from its starting pair. The loop ``s0 += x0 + s1; s1 += x1 + s0`` over word pairs is
    the affine map ``s -> M s + (x0, x0 + x1)``, so the whole row is one weighted sum
    with powers of M: vectorised, exact modulo 2**64 and so modulo 2**32."""
    words = np.ascontiguousarray(data).view(">u4" if big_endian else "<u4").astype(np.uint64)
    x0, x1 = words[:, 0::2], words[:, 1::2]
    n = x0.shape[1]
    p = _powers(n)
    r = p[n - 1 :: -1]  # M**(n-1-i) for pair i
    u0, u1 = x0, x0 + x1
    t0 = (u0 * r[:, 0] + u1 * r[:, 1]).sum(axis=1, dtype=np.uint64)
    t1 = (u0 * r[:, 2] + u1 * r[:, 3]).sum(axis=1, dtype=np.uint64)
    s = np.array(start, dtype=np.uint64)
    m = p[n]
    f0 = m[0] * s[:, 0] + m[1] * s[:, 1] + t0
    f1 = m[2] * s[:, 0] + m[3] * s[:, 1] + t1
    return [(int(a) & _MASK32, int(b) & _MASK32) for a, b in zip(f0, f1, strict=True)]
