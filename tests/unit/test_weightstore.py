"""The node's weight store and attaching its segments: real ``/dev/shm`` segments, no mocks.

Each test's store uses a prefix of its own (``smsstest-<random>``), so tests do
not see each other's segments or those of a running node, and a fixture fails
the test if any segment with that prefix outlives ``WeightStore.close()``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import subprocess
import sys
import textwrap
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from smss.errors import CorruptWeights, UnsafeArtifact
from smss.node.attach import HUGE_PAGE, Attached, HotCopy, safetensors_views, verify
from smss.node.weightstore import HEADER, HEADER_SIZE, MAGIC, SHM_DIR, WeightStore
from smss.testing.inject import corrupt

MakeStore = Callable[[int], WeightStore]


def unique_prefix() -> str:
    return f"smsstest-{uuid.uuid4().hex[:12]}"


def segments_on_disk(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}-*"))


@pytest.fixture
def make_store() -> Iterator[MakeStore]:
    """``make_store(budget)``: a store under a fresh prefix; closed, and checked empty, after the test."""
    stores: list[tuple[WeightStore, str]] = []

    def make(budget_bytes: int) -> WeightStore:
        prefix = unique_prefix()
        store = WeightStore(budget_bytes, prefix=prefix)
        stores.append((store, prefix))
        return store

    yield make
    leftovers: list[Path] = []
    for store, prefix in stores:
        store.close()
        leftovers += segments_on_disk(prefix)
    for path in leftovers:  # remove them either way, so one failure does not leak into the machine
        path.unlink(missing_ok=True)
    assert not leftovers, f"WeightStore.close() left segments behind: {leftovers}"


def weights_file(directory: Path, name: str, floats: int, seed: int = 0) -> Path:
    """A small safetensors file: ``w`` (``floats`` float32 values) and ``b`` (3 int64)."""
    rng = np.random.default_rng(seed)
    path = directory / f"{name}.safetensors"
    save_file(
        {"w": rng.standard_normal(floats, dtype=np.float32), "b": np.arange(3, dtype=np.int64)},
        str(path),
    )
    return path


def segment_bytes(source: Path) -> int:
    return HEADER_SIZE + source.stat().st_size


# ------------------------------------------------------------------ loading


def test_acquire_publishes_one_complete_segment_and_reuses_it(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(1 << 30)
    source = weights_file(tmp_path, "a", 1000)

    segment, hit = store.acquire("a@g1", source)

    assert not hit
    assert segment.path.parent == SHM_DIR
    assert not segment.path.name.endswith(".partial")
    raw = segment.path.read_bytes()
    magic, generation, length, offset, checksum = HEADER.unpack_from(raw, 0)
    assert (magic, generation, length, offset, checksum) == (
        MAGIC,
        segment.generation,
        source.stat().st_size,
        HEADER_SIZE,
        zlib.crc32(source.read_bytes()),
    )
    assert segment.checksum == checksum
    assert raw[HEADER_SIZE:] == source.read_bytes()

    again, hit = store.acquire("a@g1", source)

    assert hit
    assert again is segment
    assert again.users == 2
    stats = store.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.evictions) == (1, 1, 1, 0)
    assert stats.bytes == segment_bytes(source)
    assert stats.models == ("a@g1",)
    assert not segment.path.with_name(segment.path.name + ".partial").exists()


def test_attached_and_hot_copy_views_equal_the_file_and_refuse_writes(
    make_store: MakeStore, tmp_path: Path
) -> None:
    source = weights_file(tmp_path, "a", 5000)
    expected = load_file(str(source))
    segment, _ = make_store(1 << 30).acquire("a", source)

    attached = Attached(segment.path)
    hot = HotCopy(attached.data)
    try:
        for views in (attached.safetensors(), hot.safetensors()):
            assert views.keys() == expected.keys()
            for name, array in views.items():
                assert array.dtype == expected[name].dtype
                assert np.array_equal(array, expected[name])
                assert not array.flags.writeable
                with pytest.raises(ValueError, match="read-only"):
                    array[0] = 0
                with pytest.raises(ValueError, match="cannot set WRITEABLE"):
                    array.flags.writeable = True
        with pytest.raises(TypeError):
            hot.data[0] = 0  # the memoryview itself is read-only too
        assert hot.address % HUGE_PAGE == 0  # huge-page aligned, so instances inherit 2 MiB mappings
    finally:
        attached.close()
    # A template closes its mapping of the segment once the hot copy is made: the copy stands alone.
    views = hot.safetensors()
    assert all(np.array_equal(views[name], expected[name]) for name in expected)


def test_safetensors_views_refuse_a_hostile_header() -> None:
    def image(header: dict[str, object], data: bytes) -> memoryview:
        blob = repr(header).replace("'", '"').encode()
        return memoryview(struct.pack("<Q", len(blob)) + blob + data)

    with pytest.raises(UnsafeArtifact, match="truncated"):
        safetensors_views(memoryview(b"\1\2"))
    with pytest.raises(UnsafeArtifact, match="header length"):
        safetensors_views(memoryview(struct.pack("<Q", 1 << 40) + b"{}"))
    with pytest.raises(UnsafeArtifact, match="extend past its end"):
        safetensors_views(image({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8))
    with pytest.raises(UnsafeArtifact, match="unknown dtype"):
        safetensors_views(image({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(UnsafeArtifact, match="malformed"):
        safetensors_views(image({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, b"\0" * 16))
    with pytest.raises(UnsafeArtifact, match="not a JSON object"):
        safetensors_views(memoryview(struct.pack("<Q", 2) + b"[]"))
    entries = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    entries["b"] = {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}
    with pytest.raises(UnsafeArtifact, match="overlap"):
        safetensors_views(image(entries, b"\0" * 8))
    with pytest.raises(UnsafeArtifact, match="no numpy view"):
        safetensors_views(image({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4))


# ------------------------------------------------------------------ eviction


def test_eviction_drops_the_least_recently_used_segment(make_store: MakeStore, tmp_path: Path) -> None:
    a, b, c = (weights_file(tmp_path, n, 2000, seed=i) for i, n in enumerate("abc"))
    store = make_store(segment_bytes(a) * 2 + 100)  # room for two of the three
    evicted: list[str] = []
    store.on_evict = evicted.append

    seg_a, _ = store.acquire("a", a)
    seg_b, _ = store.acquire("b", b)
    store.release("a")
    store.release("b")
    store.acquire("a", a)  # a is now more recently used than b
    store.release("a")
    seg_c, hit = store.acquire("c", c)

    assert not hit
    assert evicted == ["b"]
    assert store.keys() == ["a", "c"]
    assert not seg_b.path.exists()
    assert seg_a.path.exists()
    assert seg_c.path.exists()
    stats = store.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.evictions) == (2, 1, 3, 1)
    assert stats.bytes <= stats.budget_bytes

    # b comes back as a miss, from its file, and c (in use) is kept over a (idle).
    seg_b2, hit = store.acquire("b", b)
    assert not hit
    assert evicted == ["b", "a"]
    assert store.keys() == ["c", "b"]
    assert seg_b2.path != seg_b.path  # a new generation, never the old name reused
    assert seg_b2.path.read_bytes()[HEADER_SIZE:] == b.read_bytes()


def test_segments_in_use_are_never_evicted_and_overcommit_is_reported(
    make_store: MakeStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c = (weights_file(tmp_path, n, 2000, seed=i) for i, n in enumerate("abc"))
    store = make_store(segment_bytes(a) * 2 + 100)
    evicted: list[str] = []
    store.on_evict = evicted.append
    store.acquire("a", a)
    store.acquire("b", b)

    with caplog.at_level(logging.WARNING, logger="smss.node.weightstore"):
        store.acquire("c", c)

    assert evicted == []
    assert store.keys() == ["a", "b", "c"]
    assert store.stats().bytes > store.budget_bytes
    assert any("over budget" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert store.evict("a") is False  # explicit eviction respects users as well
    assert store.keys() == ["a", "b", "c"]


def test_explicit_evict_unlinks_an_idle_segment_and_reports_it(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(1 << 30)
    evicted: list[str] = []
    store.on_evict = evicted.append
    segment, _ = store.acquire("a", weights_file(tmp_path, "a", 10))
    store.release("a")
    store.release("a")  # an extra release never drives the count below zero

    assert store.evict("a") is True
    assert store.evict("a") is False  # already gone
    assert evicted == ["a"]
    assert not segment.path.exists()
    assert store.stats().evictions == 1


def test_a_segment_unlinked_behind_the_stores_back_is_reloaded(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(1 << 30)
    source = weights_file(tmp_path, "a", 3000)
    first, _ = store.acquire("a", source)
    store.release("a")
    first.path.unlink()  # e.g. someone cleaned /dev/shm

    second, hit = store.acquire("a", source)

    assert not hit
    assert second.path.exists()
    assert second.generation > first.generation
    assert second.path.read_bytes()[HEADER_SIZE:] == source.read_bytes()
    assert store.stats().misses == 2
    assert store.stats().entries == 1


def test_close_unlinks_every_segment_but_mappings_stay_valid(tmp_path: Path) -> None:
    prefix = unique_prefix()
    store = WeightStore(1 << 30, prefix=prefix)
    source = weights_file(tmp_path, "a", 100)
    paths = [store.acquire(key, source)[0].path for key in ("a", "b")]
    attached = Attached(paths[0])
    try:
        store.close()
        assert segments_on_disk(prefix) == []
        assert store.stats().entries == 0
        assert np.array_equal(attached.safetensors()["w"], load_file(str(source))["w"])
    finally:
        attached.close()
        for path in paths:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("weights")
    return [weights_file(directory, f"m{i}", n, seed=i) for i, n in enumerate((100, 700, 1500, 300, 2500))]


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 4)), min_size=1, max_size=30),
    budget_segments=st.integers(1, 4),
)
def test_eviction_properties(sources: list[Path], ops: list[tuple[bool, int]], budget_segments: int) -> None:
    """Any sequence of acquires (True) and releases (False): in-use segments are never evicted;
    victims are the least recently used idle segments, no more than needed; the store is over
    budget after a load only when nothing idle is left; its entries are exactly the files in ``/dev/shm``."""
    budget = budget_segments * segment_bytes(sources[2])
    prefix = unique_prefix()
    store = WeightStore(budget, prefix=prefix)
    evicted: list[str] = []
    store.on_evict = evicted.append
    users: dict[str, int] = {}
    recency: list[str] = []  # our own model of the store: least recently acquired first
    try:
        for acquire, i in ops:
            key = f"m{i}"
            if not acquire:
                store.release(key)
                users[key] = max(0, users.get(key, 0) - 1)
                continue
            idle_before = [k for k in recency if users.get(k, 0) == 0 and k != key]
            evicted.clear()
            _, hit = store.acquire(key, sources[i])
            assert hit == (key in recency)
            assert evicted == idle_before[: len(evicted)]  # least recently used first
            if evicted:
                last = sources[int(evicted[-1][1:])]
                assert store.stats().bytes + segment_bytes(last) > budget  # it had to go
            for victim in evicted:
                recency.remove(victim)
            if key in recency:
                recency.remove(key)
            recency.append(key)
            users[key] = users.get(key, 0) + 1
            assert store.keys() == recency
            if not hit and store.stats().bytes > budget:  # room is made only when loading
                assert all(users.get(k, 0) > 0 for k in recency), "over budget with an idle segment left"
            on_disk = {p.name for p in segments_on_disk(prefix)}
            assert on_disk == {segment.path.name for k in recency if (segment := store.get(k))}
    finally:
        store.close()
    assert segments_on_disk(prefix) == []


# ------------------------------------------------------------------ torn and corrupt segments


def _truncate_below_header(path: Path) -> None:
    os.truncate(path, HEADER_SIZE - 1)


def _truncate_data(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


def _extend(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\0")


def _overwrite_magic(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(b"NOTMAGIC")


def _zero_header(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(b"\0" * HEADER.size)


def _wrong_offset(path: Path) -> None:
    magic, generation, length, _, checksum = HEADER.unpack_from(path.read_bytes(), 0)
    with path.open("r+b") as f:
        f.write(HEADER.pack(magic, generation, length, 0, checksum))


@pytest.mark.parametrize(
    "corrupt",
    [_truncate_below_header, _truncate_data, _extend, _overwrite_magic, _zero_header, _wrong_offset],
)
def test_a_torn_or_corrupt_segment_is_refused(
    make_store: MakeStore, tmp_path: Path, corrupt: Callable[[Path], None]
) -> None:
    segment, _ = make_store(1 << 30).acquire("a", weights_file(tmp_path, "a", 2000))
    Attached(segment.path).close()  # intact: attaches

    corrupt(segment.path)

    with pytest.raises(UnsafeArtifact):
        Attached(segment.path)


def test_a_file_that_is_not_a_segment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "random"
    path.write_bytes(np.random.default_rng(7).bytes(3 * HEADER_SIZE))
    with pytest.raises(UnsafeArtifact):
        Attached(path)


# inotify(7): the kernel's record of every change to /dev/shm, in order.
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_OPEN = 0x2, 0x8, 0x20
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_EVENT = struct.Struct("iIII")


def _inotify_events(fd: int) -> list[tuple[int, int, str]]:
    """(mask, cookie, name) of every queued event."""
    data = b""
    while True:
        try:
            data += os.read(fd, 1 << 16)
        except BlockingIOError:
            break
    events, pos = [], 0
    while pos < len(data):
        _, mask, cookie, length = _EVENT.unpack_from(data, pos)
        name = data[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0").decode()
        events.append((mask, cookie, name))
        pos += _EVENT.size + length
    return events


def test_a_segment_is_never_visible_under_its_final_name_while_loading(
    make_store: MakeStore, tmp_path: Path
) -> None:
    """The kernel's own log of the directory (inotify) shows every write going to the
    ``.partial`` file and the final name appearing only by the atomic rename."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")
    try:
        mask = (
            _IN_MODIFY | _IN_CLOSE_WRITE | _IN_OPEN | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
        )
        if libc.inotify_add_watch(fd, bytes(SHM_DIR), mask) < 0:
            pytest.skip(f"cannot watch {SHM_DIR}: {os.strerror(ctypes.get_errno())}")
        store = make_store(1 << 30)
        segment, _ = store.acquire("a", weights_file(tmp_path, "a", 300_000))
        events = _inotify_events(fd)
    finally:
        os.close(fd)

    final = segment.path.name
    partial = final + ".partial"
    ours = [(mask, cookie, name) for mask, cookie, name in events if name in (final, partial)]
    kinds = [(mask & ~0x40000000, name) for mask, _, name in ours]  # drop IN_ISDIR
    assert kinds[0] == (_IN_CREATE, partial)
    moved_from = next(i for i, (m, n) in enumerate(kinds) if m == _IN_MOVED_FROM and n == partial)
    moved_to = next(i for i, (m, n) in enumerate(kinds) if m == _IN_MOVED_TO and n == final)
    assert moved_to == moved_from + 1
    assert ours[moved_from][1] == ours[moved_to][1]  # one rename
    # Every write (fallocate, sendfile, header) happened under the temporary name...
    assert (_IN_MODIFY, partial) in kinds[:moved_from]
    # ...and the final name was never created, opened or written: only renamed into place
    # (the loader's own descriptor is closed after the rename, hence CLOSE_WRITE is allowed).
    assert {m for m, n in kinds if n == final} <= {_IN_MOVED_TO, _IN_CLOSE_WRITE}
    assert {m for m, n in kinds[moved_from:] if n == partial} == {_IN_MOVED_FROM}
    assert not any(n == final for _, n in kinds[:moved_to])


