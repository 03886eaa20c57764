"""``smss.Client`` and ``smss.AsyncClient`` on every demo model, binary and JSON tensors."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from e2e_helpers import REQUEST_TIMEOUT_S
from test_inference import MODELS, assert_close, sample

import smss
from smss.testing.server import ServerProcess


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", list(MODELS))
def test_clients_match_the_in_process_model(
    demo_server: ServerProcess, reference: dict[str, Any], model: str, binary: bool
) -> None:
    in_name, _, out_name, tol = MODELS[model]
    x = sample(model, 3, seed=21)
    with smss.Client(demo_server.url, timeout=REQUEST_TIMEOUT_S) as client:
        got = client.infer(model, {in_name: x}, outputs=[out_name], binary=binary, timeout_s=30)
    assert list(got) == [out_name]
    assert_close(got[out_name], reference[model](x), tol)

    async def main() -> dict[str, np.ndarray]:
        async with smss.AsyncClient(demo_server.url, timeout=REQUEST_TIMEOUT_S) as client:
            assert await client.ready()
            assert (await client.model_metadata(model))["name"] == model
            return await client.infer(model, {in_name: x}, binary=binary)

    assert_close(asyncio.run(main())[out_name], reference[model](x), tol)


def test_client_errors_are_the_servers_types(demo_server: ServerProcess) -> None:
    with smss.Client(demo_server.url, timeout=REQUEST_TIMEOUT_S) as client:
        with pytest.raises(smss.errors.NotFound):
            client.infer("nope", {"x": np.zeros((1, 64), np.float32)})
        with pytest.raises(smss.errors.InvalidInput, match="'x'"):
            client.infer("mlp", {"x": np.zeros((1, 63), np.float32)})
        with pytest.raises(smss.errors.InvalidInput, match="x-request-timeout-seconds"):
            client.infer("mlp", {"x": np.zeros((1, 64), np.float32)}, timeout_s=-1)
