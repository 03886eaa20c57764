"""Helpers shared by the end-to-end tests: servers, polling, process checks, error bodies."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from safetensors.numpy import save_file

from smss.testing.server import ServerProcess, start_server, wait_until

T = TypeVar("T")

MODELS = Path(__file__).parent / "models"
DEMO_MODELS = ("mlp", "cnn", "mlp_onnx")
#: Environment of every server the tests start: settings come from flags only, never
#: from the developer's shell (SMSS_KEEP_ALIVE_S would override --keep-alive).
SERVER_ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}
#: Client-side bound on any single request: a hang fails the test instead of the suite.
REQUEST_TIMEOUT_S = 60.0
#: Strings an error body must never contain: tracebacks, source files, server paths.
LEAKY = ("Traceback", ".py", "site-packages", "/work/", f"{tempfile.gettempdir()}/")


def start(data_dir: Path, args: Sequence[str] = ()) -> ServerProcess:
    """``smss serve ARGS`` on a free port, once its startup (with ``--demo``, deploying the
    demo models) is complete: it prints ``smss serving on URL`` then."""
    server = start_server(data_dir, args, env=SERVER_ENV)
    try:

        def started() -> bool:
            if server.process.poll() is not None:
                raise AssertionError(f"smss serve exited:\n{server.log()[-4000:]}")
            return "smss serving on" in server.log()

        wait_until(started, 2 * REQUEST_TIMEOUT_S, "smss serve to finish starting")
        if "--demo" in args:
            assert set(DEMO_MODELS) <= set(functions(server.url)), server.log()[-4000:]
    except BaseException:
        server.stop()
        raise
    return server


def seed_demo(source: Path, data_dir: Path) -> Path:
    """Copy generated demo weights into a new data dir so ``--demo`` does not regenerate them."""
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, data_dir / "demo", dirs_exist_ok=True)
    return data_dir


def functions(url: str) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{url}/v1/functions", timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return {f["name"]: f for f in r.json()["functions"]}


def instance_pids(url: str, name: str) -> list[int]:
    return [i["pid"] for i in functions(url)[name]["instances"]]


def all_instance_pids(url: str) -> list[int]:
    return [i["pid"] for f in functions(url).values() for i in f["instances"]]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def assert_gone(pids: Sequence[int], timeout_s: float = 30.0) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout_s, f"processes {list(pids)} to exit")


def run_dirs(url: str) -> set[Path]:
    """The private run directories (instance sockets) of a server's current instances."""
    tmp = Path(tempfile.gettempdir())
    ids = [i["id"] for f in functions(url).values() for i in f["instances"]]
    return {sock.parent for iid in ids for sock in tmp.glob(f"smss-*/{iid}.sock")}


def stop_checked(server: ServerProcess) -> None:
    """SIGTERM the server: it exits cleanly and takes its instances, its run directory and
    its ``/dev/shm`` segments (named after the run directory) with it."""
    try:
        running = server.process.poll() is None
        pids = all_instance_pids(server.url) if running else []
        dirs = run_dirs(server.url) if running else set()
    finally:
        code = server.stop()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
    assert code in (0, -signal.SIGTERM), f"smss serve exited with {code}:\n{server.log()[-4000:]}"
    assert "Application shutdown complete" in server.log(), server.log()[-4000:]
    assert_gone(pids)
    for run_dir in dirs:
        assert not run_dir.exists(), f"{run_dir} left behind: {sorted(os.listdir(run_dir))}"
        segments = [n for n in os.listdir("/dev/shm") if n.startswith(f"{run_dir.name}-")]
        assert segments == [], f"/dev/shm segments left behind: {segments}"


def assert_error(
    response: httpx.Response, status: int, *, data_dir: Path | None = None, echoes: Sequence[str] = ()
) -> str:
    """``status`` with an ``{"error": ...}`` JSON body free of tracebacks and paths; the message.

    ``echoes``: the client's own input, which the message may quote (a name ending in .py)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str), body
    assert body["error"], body
    text = response.text
    for leak in (*LEAKY, *([str(data_dir)] if data_dir else [])):
        if any(leak in echoed for echoed in echoes):
            continue
        assert leak not in text, f"error body leaks {leak!r}: {text[:500]}"
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1, response.headers
    return str(body["error"])


def json_infer_body(arrays: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": k, "datatype": "FP32", "shape": list(v.shape), "data": v.ravel().tolist()}
            for k, v in arrays.items()
        ],
        **extra,
    }


def output_of(response: httpx.Response, name: str) -> np.ndarray:
    assert response.status_code == 200, (response.status_code, response.text[:500])
    for out in response.json()["outputs"]:
        if out["name"] == name:
            assert out["datatype"] == "FP32", out
            return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    raise AssertionError(f"no output {name!r} in {response.text[:500]}")


SCALE_W = np.array([2.0, 3.0, -1.0, 0.5], dtype=np.float32)


def write_scale_weights(path: Path) -> Path:
    """Weights for ``models/scale.py``: one FP32 vector ``w`` of 4."""
    save_file({"w": SCALE_W}, str(path))
    return path


def renamed_model(tmp_path: Path, source: str, old: str, new: str) -> Path:
    """A copy of a test model file with its ``@smss.model`` name changed."""
    text = (MODELS / source).read_text()
    assert f'name="{old}"' in text
    path = tmp_path / f"{new.replace('-', '_')}.py"
    path.write_text(text.replace(f'name="{old}"', f'name="{new}"'))
    return path


def smss_cli(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the ``smss`` command line in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "smss.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **SERVER_ENV},
        stdin=subprocess.DEVNULL,
        check=False,
    )
