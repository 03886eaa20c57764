"""Headless Chromium for the dashboard tests: Debian's ``chromium`` driven by Playwright.

No browser is ever downloaded: Playwright is pointed at the system's binary
(``scripts/install-chromium`` installs it; ``$SMSS_CHROMIUM`` names another). Where
either is missing the tests skip, and in CI (``CI=true``) they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def chromium_path() -> str:
    found = os.environ.get("SMSS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "no chromium on PATH: run scripts/install-chromium (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Page:
    """A browser page and what it logged: console errors and warnings, uncaught
    exceptions, and every URL it requested."""

    page: Any
    problems: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@contextlib.contextmanager
def launch() -> Iterator[Any]:
    """A headless Chromium (skips, or in CI fails, where there is none)."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("playwright is not installed (pip install -e '.[test]')")
        pytest.skip("playwright is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def open_page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = Page(context.new_page())
    page.page.on(
        "console",
        lambda m: (
            page.problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None
        ),
    )
    page.page.on("pageerror", lambda e: page.problems.append(f"uncaught: {e}"))
    page.page.on("request", lambda r: page.requested.append(r.url))
    try:
        yield page
    finally:
        context.close()
