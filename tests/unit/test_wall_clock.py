"""RELIABILITY 8, by reading the source: deadlines, leases and timeouts never come from
the wall clock, and order never comes from timestamps.

The rules, over every module of ``smss``:

1. **Wall-clock reads** are ``time.time()`` and ``time.time_ns()`` (called, or passed
   on as a function), ``from time import time``, ``datetime.now()`` / ``utcnow()`` /
   ``today()``, and the ``Clock`` port's wall time: ``.time()`` called on anything
   whose last name ends in ``clock`` (``self._clock.time()``, ``shared.clock.time()``).
   ``loop.time()`` and ``time.monotonic()`` / ``perf_counter()`` are monotonic and
   free to use. A wall-clock read may sit only where :data:`WALL_CLOCK` lists it (the
   module and the function around it), with what the value is for: a timestamp shown
   to people or stored beside a record, an id, a retention age in human time. Never a
   deadline. A new read fails this test until it is listed, so it gets reviewed.
2. **No SQL orders rows by a timestamp column** (``ts``, ``created``, ``updated``,
   ``deployed_at``, ``started_at``) outside :data:`ORDER_BY_TIME`.
3. **No ``sorted`` / ``min`` / ``max`` / ``.sort`` keyed on a timestamp field** (a
   ``key=`` lambda that reads one) outside :data:`SORTED_BY_TIME`.

Stale entries fail too: an entry names a site that still exists. (Moving the wall clock
under a real process: ``tests/fault/test_wall_clock_jumps.py``.)
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import smss

SRC = Path(smss.__file__).parent

#: "module:function" -> what its wall-clock reads are for.
WALL_CLOCK = {
    "ports.py:SystemClock.time": "the Clock port's wall time itself: the one place that reads it",
    "node/agent.py:NodeAgent._info": (
        "InstanceInfo.started_at, shown to operators; adoption sorts equivalent instances by it "
        "(any order is right)"
    ),
    "app/platform.py:Platform.deploy": "FunctionRecord.deployed_at, shown to operators",
    "bench/peers/venvs.py:_setup_one": "when a peer's environment was made, written in its marker for people",
    "store/sqlite_workflows.py:SqliteWorkflows.put": "the workflows table's deployed_at, for people",
    "store/sqlite_log.py:SqliteEventLog._apply_all": (
        "events.ts and runs.created/updated beside each record; order comes from seq"
    ),
    "store/sqlite_log.py:SqliteEventLog._maybe_compact": (
        "retention age of finished runs (--log-retention), a policy in human time: a jump compacts "
        "finished runs sooner or later, never a running one; when it runs is decided on the monotonic clock"
    ),
    "store/postgres.py:PgWorkflows.put": "the workflows table's deployed_at, for people",
    "store/postgres_log.py:PgEventLog._apply_all": (
        "events.ts and runs.created/updated beside each record, as the SQLite log's; order comes from seq"
    ),
    "store/postgres_log.py:PgEventLog._maybe_compact": (
        "retention age of finished runs, as the SQLite log's; engines' liveness is judged on the "
        "monotonic clock (heartbeats), never on a wall clock"
    ),
    "workflow/engine.py:Engine.submit": (
        "a run id (UUIDv7): the time orders index pages, 74 random bits make it unique"
    ),
    "workflow/engine.py:Engine.replay_from": "a run id, as in submit",
    "testing/memlog.py:MemoryEventLog.start_run": "the in-memory log's created/updated, as the SQLite log's",
    "testing/memlog.py:MemoryEventLog._append": "the in-memory log's updated, as the SQLite log's",
    "testing/memlog.py:MemoryEventLog._add": "the in-memory log's record ts, as the SQLite log's",
    "testing/fakes.py:FakeBackend.start_instance": "InstanceInfo.started_at of a fake instance",
}

TIMESTAMP_FIELDS = frozenset({"ts", "created", "updated", "deployed_at", "started_at"})

#: "module:function" -> why its SQL may order by a timestamp.
ORDER_BY_TIME = {
    "store/_log_compact.py:compact": (
        "retention: which finished runs past their age go first; what is kept never depends on it"
    ),
}

#: "module:function" -> why it may sort by a timestamp.
SORTED_BY_TIME = {
    "control/adoption.py:choose": (
        "which of a function's instances of one generation to adopt first: they are equivalent, "
        "any order is right"
    ),
}

_DATETIME_NOW = frozenset({"now", "utcnow", "today"})


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC).as_posix(), ast.parse(path.read_text(), str(path))


def _scopes(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """Every node with the qualified name of the function (or class) around it."""

    def walk(node: ast.AST, scope: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{scope}.{child.name}" if scope else child.name
                yield inner, child
                yield from walk(child, inner)
            else:
                yield scope, child
                yield from walk(child, scope)

    yield from walk(tree, "")


def _last_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _wall_clock_read(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
    if isinstance(node, ast.ImportFrom) and node.module == "time":
        names = [a.name for a in node.names if a.name in ("time", "time_ns")]
        return f"from time import {', '.join(names)}" if names else None
    if not isinstance(node, ast.Attribute):
        return None
    receiver = node.value
    if isinstance(receiver, ast.Name) and receiver.id == "time" and node.attr in ("time", "time_ns"):
        return f"time.{node.attr}"  # called or passed on: either way the wall clock
    called = isinstance(parents.get(node), ast.Call) and parents[node].func is node  # type: ignore[attr-defined]
    if called and node.attr in _DATETIME_NOW and _last_name(receiver) in ("datetime", "date"):
        return f"{_last_name(receiver)}.{node.attr}()"
    if called and node.attr == "time" and _last_name(receiver).lower().endswith("clock"):
        return f"{ast.unparse(receiver)}.time()"
    return None


def _parents(tree: ast.Module) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _sites(find: str) -> dict[str, list[str]]:
    """ "module:function" -> what was found there, for one of the three rules."""
    found: dict[str, list[str]] = {}
    for module, tree in _modules():
        parents = _parents(tree)
        for scope, node in _scopes(tree):
            what: str | None = None
            if find == "wall":
                what = _wall_clock_read(node, parents)
            elif find == "order" and isinstance(node, ast.Constant) and isinstance(node.value, str):
                columns = re.findall(r"ORDER BY\s+([\w.]+)", node.value, re.IGNORECASE)
                bad = [c for c in columns if c.split(".")[-1].lower() in TIMESTAMP_FIELDS]
                what = f"ORDER BY {', '.join(bad)}" if bad else None
            elif (
                find == "sorted"
                and isinstance(node, ast.Call)
                and _last_name(node.func) in ("sorted", "sort", "min", "max")
            ):
                for kw in node.keywords:
                    if kw.arg == "key":
                        fields = {
                            n.attr for n in ast.walk(kw.value) if isinstance(n, ast.Attribute)
                        } & TIMESTAMP_FIELDS
                        what = (
                            f"{_last_name(node.func)}(key=... {', '.join(sorted(fields))})"
                            if fields
                            else None
                        )
            if what is not None:
                found.setdefault(f"{module}:{scope}", []).append(what)
    return found


def _check(found: dict[str, list[str]], allowed: dict[str, str], rule: str) -> None:
    unlisted = {site: what for site, what in found.items() if site not in allowed}
    stale = sorted(set(allowed) - set(found))
    assert not unlisted, (
        f"{rule} outside the reviewed places (list each with what it is for, if no deadline): {unlisted}"
    )
    assert not stale, f"listed, but no longer there (remove the entries): {stale}"


def test_the_wall_clock_is_read_only_where_listed() -> None:
    _check(_sites("wall"), WALL_CLOCK, "wall-clock reads")


def test_no_sql_orders_by_a_timestamp() -> None:
    _check(_sites("order"), ORDER_BY_TIME, "SQL ordered by a timestamp")


def test_nothing_is_sorted_by_a_timestamp() -> None:
    _check(_sites("sorted"), SORTED_BY_TIME, "sorting by a timestamp")


def test_the_rules_see_what_they_look_for() -> None:
    """The detectors on a sample: each kind of wall-clock read, and the monotonic clocks not."""
    sample = ast.parse(
        "import time, datetime\n"
        "from time import time as t\n"
        "class C:\n"
        "    def f(self):\n"
        "        a = time.time(); b = self._clock.time(); c = datetime.datetime.now()\n"
        "        d = time.monotonic(); e = loop.time(); g = self.clock.monotonic()\n"
        "        h = sorted(xs, key=lambda r: r.updated); k = time.time_ns\n"
    )
    parents = _parents(sample)
    reads = [r for _, n in _scopes(sample) if (r := _wall_clock_read(n, parents))]
    assert reads == [
        "from time import time",
        "time.time",
        "self._clock.time()",
        "datetime.now()",
        "time.time_ns",
    ]