def test_a_load_that_runs_out_of_space_fails_cleanly_and_leaves_nothing(tmp_path: Path) -> None:
    """``posix_fallocate`` fails before a byte is written: StorageUnavailable, no SIGBUS, no file.
    A file-size limit stands in for a full ``/dev/shm`` (in a child: it applies to the whole process)."""
    source = weights_file(tmp_path, "big", 400_000)
    prefix = unique_prefix()
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from smss.errors import StorageUnavailable
        from smss.node.weightstore import WeightStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # report EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        store = WeightStore(1 << 30, prefix={prefix!r})
        try:
            store.acquire("big", Path({str(source)!r}))
        except StorageUnavailable as e:
            print("refused:", e)
        print("entries", store.stats().entries)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        leftovers = segments_on_disk(prefix)
    finally:
        for path in segments_on_disk(prefix):
            path.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr
    assert "refused: not enough shared memory for the weights of 'big'" in done.stdout
    assert "entries 0" in done.stdout
    assert leftovers == []


def test_a_segment_whose_data_changed_fails_its_checksum(make_store: MakeStore, tmp_path: Path) -> None:
    """One byte overwritten in place in a real segment: its header still checks out,
    its checksum does not; the store can drop it, and the next acquire reloads the file."""
    store = make_store(1 << 30)
    source = weights_file(tmp_path, "a", 1000)
    segment, _ = store.acquire("a@g1", source)
    attached = Attached(segment.path)
    try:
        verify(attached.data, attached.checksum, segment.path.name)  # intact
    finally:
        attached.close()
    corrupt(segment.path, HEADER_SIZE + 17)
    attached = Attached(segment.path)  # the header is intact: attaching alone cannot tell
    try:
        hot = HotCopy(attached.data)
        with pytest.raises(CorruptWeights, match="corrupt"):
            verify(hot.data, attached.checksum, segment.path.name)
    finally:
        attached.close()
    store.drop("a@g1")
    assert not segment.path.exists()
    store.release("a@g1", segment.generation)  # the dropped segment's user: a no-op
    fresh, hit = store.acquire("a@g1", source)
    assert not hit
    assert fresh.generation > segment.generation
    store.release("a@g1", segment.generation)  # a stale release leaves the new one in use
    assert fresh.users == 1
    attached = Attached(fresh.path)
    try:
        verify(attached.data, attached.checksum, fresh.path.name)
    finally:
        attached.close()


def test_an_empty_tensor_with_a_shape_no_array_can_take_is_refused() -> None:
    """Found by the decoder fuzz test: size 0 (a zero dimension), the others huge."""
    import json as _json
    import struct as _struct

    from smss.errors import UnsafeArtifact
    from smss.safetensors_header import parse_image

    header = _json.dumps({"t": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}).encode()
    image = _struct.pack("<Q", len(header)) + header
    with pytest.raises(UnsafeArtifact, match="too large"):
        parse_image(memoryview(image))
