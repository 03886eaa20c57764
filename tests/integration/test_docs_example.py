"""The README's workflow example runs as written: its ``smss`` and ``curl`` lines,
run by bash from the repository's root against a real server (the README's
``localhost:8000`` pointed at the test's server), give the outputs it says."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from smss.testing.server import ServerProcess, start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _example_lines() -> list[str]:
    """The commands of the README's Workflows block, up to the runs listing."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Workflows") :]
    block = section[section.index("```bash") + len("```bash") : section.index("smss runs list")]
    return [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"SMSS_URL": "", "SMSS_TOKEN": "", "SMSS_KEEP_ALIVE_S": ""}
    server = start_server(tmp_path_factory.mktemp("docs"), env=env)
    try:
        yield server
    finally:
        server.stop()


def test_the_readme_workflow_example_runs(server: ServerProcess, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("no curl")
    lines = _example_lines()
    assert any(ln.startswith("smss runs start pipeline") for ln in lines), lines
    address = server.url.removeprefix("http://")
    script = "\n".join(ln.replace("localhost:8000", address) for ln in lines)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "smss").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m smss.cli "$@"\n')
    (bin_dir / "smss").chmod(0o755)
    env = {**os.environ, "SMSS_URL": server.url, "SMSS_TOKEN": "", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^run \w+: completed$", proc.stdout, re.MULTILINE), proc.stdout
    answer = json.loads(re.findall(r"^\{.*\}$", proc.stdout, re.MULTILINE)[-1])
    assert answer["status"] == "completed"
    assert answer["outputs"]["total"]["data"] == [4.0, 8.0, 12.0, 16.0]  # the second run of the session
