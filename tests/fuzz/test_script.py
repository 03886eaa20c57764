"""``scripts/fuzz`` runs the targets and reports what it ran (a short run of each engine)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz"


def fuzz(*args: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return summary


def test_hypothesis_engine_reports_the_cases_it_ran() -> None:
    summary = fuzz("--engine", "hypothesis", "--cases", "30", "--targets", "replay_body,safetensors")
    assert summary["engine"] == "hypothesis"
    assert summary["targets"] == {"replay_body": 30, "safetensors": 30}
    assert summary["total_cases"] == 60
    assert summary["crashed"] == []


def test_atheris_engine_or_its_fallback() -> None:
    """atheris is optional (the ``fuzz`` extra): without it the script falls back to hypothesis."""
    summary = fuzz("--engine", "atheris", "--cases", "500", "--targets", "infer_json")
    assert summary["engine"] == ("atheris" if importlib.util.find_spec("atheris") else "hypothesis")
    assert summary["targets"] == {"infer_json": 500}
    assert summary["crashed"] == []
