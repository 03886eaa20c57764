"""RELIABILITY 13b, by reading the source: no fire-and-forget asyncio tasks.

The rule, over every module of ``smss``: a call of ``create_task`` or
``ensure_future`` (on ``asyncio``, a loop, or anything else) is **owned** when

1. it is made on a task group: its receiver is a name bound by
   ``async with asyncio.TaskGroup() as NAME`` in the same function, a parameter
   annotated ``TaskGroup``, or ``self.NAME`` where the class annotates ``NAME`` with a
   type naming ``TaskGroup``. The group awaits the task, and cancels it when the group
   ends or another task of it fails; or
2. it sits where :data:`SUPERVISED` lists it (the module and the function around it),
   with who holds the task and where it is cancelled or awaited, **and** its result
   is kept: the call is not a statement of its own (``asyncio.create_task(f())`` on
   a line by itself is fire-and-forget, whatever the list says).

Anything else fails, and so does an entry of the list that no longer names a call.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import smss

SRC = Path(smss.__file__).parent

SPAWNERS = frozenset({"create_task", "ensure_future"})

#: "module:function" -> who holds the task it makes, and who ends it.
SUPERVISED = {
    "node/worker.py:Server.handle": "the connection's `tasks` set; cancelled when the connection ends",
    "node/worker.py:_unless_stopped": "both awaited by asyncio.wait in the same call, the loser cancelled",
    "node/channel.py:UnixChannel.__init__": "self._task, the read loop; cancelled and awaited by close()",
    "node/memory.py:ResidentReadings.latest": "self._task, one refresh at a time; close() cancels, awaits it",
    "node/agent.py:NodeAgent._start_exec": (
        "the exit watcher of an exec'd instance, held by the instance (cancel_watch); it ends with the "
        "process, and close() stops every instance and waits for the exit it reports"
    ),
    "workflow/driver.py:Driver._round": "self._calls; cancelled and awaited by _stop_all when the run ends",
    "workflow/driver.py:Driver._dispatch": "self._waiting; cancelled and awaited by _stop_all",
    "workflow/driver.py:Driver._make_later": (
        "an append, kept in run.pending: awaited by _settle, gathered when the run's drive ends"
    ),
    "cluster/ray_agent.py:AgentActor._start": (
        "self._loop_task, the agent actor's heartbeat and probe loops; close() cancels it"
    ),
    "cluster/ray_controller.py:ControllerActor.start": (
        "self._main, the controller actor's platform (stop() ends and awaits it); the ready wait is "
        "awaited by asyncio.wait beside it in the same call and cancelled after"
    ),
    "cluster/ray_gateway.py:GatewayActor.start": (
        "self._task, the gateway actor's server (stop() ends and awaits it); the bound wait is "
        "awaited by asyncio.wait beside it in the same call and cancelled after"
    ),
    "node/gpu/node.py:GpuNode._spawn": (
        "self._tasks, the GPU node's background work (loads, step-downs, exit watchers): errors logged "
        "as each ends, close() cancels and gathers them all"
    ),
    "testing/clock.py:FakeClock.call_later": "self._driver, the clock's one driver; ends with no timer due",
    "testing/fakes.py:FakeChannel.send": "returned to the caller, and kept in self._tasks until done",
}


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC).as_posix(), ast.parse(path.read_text(), str(path))


def _names_task_group(annotation: ast.AST | None) -> bool:
    return annotation is not None and "TaskGroup" in ast.unparse(annotation)


def _group_attributes(cls: ast.ClassDef) -> set[str]:
    """``NAME`` for each ``self.NAME: ...TaskGroup...`` (or class-level ``NAME: ...``)."""
    found = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.AnnAssign) and _names_task_group(node.annotation):
            target = node.target
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                if target.value.id == "self":
                    found.add(target.attr)
            elif isinstance(target, ast.Name):
                found.add(target.id)
    return found


def _group_names(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Names bound to a task group in ``fn``: ``async with TaskGroup() as g``, annotated parameters."""
    found = {a.arg for a in (*fn.args.args, *fn.args.kwonlyargs) if _names_task_group(a.annotation)}
    for node in ast.walk(fn):
        if isinstance(node, ast.AsyncWith):
            for item in node.items:
                ctx = item.context_expr
                if (
                    isinstance(ctx, ast.Call)
                    and "TaskGroup" in ast.unparse(ctx.func)
                    and isinstance(item.optional_vars, ast.Name)
                ):
                    found.add(item.optional_vars.id)
    return found


