"""Progress is drawn on stderr only when it is a terminal and --json is not on the
command line; jobs report through the Progress port, the silent one by default."""

from __future__ import annotations

import io
import sys

import pytest

from smss.cli import progress as cli_progress
from smss.progress import SILENT


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_shown_only_on_a_terminal_without_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not cli_progress.wanted(["bench", "replay", "t.csv"])
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert cli_progress.wanted(["bench", "replay", "t.csv"])
    assert not cli_progress.wanted(["bench", "replay", "t.csv", "--json"])


def test_silent_progress_draws_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["smss", "bench", "cold-start", "--json"])
    with cli_progress.shown("bench cold-start") as progress:
        assert progress is SILENT
        progress.phase("a part", 10)
        progress.advance(5)
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", "")
