"""Workflow and run routes: deploy definitions, start runs, read a run's log, resume, replay."""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss.api import codec
from smss.api.context import AppContext
from smss.api.http import client_of, endpoint, json_response, read_body, require_content_type
from smss.errors import InvalidInput, InvalidSpec, NotFound
from smss.workflow.engine import RunOutcome
from smss.workflow.events import Record, RunSummary
from smss.workflow.spec import WorkflowSpec, decode_workflow, load_yaml

MAX_SPEC_BODY = 1 << 20
SPEC_TYPES = ("application/json", "application/yaml", "application/x-yaml", "text/yaml")


class RunRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    inputs: msgspec.Raw
    session: str | None = None
    wait: bool = True
    timeout_s: float = 300.0
    durable: bool = True


class ReplayRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    stage: str = msgspec.field(name="from")
    wait: bool = True


def outcome_json(outcome: RunOutcome, *, detail: bool = True) -> dict[str, object]:
    """A run's outcome; without ``detail`` (a caller who may not read runs) a failure says
    only that the run failed: its message may quote predict()'s exception text."""
    body: dict[str, object] = {"run_id": outcome.run_id, "status": outcome.status}
    if outcome.outputs is not None:
        body["outputs"] = {k: codec.encode_tensor_json(k, v) for k, v in outcome.outputs.items()}
    if outcome.error is not None:
        hidden = not detail and outcome.status == "failed"
        body["error"] = (
            f"run {outcome.run_id} failed (its log needs the admin token)" if hidden else outcome.error
        )
    return body


def event_json(record: Record) -> dict[str, object]:
    fields = msgspec.to_builtins(record.event)
    assert isinstance(fields, dict)  # structs encode to dicts
    kind = fields.pop("type", type(record.event).__name__)
    return {"seq": record.seq, "type": kind, "ts": record.ts, **fields}


def summary_json(s: RunSummary) -> dict[str, object]:
    return msgspec.to_builtins(s)  # type: ignore[no-any-return]


def routes(ctx: AppContext) -> list[Route]:
    platform, limits = ctx.platform, ctx.settings.limits

    def admin(request: Request) -> None:
        ctx.auth.check(request.headers.get("authorization"), client_of(request))

    def detail(request: Request) -> bool:
        return ctx.auth.is_admin(request.headers.get("authorization"))

    @endpoint
    async def deploy(request: Request) -> Response:
        admin(request)
        kind = require_content_type(request, SPEC_TYPES)
        body = await read_body(request, MAX_SPEC_BODY)
        spec = load_yaml(body.decode("utf-8", "replace")) if "yaml" in kind else decode_workflow(body)
        spec = platform.workflows.deploy(spec)
        return json_response({"name": spec.name, "stages": [s.name for s in spec.stages]}, 201)

    @endpoint
    async def list_workflows(request: Request) -> Response:
        return json_response({"workflows": [msgspec.to_builtins(s) for s in platform.workflows.list()]})

    @endpoint
    async def get_workflow(request: Request) -> Response:
        return json_response(msgspec.to_builtins(platform.workflows.get(request.path_params["name"])))

    @endpoint
    async def delete_workflow(request: Request) -> Response:
        admin(request)
        platform.workflows.delete(request.path_params["name"])
        return json_response({"deleted": request.path_params["name"]})

    @endpoint
    async def start_run(request: Request) -> Response:
        require_content_type(request)
        spec: WorkflowSpec = platform.workflows.get(request.path_params["name"])
        body = await read_body(request, limits.max_body_bytes)
        try:
            req = msgspec.json.decode(body, type=RunRequest)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            raise InvalidInput('body must be {"inputs": [...], "session"?, "wait"?}') from None
        inputs = codec.decode_tensor_list(req.inputs, spec.inputs, limits, None)
        if not req.durable:
            outcome = await platform.engine.run_direct(spec.name, inputs, req.session)
            return json_response(outcome_json(outcome, detail=detail(request)))
        outcome = await platform.engine.submit(
            spec.name,
            inputs,
            session=req.session,
            idempotency_key=request.headers.get("idempotency-key"),
            wait=req.wait,
            timeout_s=min(req.timeout_s, 3600.0),
        )
        answer = outcome_json(outcome, detail=detail(request))
        return json_response(answer, 200 if outcome.status != "running" else 202)

    @endpoint
    async def list_runs(request: Request) -> Response:
        admin(request)  # runs hold outputs, session names and tracebacks
        q = request.query_params
        try:
            limit = min(int(q.get("limit", "100")), 1000)
        except ValueError:
            raise InvalidInput("limit must be an integer") from None
        # Log reads may wait on the store (its busy timeout): never on the event loop.
        runs = await asyncio.to_thread(platform.log.list_runs, q.get("status"), q.get("workflow"), limit)
        return json_response({"runs": [summary_json(s) for s in runs]})

    @endpoint
    async def log_stats(request: Request) -> Response:
        admin(request)
        return json_response(platform.log.stats())

    @endpoint
    async def get_run(request: Request) -> Response:
        admin(request)
        run_id = request.path_params["run_id"]

        def read() -> tuple[RunSummary, list[Record], RunOutcome]:
            summary = platform.log.run_summary(run_id)
            if summary is None:
                raise NotFound(f"unknown run {run_id!r}")
            records = platform.log.read_run(run_id)
            return summary, records, platform.engine.outcome(records)  # outputs read from blobs

        summary, records, outcome = await asyncio.to_thread(read)
        body = outcome_json(outcome)
        body.update(workflow=summary.workflow, session=summary.session, status=summary.status)
        body.setdefault("outputs", None)
        body["events"] = [event_json(r) for r in records]
        return json_response(body)

    @endpoint
    async def resume(request: Request) -> Response:
        admin(request)
        require_content_type(request, optional=True)
        outcome = await platform.engine.resume(request.path_params["run_id"])
        return json_response(outcome_json(outcome), 202)

    @endpoint
    async def replay(request: Request) -> Response:
        admin(request)
        require_content_type(request)
        body = await read_body(request, MAX_SPEC_BODY)
        try:
            req = msgspec.json.decode(body, type=ReplayRequest)
        except (msgspec.ValidationError, msgspec.DecodeError):
            raise InvalidSpec('body must be {"from": "<stage>", "wait"?: bool}') from None
        outcome = await platform.engine.replay_from(request.path_params["run_id"], req.stage, wait=req.wait)
        return json_response(outcome_json(outcome), 200 if outcome.status != "running" else 202)

    return [
        Route("/v1/workflows", list_workflows, methods=["GET"]),
        Route("/v1/workflows", deploy, methods=["POST"]),
        Route("/v1/workflows/{name}", get_workflow, methods=["GET"]),
        Route("/v1/workflows/{name}", delete_workflow, methods=["DELETE"]),
        Route("/v1/workflows/{name}/runs", start_run, methods=["POST"]),
        Route("/v1/runs", list_runs, methods=["GET"]),
        Route("/v1/log/stats", log_stats, methods=["GET"]),
        Route("/v1/runs/{run_id}", get_run, methods=["GET"]),
        Route("/v1/runs/{run_id}/resume", resume, methods=["POST"]),
        Route("/v1/runs/{run_id}/replay", replay, methods=["POST"]),
    ]
