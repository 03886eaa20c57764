"""The gRPC server: grpcio's asyncio server in the gateway's own process and event loop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from smss.api.context import AppContext
from smss.api.grpc_api.service import InferenceService
from smss.errors import InvalidSpec

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def serving(ctx: AppContext, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``inference.GRPCInferenceService`` on ``host:port`` until the block ends;
    yields the bound port. On the way out in-flight calls get the drain grace."""
    limits = ctx.settings.limits
    server = grpc.aio.server(
        options=[
            # The REST body limit, so a message too large is refused (RESOURCE_EXHAUSTED)
            # by grpc before it is buffered; answers are as large as the model makes them.
            ("grpc.max_receive_message_length", limits.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(ctx), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise InvalidSpec(f"cannot bind the gRPC port {address} (in use?)")
    await server.start()
    log.info("gRPC serving on %s", address)
    print(f"smss serving gRPC on {host}:{bound}", flush=True)
    try:
        yield bound
    finally:
        await server.stop(ctx.settings.serving.drain_grace_s)
