"""A full ``/dev/shm`` (RELIABILITY 21), for real: ``smss serve`` runs in a mount
namespace of its own whose ``/dev/shm`` is a 1 MiB tmpfs, and a model's weights are
4 MiB. The weight store reserves a segment's space with ``posix_fallocate`` before it
writes through a mapping, so the start fails with a clear 503 naming the model and
the shortage, never a SIGBUS: the server and the other models serve on, and a
redeploy with weights that fit is served.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from smss.client import Client
from smss.testing.server import start_server, wait_until

pytestmark = pytest.mark.slow

MODELS = Path(__file__).parent / "models"
ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}
SHM_BYTES = 1 << 20
#: A private mount namespace with a small tmpfs on /dev/shm, then the server's command.
SMALL_SHM = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    f'mount -t tmpfs -o size={SHM_BYTES} smss-test-shm /dev/shm && exec "$@"',
    "sh",
]
REQUEST_TIMEOUT_S = 120.0


def can_mount_a_small_shm() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    done = subprocess.run([*SMALL_SHM, "true"], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


@pytest.fixture
def small_shm() -> list[str]:
    if not can_mount_a_small_shm():
        message = "needs root and unshare(1) to mount a small /dev/shm in a mount namespace"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SMALL_SHM


def weights(path: Path, pad_bytes: int) -> Path:
    from safetensors.numpy import save_file

    tensors = {"w": np.array([3.0, 5.0], dtype=np.float32)}
    if pad_bytes:
        tensors["pad"] = np.zeros(pad_bytes // 4, dtype=np.float32)
    save_file(tensors, str(path))
    return path


def infer(url: str, name: str, x: list[float]) -> httpx.Response:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(x)], "data": x}]}
    return httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=REQUEST_TIMEOUT_S)


def test_weights_larger_than_shm_fail_the_start_cleanly(tmp_path: Path, small_shm: list[str]) -> None:
    server = start_server(
        tmp_path / "data", ["--keep-alive", "300", "--max-start-failures", "2"], env=ENV, wrapper=small_shm
    )
    try:
        with Client(server.url) as client:
            client.deploy(f"{MODELS / 'sleeper.py'}:Sleeper")
            client.deploy(
                f"{MODELS / 'weighted.py'}:Weighted", weights(tmp_path / "big.safetensors", 4 << 20)
            )
        r = infer(server.url, "weighted", [1.0, 1.0])
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()
        assert error["code"] == "start_failed", error
        assert "weighted" in error["error"], error
        assert "shared memory" in error["error"], error
        assert "/" not in error["error"], error  # no paths
        # The server did not die of a SIGBUS, nor did the other model.
        assert server.process.poll() is None
        ok = infer(server.url, "sleeper", [0.0, 1.0])
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"][0]["data"] == [0.0, 2.0]
        assert "SIGBUS" not in server.log()
        # Nothing of the refused segment is left in the server's /dev/shm (seen through
        # its mount namespace), and weights that fit are loaded and served.
        shm = Path(f"/proc/{server.process.pid}/root/dev/shm")
        assert [n for n in os.listdir(shm) if "weighted" in n] == []
        with Client(server.url) as client:
            client.deploy(f"{MODELS / 'weighted.py'}:Weighted", weights(tmp_path / "small.safetensors", 0))
        wait_until(
            lambda: infer(server.url, "weighted", [1.0, 1.0]).status_code == 200,
            60,
            "weights that fit to serve",
        )
        assert infer(server.url, "weighted", [1.0, 1.0]).json()["outputs"][0]["data"] == [3.0, 5.0]
        assert [n for n in os.listdir(shm) if "weighted" in n], (
            "the listing above was not the server's /dev/shm"
        )
    finally:
        assert server.stop() == 0, server.log()[-4000:]
