"""The platform's log: to stderr and to ``DATA/logs/platform.log`` (rotated at 10 MiB,
three kept), as text or as one JSON object a line, each record carrying the request,
function, instance and run it is about (:mod:`smss.logcontext`)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from smss.errors import InvalidSpec
from smss.logcontext import FIELDS, ContextFilter, JsonFormatter

ROTATE_BYTES = 10 * 1024 * 1024
KEEP = 3
FORMATS = ("text", "json")


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [request=... run=...]``: the bound ids that are set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [f"{name}={value}" for name in FIELDS if (value := getattr(record, name, None)) is not None]
        return f"{text} [{' '.join(ids)}]" if ids else text


def configure_logging(level: str, fmt: str, file: Path | None) -> None:
    """Install the handlers: stderr, and ``file`` when given (its folder made)."""
    if fmt not in FORMATS:
        raise InvalidSpec(f"--log-format must be text or json, not {fmt!r}")
    if level.upper() not in logging.getLevelNamesMapping():
        raise InvalidSpec(f"--log-level must be one of debug, info, warning, error, not {level!r}")
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                file, maxBytes=ROTATE_BYTES, backupCount=KEEP, encoding="utf-8"
            )
        )
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(ContextFilter())
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
