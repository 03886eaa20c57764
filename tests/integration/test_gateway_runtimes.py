"""The gateway never imports a model runtime: ``smss serve --demo`` generates the demo's
weights in a process of its own and deploys them, and after the demo models served a
request each (torch and ONNX), the server process maps neither torch nor
onnxruntime: the runtimes live in the zygotes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smss.client import Client
from smss.testing.server import running_server

pytestmark = pytest.mark.slow

RUNTIME_LIBRARIES = ("libtorch", "onnxruntime")


def test_the_gateway_maps_no_model_runtime(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", ["--demo", "--log-level", "warning"]) as server:
        with Client(server.url) as client:
            for name in ("mlp", "mlp_onnx"):
                server.wait_for_model(name)
                out = client.infer(name, {"x": np.zeros((1, 64), np.float32)})
                assert out["y"].shape == (1, 10)
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        loaded = {lib for lib in RUNTIME_LIBRARIES if lib in maps}
        assert not loaded, f"the gateway maps {sorted(loaded)}"
        assert (tmp_path / "data" / "demo" / "mlp.safetensors").is_file()  # generated meanwhile
