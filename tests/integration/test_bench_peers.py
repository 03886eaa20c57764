"""``smss bench peers`` for real on a small scale: SMSS and the one-worker container serve
``mlp`` at one client, driven by the load generator on its own core; a peer that was
never set up is reported as such while the others run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    empty = tmp_path_factory.mktemp("no-peers")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "smss.cli",
            "bench",
            "peers",
            "--json",
            "--systems",
            "smss,container,kserve",
            "--models",
            "mlp",
            "--concurrency",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0.5",
            "--peers-dir",
            str(empty),
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    data: dict[str, object] = json.loads(done.stdout)
    return data


def test_every_point_has_its_fields(result: dict[str, object]) -> None:
    rows = result["results"]
    assert isinstance(rows, list)
    by_key = {(r["system"], r["body"], r["concurrency"]): r for r in rows}
    # SMSS takes the binary tensor extension too; the container only JSON.
    assert set(by_key) == {("smss", "json", 1), ("smss", "binary", 1), ("container", "json", 1)}
    for row in rows:
        assert row["model"] == "mlp"
        assert row["rps"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["errors"] == 0


def test_the_comparison_names_every_peer(result: dict[str, object]) -> None:
    (c,) = result["comparison"]  # type: ignore[misc]
    assert c["model"] == "mlp"
    assert c["concurrency"] == 1  # the highest measured here
    assert c["smss_vs_container_rps"] > 0
    assert c["smss_vs_container_p99_ratio"] > 0
    for peer in ("ray_serve", "kserve", "mlserver", "container_per_core"):
        assert c[f"smss_vs_{peer}_rps"] is None
        assert c[f"smss_vs_{peer}_p99_ratio"] is None


def test_the_bursty_phase_has_a_p99_per_system(result: dict[str, object]) -> None:
    (b,) = result["bursty"]  # type: ignore[misc]
    assert b["clients"] == [1, 32, 1]
    assert set(b["p99_ms"]) == {"smss", "container"}
    assert all(p > 0 for p in b["p99_ms"].values())
    assert all(len(phases) == 3 for phases in b["phase_p99_ms"].values())


def test_settings_placement_and_errors_are_recorded(result: dict[str, object]) -> None:
    systems = result["systems"]
    assert isinstance(systems, dict)
    assert systems["kserve"] == {"error": "not set up: run smss bench peers --setup"}
    for name in ("smss", "container"):
        mlp = systems[name]["models"]["mlp"]
        assert "error" not in mlp
        assert mlp["settings"]
        assert mlp["output_check"]["ok"] is True  # it served the same model, not just a 200
    assert systems["container"]["models"]["mlp"]["settings"]["workers"] == 1
    settings = result["settings"]
    assert isinstance(settings, dict)
    placement = settings["placement"]
    assert placement["threads_per_process"] == 1
    assert placement["loadgen_core"] not in placement["server_cores"] or placement["shared_core"]


def test_plot_without_matplotlib_is_a_clear_error(tmp_path: Path) -> None:
    # A stand-in for an environment without the plots extra: matplotlib cannot be found.
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec; "
        "importlib.util.find_spec = lambda n, *a: None if n == 'matplotlib' else real(n, *a); "
        "from smss.cli.main import main; sys.argv = ['smss', 'bench', 'peers', '--plot', sys.argv[1]]; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x.png")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "--plot needs matplotlib: pip install 'smss[plots]'" in done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "x.png").exists()
