"""Where the ``smss`` command writes: its output on stdout (``--json``: one JSON
document a program can read), errors and progress on stderr."""

from __future__ import annotations

import sys
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.markup import escape

console = Console()
#: Errors go to stderr, so that stdout holds only a command's output (``--json``).
err_console = Console(stderr=True, soft_wrap=True)  # an error is one line, however long

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON")]


def error(message: object) -> None:
    # The message is text, not markup: "pip install 'smss[plots]'" keeps its brackets.
    err_console.print(f"[red]error:[/red] {escape(str(message))}", highlight=False)


def print_json(data: object) -> None:
    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
