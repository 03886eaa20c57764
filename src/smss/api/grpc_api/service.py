"""``inference.GRPCInferenceService`` of the Open Inference Protocol, as tritonclient.grpc calls it.

Health, metadata (and Triton's ``ModelConfig``), ``ModelInfer`` and the repository RPCs; every handler asks
the application facade (:class:`smss.app.platform.Platform`) what the REST
routes ask it, with the same limits, timeouts, token and metrics. Errors
become status codes through :func:`smss.api.errors.grpc_status_of` (overload
and unavailability also carry ``retry-after`` trailing metadata); an
unexpected exception is logged and answered ``INTERNAL`` with a generic
message. RPCs not implemented here (shared memory, statistics, streaming,
trace and log settings) answer ``UNIMPLEMENTED`` from the generated base.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import msgspec
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from smss import __version__
from smss.api import deadlines
from smss.api.context import AppContext
from smss.api.errors import grpc_status_of, reported, retry_after_of, status_of
from smss.api.grpc_api import tensors
from smss.api.grpc_api.model_config import model_config
from smss.errors import ModelError, SmssError

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]

EXTENSIONS = ("model_repository",)


def answered(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn every exception a handler raises into its gRPC status (the one error map)."""

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await handler(self, request, context)
        except SmssError as error:
            retry_after = retry_after_of(error)
            if retry_after is not None:
                context.set_trailing_metadata((("retry-after", str(retry_after)),))
            await context.abort(grpc.StatusCode[grpc_status_of(error)], error.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error while handling %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        raise AssertionError("unreachable: abort raises")

    return wrapped


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    """``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``: the client address auth rate-limits by."""
    peer = context.peer() or "unknown"
    _, _, rest = peer.partition(":")
    host, _, _ = (rest or peer).rpartition(":")
    return host or peer


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, ctx: AppContext) -> None:
        self._ctx = ctx
        self._platform = ctx.platform

    def _check_token(self, context: grpc.aio.ServicerContext) -> None:
        self._ctx.auth.check(_metadata(context, "authorization"), _peer_host(context))

    @answered
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @answered
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ctx.ready)

    @answered
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="smss", version=__version__, extensions=EXTENSIONS)

    @answered
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._platform.model_ready(request.name, request.version or None))

    @answered
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        described = self._platform.describe(request.name, request.version or None)
        spec = described.spec
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=[spec.version],
            platform=described.platform,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec.outputs],
        )

    @answered
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        described = self._platform.describe(request.name, request.version or None)
        return pb.ModelConfigResponse(config=model_config(described.spec, described.platform))

    @answered
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        started = time.perf_counter()
        name, version = request.model_name, request.model_version or None
        status, known = "500", False  # unknown names are not metered (as over REST)
        try:
            timeout_s = deadlines.from_remaining(
                context.time_remaining(), self._ctx.settings.serving.request_timeout_s
            )
            spec = self._platform.describe(name, version).spec
            known = True
            inputs, outputs = tensors.decode_request(request, spec, self._ctx.settings.limits)
            answer = await self._platform.infer_named(
                name,
                version,
                inputs,
                outputs,
                timeout_s,
                session=_metadata(context, "smss-session"),
                idempotency_key=_metadata(context, "idempotency-key"),
                retry_after_s=self._ctx.settings.serving.retry_after_s,
            )
            if answer.version is not None:  # the version drawn under a canary split
                spec = msgspec.structs.replace(spec, version=answer.version)
            response = tensors.encode_response(spec, request.id, answer.outputs)
            status = "200"
            return response
        except ModelError as error:  # predict()'s text only for the admin, as over REST
            status = "500"
            detail = self._ctx.auth.proves_admin(_metadata(context, "authorization"))
            raise reported(error, detail=detail) from None
        except SmssError as error:
            status = str(status_of(error))
            raise
        finally:
            if known:
                self._ctx.metrics.request_done(name, status, time.perf_counter() - started)

    @answered
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        self._check_token(context)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=m.name, version=m.version, state=m.state, reason=m.reason)
                for m in self._platform.repository_index()
                if not request.ready or m.state == "READY"
            ]
        )

    @answered
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._check_token(context)
        self._platform.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @answered
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_token(context)
        self._platform.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
