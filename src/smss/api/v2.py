"""Open Inference Protocol v2 routes: health, metadata, readiness, infer, repository.

Compatible with ``tritonclient.http`` and KServe clients: JSON tensors and the
binary tensor data extension (``Inference-Header-Content-Length``).
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss import __version__
from smss.api import codec
from smss.api.context import AppContext
from smss.api.errors import reported, status_of
from smss.api.http import client_of, endpoint, json_response, read_body, require_content_type
from smss.control.controller import FunctionRuntime
from smss.errors import InvalidInput, ModelError, SmssError, Unavailable
from smss.headers import COLD_START, RUN_ID
from smss.spec import FunctionSpec, TensorSpec
from smss.workflow.spec import WorkflowSpec

HEADER_LENGTH = "inference-header-content-length"


def _tensor_meta(t: TensorSpec) -> dict[str, object]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def model_metadata(rt: FunctionRuntime) -> dict[str, object]:
    spec = rt.record.spec
    return spec_metadata(spec, {"torch": "pytorch", "onnx": "onnxruntime", "python": "python"}[spec.runtime])


def spec_metadata(spec: FunctionSpec, platform: str) -> dict[str, object]:
    return {
        "name": spec.name,
        "versions": [spec.version],
        "platform": platform,
        "inputs": [_tensor_meta(t) for t in spec.inputs],
        "outputs": [_tensor_meta(t) for t in spec.outputs],
    }


def routes(ctx: AppContext) -> list[Route]:
    platform, limits, serving = ctx.platform, ctx.settings.limits, ctx.settings.serving

    @endpoint
    async def live(request: Request) -> Response:
        return json_response({"live": True})

    @endpoint
    async def ready(request: Request) -> Response:
        return json_response({"ready": ctx.ready}, 200 if ctx.ready else 503)

    @endpoint
    async def server_metadata(request: Request) -> Response:
        return json_response(
            {"name": "smss", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}
        )

    def runtime_of(request: Request) -> FunctionRuntime:
        return platform.function(request.path_params["name"], request.path_params.get("version"))

    @endpoint
    async def metadata(request: Request) -> Response:
        wf = platform.workflows.find(request.path_params["name"])
        if wf is not None:
            return json_response(spec_metadata(platform.workflows.as_function_spec(wf), "workflow"))
        return json_response(model_metadata(runtime_of(request)))

    @endpoint
    async def model_ready(request: Request) -> Response:
        if platform.workflows.find(request.path_params["name"]) is not None:
            return json_response({"name": request.path_params["name"], "ready": True})
        rt = runtime_of(request)
        d = rt.dispatcher
        ok = bool(d.slots) or d.start_error is None
        return json_response({"name": rt.record.spec.name, "ready": ok}, 200 if ok else 503)

    @endpoint
    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["name"]
        status = "500"
        known = False  # unknown names are not metered: a label per random name would grow without bound
        try:
            wf = platform.workflows.find(name)
            if wf is not None:
                known = True
                response = await infer_workflow(request, wf)
                status = "200"
                return response
            rt = runtime_of(request)
            known = True
            spec = rt.record.spec
            body = await read_body(request, limits.max_body_bytes)
            decoded = codec.decode_request(body, _header_length(request), spec, limits)
            wanted = tuple(o.name for o in decoded.outputs) or tuple(t.name for t in spec.outputs)
            outputs, served = await platform.infer(rt, decoded.inputs, wanted, serving.request_timeout_s)
            payload, headers = codec.encode_response(spec.name, spec.version, decoded.id, outputs, decoded)
            headers[COLD_START] = "1" if served.cold else "0"
            ctx.metrics.request_split(name, served.queued_s, served.instance_s)
            status = "200"
            return Response(payload, 200, headers)
        except ModelError as e:
            status = "500"
            raise reported(e, detail=ctx.auth.proves_admin(request.headers.get("authorization"))) from None
        except SmssError as e:
            status = str(status_of(e))
            raise
        finally:
            if known:
                ctx.metrics.request_done(name, status, time.perf_counter() - started)

    async def infer_workflow(request: Request, wf: WorkflowSpec) -> Response:
        spec = platform.workflows.as_function_spec(wf)
        body = await read_body(request, limits.max_body_bytes)
        decoded = codec.decode_request(body, _header_length(request), spec, limits)
        outcome = await platform.engine.submit(
            wf.name,
            decoded.inputs,
            session=request.headers.get("smss-session"),
            idempotency_key=request.headers.get("idempotency-key"),
            wait=True,
            timeout_s=serving.request_timeout_s,
        )
        if outcome.status != "completed" or outcome.outputs is None:
            raise (ModelError if outcome.status == "failed" else Unavailable)(
                f"workflow run {outcome.run_id} {outcome.status}: {outcome.error or 'not finished in time'}"
            )
        wanted = {o.name for o in decoded.outputs} or set(outcome.outputs)
        outputs = {k: v for k, v in outcome.outputs.items() if k in wanted}
        payload, headers = codec.encode_response(spec.name, spec.version, decoded.id, outputs, decoded)
        headers[RUN_ID] = outcome.run_id
        return Response(payload, 200, headers)

    @endpoint
    async def repository_index(request: Request) -> Response:
        ctx.auth.check(request.headers.get("authorization"), client_of(request))
        require_content_type(request, optional=True)
        out = []
        for st in platform.status():
            state = "READY" if st.instances else ("UNAVAILABLE" if st.last_error else "UNLOADED")
            entry: dict[str, object] = {"name": st.spec.name, "version": st.spec.version, "state": state}
            entry["reason"] = st.last_error or ""
            out.append(entry)
        return json_response(out)

    @endpoint
    async def repository_load(request: Request) -> Response:
        ctx.auth.check(request.headers.get("authorization"), client_of(request))
        require_content_type(request, optional=True)
        platform.controller.load(request.path_params["name"])
        return json_response({})

    @endpoint
    async def repository_unload(request: Request) -> Response:
        ctx.auth.check(request.headers.get("authorization"), client_of(request))
        require_content_type(request, optional=True)
        platform.controller.scale_to_zero(request.path_params["name"])
        return json_response({})

    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/{name}", metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
    ]


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
    if value < 0:
        raise InvalidInput("Inference-Header-Content-Length must not be negative")
    return value
