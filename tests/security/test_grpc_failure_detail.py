"""Over gRPC as over REST: a predict() that raises shows its text only to a caller with
the admin token; everyone else gets "model error" and a request id (INTERNAL)."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("CI") == "true":  # in CI a missing gRPC stack fails, it does not skip
    import tritonclient.grpc as tritongrpc
else:
    tritongrpc = pytest.importorskip("tritonclient.grpc")
from models.failing import SECRET
from security_helpers import TOKEN, Server
from tritonclient.utils import InferenceServerException


def failing_call(server: Server, headers: dict[str, str] | None) -> InferenceServerException:
    assert server.process.grpc_address is not None
    client = tritongrpc.InferenceServerClient(server.process.grpc_address)
    try:
        tensor = tritongrpc.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("failing", [tensor], headers=headers, client_timeout=120)
        return caught.value
    finally:
        client.close()


@pytest.mark.parametrize(
    ("which", "headers"),
    [("open", None), ("token", None), ("token", {"authorization": "Bearer wrong"})],
    ids=["no-token-configured", "without-token", "wrong-token"],
)
def test_predict_failures_carry_no_detail_without_the_token(
    open_server: Server, token_server: Server, which: str, headers: dict[str, str] | None
) -> None:
    error = failing_call(open_server if which == "open" else token_server, headers)
    assert error.status() == "StatusCode.INTERNAL"
    assert "model error (request id" in error.message()
    assert SECRET not in error.message()
    assert "/srv/" not in error.message()


def test_the_admin_sees_the_failure_over_grpc(token_server: Server) -> None:
    error = failing_call(token_server, {"authorization": f"Bearer {TOKEN}"})
    assert error.status() == "StatusCode.INTERNAL"
    assert SECRET in error.message()
