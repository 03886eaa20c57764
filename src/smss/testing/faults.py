"""The workflow log's fault hooks from a spec string (grammar and actions in
:mod:`smss.faults`), for tests that open a log in their own process.

Points of the log (:class:`smss.store.sqlite_log.FaultHooks`):

* ``log.before_commit`` / ``log.after_commit``: around the COMMIT of a group commit;
* ``log.before_checkpoint`` / ``log.after_checkpoint``: around a completed checkpoint.
"""

from __future__ import annotations

from smss.errors import InvalidSpec
from smss.faults import on_pass, parse
from smss.store.sqlite_log import FaultHooks, log_hooks

__all__ = ["log_faults", "on_pass"]


def log_faults(spec: str) -> FaultHooks:
    """The log's hooks for ``spec``; :class:`InvalidSpec` naming a bad entry or a point
    that is not the log's."""
    actions = parse(spec)
    other = sorted(p for p in actions if not p.startswith("log."))
    if other:
        raise InvalidSpec(f"not points of the workflow log: {other}")
    return log_hooks(actions.get)