def _spawns(tree: ast.Module) -> Iterator[tuple[str, ast.Call, bool, bool]]:
    """(function, call, on a task group, result discarded) for every spawning call."""
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

    def visit(
        node: ast.AST, scope: str, attrs: set[str], names: set[str]
    ) -> Iterator[tuple[str, ast.Call, bool, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(
                    child, f"{scope}.{child.name}" if scope else child.name, _group_attributes(child), set()
                )
                continue
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = f"{scope}.{child.name}" if scope else child.name
                yield from visit(child, inner, attrs, names | _group_names(child))
                continue
            if isinstance(child, ast.Call):
                func = child.func
                name = (
                    func.attr
                    if isinstance(func, ast.Attribute)
                    else func.id
                    if isinstance(func, ast.Name)
                    else ""
                )
                if name in SPAWNERS:
                    receiver = func.value if isinstance(func, ast.Attribute) else None
                    on_group = (isinstance(receiver, ast.Name) and receiver.id in names) or (
                        isinstance(receiver, ast.Attribute)
                        and isinstance(receiver.value, ast.Name)
                        and receiver.value.id == "self"
                        and receiver.attr in attrs
                    )
                    yield scope, child, on_group, isinstance(parents.get(child), ast.Expr)
            yield from visit(child, scope, attrs, names)

    yield from visit(tree, "", set(), set())


def _violations(modules: Iterator[tuple[str, ast.Module]]) -> tuple[dict[str, list[str]], set[str]]:
    unowned: dict[str, list[str]] = {}
    listed_sites: set[str] = set()
    for module, tree in modules:
        for scope, call, on_group, discarded in _spawns(tree):
            if on_group:
                continue
            site = f"{module}:{scope}"
            text = f"line {call.lineno}: {ast.unparse(call)[:80]}"
            if site not in SUPERVISED:
                unowned.setdefault(site, []).append(f"{text} (not on a task group, not listed)")
                continue
            listed_sites.add(site)
            if discarded:
                unowned.setdefault(site, []).append(f"{text} (its task is dropped: nobody holds it)")
    return unowned, listed_sites


def test_every_task_has_an_owner() -> None:
    unowned, listed = _violations(_modules())
    assert not unowned, (
        f"fire-and-forget tasks (put them in a task group, or hold them and list them): {unowned}"
    )
    stale = sorted(set(SUPERVISED) - listed)
    assert not stale, f"listed, but they make no task any more (remove the entries): {stale}"


def test_the_rule_tells_owned_from_unowned_tasks() -> None:
    sample = ast.parse(
        "import asyncio\n"
        "class Owner:\n"
        "    def __init__(self):\n"
        "        self._group: asyncio.TaskGroup | None = None\n"
        "    def spawn(self):\n"
        "        self._group.create_task(work())\n"
        "        asyncio.create_task(work())\n"
        "async def main(tg: asyncio.TaskGroup):\n"
        "    async with asyncio.TaskGroup() as g:\n"
        "        g.create_task(work())\n"
        "    tg.create_task(work())\n"
        "    kept = asyncio.ensure_future(work())\n"
    )
    found = [(scope, on_group, discarded) for scope, _, on_group, discarded in _spawns(sample)]
    assert found == [
        ("Owner.spawn", True, True),
        ("Owner.spawn", False, True),
        ("main", True, True),
        ("main", True, True),
        ("main", False, False),
    ]
