"""The README and docs/ stand alone: every link points inside the repository (or is an
anchor or the local server), every file they link exists, and nothing refers to
folders outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "traces" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)|<(https?://[^>]+)>")
LOCAL = ("http://127.0.0.1", "http://localhost")


def test_the_docs_exist() -> None:
    names = {p.name for p in DOCS}
    for needed in (
        "architecture.md",
        "cli.md",
        "dashboard.md",
        "figures.md",
        "operations.md",
        "quickstart.md",
    ):
        assert needed in names
    assert (ROOT / "docs" / "examples" / "pipeline.py").is_file()


def test_links_stay_inside_the_repository() -> None:
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text, doc
        for match in LINK.finditer(text):
            target = match.group(1) or match.group(2)
            if target.startswith("#") or target.startswith(LOCAL):
                continue
            assert "://" not in target, f"{doc.name} links outside the repository: {target}"
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            assert path.exists(), f"{doc.name} links to {target}, which is not in the repository"
            assert ROOT in path.parents, f"{doc.name} links outside the repository: {target}"


def test_the_readme_names_where_logs_live() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "logs/platform.log" in readme
    assert "smss logs" in readme
    assert '"inputs": [...]' not in readme
