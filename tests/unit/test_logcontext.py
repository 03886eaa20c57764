"""Log records carry the request, function, instance and run they are about."""

from __future__ import annotations

import asyncio
import json
import logging

from smss import logcontext
from smss.cli.logsetup import TextFormatter
from smss.logcontext import ContextFilter, JsonFormatter


def _record(message: str = "hello %s", *args: object) -> logging.LogRecord:
    record = logging.LogRecord("smss.test", logging.INFO, __file__, 1, message, args or ("world",), None)
    ContextFilter().filter(record)
    return record


def test_bound_ids_are_on_the_record_and_reset_after() -> None:
    with logcontext.bound(request="r1", function="mlp"):
        with logcontext.bound(instance="mlp-1"):
            inner = _record()
        outer = _record()
    after = _record()
    assert (inner.request, inner.function, inner.instance) == ("r1", "mlp", "mlp-1")  # type: ignore[attr-defined]
    assert outer.instance is None  # type: ignore[attr-defined]
    assert after.request is None  # type: ignore[attr-defined]


def test_json_lines_name_the_ids_that_are_set() -> None:
    with logcontext.bound(request="r1", run="run-9"):
        line = JsonFormatter().format(_record())
    doc = json.loads(line)
    assert doc["message"] == "hello world"
    assert doc["level"] == "info"
    assert doc["logger"] == "smss.test"
    assert (doc["request"], doc["run"]) == ("r1", "run-9")
    assert "function" not in doc
    assert doc["ts"].endswith("Z")


def test_text_lines_end_with_the_ids() -> None:
    with logcontext.bound(function="cnn", instance="cnn-2"):
        assert TextFormatter().format(_record()).endswith("hello world [function=cnn instance=cnn-2]")
    assert TextFormatter().format(_record()).endswith("hello world")


def test_a_task_keeps_what_it_set_to_itself() -> None:
    seen: dict[str, str | None] = {}

    async def drive() -> None:
        logcontext.set_ids(run="run-1")
        await asyncio.sleep(0)
        seen["inside"] = logcontext.current("run")

    async def main() -> None:
        await asyncio.create_task(drive())
        seen["outside"] = logcontext.current("run")

    asyncio.run(main())
    assert seen == {"inside": "run-1", "outside": None}
