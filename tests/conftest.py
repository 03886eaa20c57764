"""Suite-wide leak checks: child processes and ``/dev/shm`` entries.

Also the suite's options: ``--runs`` sizes the random-kill test, ``--duration`` the
overload and soak tests.

Cheap and dependency-free: a scan of ``/proc/*/stat`` and a ``/dev/shm`` listing
before and after each test; ``/proc/*/maps`` and ``/proc/*/fd`` are read only
when a new ``/dev/shm`` entry is still there at the end of a test.

* A child of this pytest process that appears during a test and is still running
  after a grace period fails that test. Servers owned by session- or
  module-scoped fixtures start before the test's snapshot, so they do not count;
  they must be gone when the session ends.
* A ``/dev/shm`` entry that appears during a test is leaked when, after the grace
  period, its owner is gone and no process maps it or holds it open. SMSS names
  its segments ``smss-<run>-...`` after the run directory ``$TMPDIR/smss-<run>``
  of the node that made them, which exists exactly as long as that node runs:
  while it does, a segment is a cache entry, not a leak (a shared server keeps
  weights across tests). Such entries are checked again when the session ends.
  Entries held only by other programs on a shared machine are theirs, not ours.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# PostgreSQL fixtures (pg_url, private_pg): tests/postgres_fixtures.py.
pytest_plugins = ["postgres_fixtures"]

# Hypothesis profiles: ``ci`` (the default) keeps property tests short; ``long``
# (HYPOTHESIS_PROFILE=long) runs many more examples, e.g. of the decoder fuzz tests.
# A test's own ``@settings(max_examples=...)`` still wins.
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runs",
        type=int,
        default=20,
        help="runs of the random-kill test (tests/fault/test_random_kills.py); RELIABILITY 2 asks for 500",
    )
    parser.addoption(
        "--duration",
        type=float,
        default=None,
        help="seconds of the long-running tests (overload, soak) instead of their short default; "
        "RELIABILITY 17 and 33 ask for minutes",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runs = int(config.getoption("--runs"))
    for item in items:
        marker = item.get_closest_marker("scaled_timeout")
        if marker is not None:
            base_s, per_run_s = marker.args
            item.add_marker(pytest.mark.timeout(base_s + per_run_s * runs))
        lasting = item.get_closest_marker("duration_timeout")
        if lasting is not None:
            (base_s,) = lasting.args
            item.add_marker(pytest.mark.timeout(base_s + 2 * (config.getoption("--duration") or 0.0)))
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    reason = no_gpu_reason() if gpu_tests else None
    for item in gpu_tests if reason else ():
        # Even in CI: a GPU is not a service a run can start (scripts/gpu-check runs these).
        item.add_marker(pytest.mark.skip(reason=reason))


def no_gpu_reason() -> str | None:
    """Why tests marked ``gpu`` cannot run here, or None when they can: a CUDA build of
    torch and a GPU that NVML or nvidia-smi finds. Nothing here initialises CUDA in this
    process (it forks)."""
    try:
        import torch
    except ImportError:
        return "needs a GPU: torch is not installed"
    if torch.version.cuda is None:
        return f"needs a GPU: torch {torch.__version__} is a CPU-only build (see scripts/gpu-check)"
    from smss.node.devices import probe_gpus

    try:
        gpus = probe_gpus()
    except Exception as e:
        return f"needs a GPU: GPU discovery failed ({type(e).__name__}: {e})"
    if not gpus:
        return "needs a GPU: NVML and nvidia-smi find none on this machine"
    return None


#: How long children and segments may take to go away once a test body returned.
LEAK_GRACE_S = 10.0
SHM = Path("/dev/shm")

Procs = dict[int, tuple[int, str]]


def _processes() -> Procs:
    """Every live (non-zombie) process: pid -> (ppid, command name)."""
    with os.scandir("/proc") as entries:
        pids = [e.name for e in entries if e.name.isdigit()]
    out: Procs = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        comm_end = stat.rfind(")")
        state, ppid = stat[comm_end + 2 :].split()[:2]
        if state != "Z":
            out[int(pid)] = (int(ppid), stat[stat.find("(") + 1 : comm_end])
    return out


def _new_children(procs: Procs, before: set[int]) -> dict[int, str]:
    me = os.getpid()
    return {pid: name for pid, (ppid, name) in procs.items() if ppid == me and pid not in before}


def _descendants(procs: Procs, root: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _shm_entries() -> set[str]:
    try:
        with os.scandir(SHM) as entries:
            return {e.name for e in entries}
    except OSError:
        return set()


def _owner_running(name: str) -> bool:
    parts = name.split("-")
    return len(parts) >= 3 and parts[0] == "smss" and Path(tempfile.gettempdir(), f"smss-{parts[1]}").is_dir()


def _holders(names: set[str], pids: set[int]) -> dict[str, set[int]]:
    """Which of ``pids`` map or hold open each ``/dev/shm`` entry in ``names``."""
    paths = {str(SHM / n): n for n in names}
    held: dict[str, set[int]] = {n: set() for n in names}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", errors="replace") as f:
                mapped = [line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line]
            with os.scandir(f"/proc/{pid}/fd") as fds:
                opened = [os.readlink(fd.path) for fd in fds]
        except OSError:  # exited, or not ours to read
            continue
        for path in (*mapped, *opened):
            name = paths.get(path.removesuffix(" (deleted)"))
            if name is not None:
                held[name].add(pid)
    return held


def _classify(candidates: set[str], procs: Procs) -> tuple[set[str], set[str]]:
    """(leaked, still legitimately ours) among new ``/dev/shm`` entries."""
    present = candidates & _shm_entries()
    if not present:
        return set(), set()
    mine = _descendants(procs, os.getpid())
    leaked: set[str] = set()
    deferred: set[str] = set()
    for name, pids in _holders(present, set(procs)).items():
        if pids & mine or (not pids and _owner_running(name)):
            deferred.add(name)
        elif not pids:
            leaked.add(name)
    return leaked, deferred


#: Entries whose owner was still running at the end of a test: checked again at session end.
_DEFERRED: set[str] = set()


def _check(children_before: set[int], candidates: Callable[[], set[str]]) -> None:
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        procs = _processes()
        children = _new_children(procs, children_before)
        leaked, deferred = _classify(candidates(), procs)
        if not (children or leaked) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    _DEFERRED.update(deferred)
    problems = []
    if children:
        problems.append(f"child processes still running: {sorted(children.items())}")
    if leaked:
        problems.append(f"/dev/shm entries left behind: {sorted(leaked)}")
    if problems:
        pytest.fail("leaked resources: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def check_session_leaks() -> Iterator[None]:
    """Set up before (so torn down after) every other session fixture: the shared servers
    are stopped by now, so their children and the segments they kept must be gone."""
    children_before = set(_new_children(_processes(), set()))
    yield
    _check(children_before, lambda: set(_DEFERRED))


@pytest.fixture(autouse=True)
def check_leaks() -> Iterator[None]:
    children_before = set(_new_children(_processes(), set()))
    shm_before = _shm_entries()
    yield
    _check(children_before, lambda: _shm_entries() - shm_before)
