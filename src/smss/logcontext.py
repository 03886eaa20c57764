"""Which request, function, instance and run a log line is about, carried by contextvars.

Code that starts handling something binds its id (:func:`bound` for a block,
:func:`set_ids` at the top of a task that is wholly about it: a run's driver, a
request's dispatch); every log record made meanwhile, in that task and the tasks it
starts, carries the ids as attributes once :class:`ContextFilter` is on the handler.
:class:`JsonFormatter` writes each record as one JSON object per line
(``smss serve --log-format json``). Installing handlers is the CLI's job.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar, Token

#: The ids a record may carry, in the order a JSON line lists them.
FIELDS = ("request", "function", "instance", "run")
_VARS: dict[str, ContextVar[str | None]] = {name: ContextVar(f"smss_{name}", default=None) for name in FIELDS}


def set_ids(**ids: str | None) -> None:
    """Bind ids for the rest of the current task (and the tasks it starts from here on)."""
    for name, value in ids.items():
        _VARS[name].set(value)


class bound:
    """Bind ids for the block (a class, not a generator: it is on every request's path)."""

    __slots__ = ("_ids", "_tokens")

    def __init__(self, **ids: str | None) -> None:
        self._ids = ids
        self._tokens: list[tuple[ContextVar[str | None], Token[str | None]]] = []

    def __enter__(self) -> None:
        self._tokens = [(_VARS[name], _VARS[name].set(value)) for name, value in self._ids.items()]

    def __exit__(self, *exc: object) -> None:
        for var, token in reversed(self._tokens):
            var.reset(token)


def current(name: str) -> str | None:
    return _VARS[name].get()


class ContextFilter(logging.Filter):
    """Adds the bound ids to every record as ``record.request`` ... (None when unbound)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _VARS.items():
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, the bound ids that are set, and ``exc`` (the traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)
