"""End-to-end fixtures: one shared ``smss serve --demo`` and in-process reference models.

Most tests talk to the one session server (keep-alive 300 s, so instances started
by one test stay warm for the next). Tests that need a server of their own (scale
to zero, restarts, kills, tokens) start it with :func:`e2e_helpers.start` on a data
dir seeded from the session server's demo weights, so no test regenerates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from e2e_helpers import start, stop_checked

from smss.testing.server import ServerProcess

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.http")

Predict = Callable[[np.ndarray], np.ndarray]


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start(tmp_path_factory.mktemp("demo-server"), ["--demo", "--keep-alive", "300"])
    yield server
    stop_checked(server)


@pytest.fixture(scope="session")
def demo_weights(demo_server: ServerProcess) -> Path:
    """The demo weights the session server generated (``<data>/demo``)."""
    return demo_server.data_dir / "demo"


@pytest.fixture(scope="session")
def reference(demo_weights: Path) -> dict[str, Predict]:
    """Each demo model loaded in this process from the server's own artifacts."""
    import torch

    import smss
    from smss.demo import models
    from smss.demo.generate import ensure_artifact

    torch.set_num_threads(1)  # the server's workers share this machine's cores
    demo: dict[str, tuple[type, str, str]] = {
        "mlp": (models.MLP, "x", "y"),
        "cnn": (models.CNN, "image", "logits"),
        "mlp_onnx": (models.MLPOnnx, "x", "y"),
    }
    predictors: dict[str, Predict] = {}
    for name, (cls, in_name, out_name) in demo.items():
        artifact = ensure_artifact(demo_weights, name)
        model = cls()
        model.load(smss.Weights(artifact.weights, artifact.weights_format))

        def predict(x: np.ndarray, model: Any = model, i: str = in_name, o: str = out_name) -> np.ndarray:
            return np.asarray(model.predict({i: x})[o])

        predictors[name] = predict
    return predictors
