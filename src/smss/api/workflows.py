"""Workflow and run routes: deploy definitions, start runs, read a run's log, resume, replay."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smss.api import codec
from smss.api import wire as w
from smss.api.context import AppContext
from smss.api.http import client_of, decode_json, endpoint, json_response, read_body, require_content_type
from smss.errors import InvalidInput, NotFound
from smss.workflow.engine import RunOutcome
from smss.workflow.events import Record, RunSummary
from smss.workflow.spec import WorkflowSpec, decode_workflow, load_yaml

MAX_SPEC_BODY = 1 << 20
SPEC_TYPES = ("application/json", "application/yaml", "application/x-yaml", "text/yaml")


def _outputs(outcome: RunOutcome) -> dict[str, w.TensorJson] | None:
    if outcome.outputs is None:
        return None
    return {k: codec.encode_tensor_json(k, v) for k, v in outcome.outputs.items()}


def outcome_json(outcome: RunOutcome, *, detail: bool = True) -> w.RunOutcomeJson:
    """A run's outcome; without ``detail`` (a caller who may not read runs) a failure says
    only that the run failed: its message may quote predict()'s exception text."""
    body = w.RunOutcomeJson(run_id=outcome.run_id, status=outcome.status)
    outputs = _outputs(outcome)
    if outputs is not None:
        body["outputs"] = outputs
    if outcome.error is not None:
        hidden = not detail and outcome.status == "failed"
        body["error"] = (
            f"run {outcome.run_id} failed (its log needs the admin token)" if hidden else outcome.error
        )
    return body


def event_json(record: Record) -> dict[str, Any]:
    fields = msgspec.to_builtins(record.event)
    assert isinstance(fields, dict)  # structs encode to dicts
    kind = fields.pop("type", type(record.event).__name__)
    return {"seq": record.seq, "type": kind, "ts": record.ts, **fields}


def runs_query(params: Mapping[str, str]) -> w.RunsQuery:
    try:
        return msgspec.convert(dict(params), w.RunsQuery, strict=False)
    except msgspec.ValidationError as e:
        raise InvalidInput(f"invalid query: {e}") from None


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
        return json_response(w.WorkflowDeployed(name=spec.name, stages=[s.name for s in spec.stages]), 201)

    @endpoint
    async def list_workflows(request: Request) -> Response:
        return json_response(w.WorkflowList(workflows=list(platform.workflows.list())))

    @endpoint
    async def get_workflow(request: Request) -> Response:
        return json_response(platform.workflows.get(request.path_params["name"]))

    @endpoint
    async def delete_workflow(request: Request) -> Response:
        admin(request)
        platform.workflows.delete(request.path_params["name"])
        return json_response(w.Deleted(deleted=request.path_params["name"]))

    @endpoint
    async def start_run(request: Request) -> Response:
        require_content_type(request)
        spec: WorkflowSpec = platform.workflows.get(request.path_params["name"])
        body = await read_body(request, limits.max_body_bytes)
        req = decode_json(body, w.RunRequest)
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
        q = runs_query(request.query_params)
        # Log reads may wait on the store (its busy timeout): never on the event loop.
        runs = await asyncio.to_thread(platform.log.list_runs, q.status, q.workflow, q.limit)
        return json_response(w.RunList(runs=runs))

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
        body = w.RunDetail(
            run_id=outcome.run_id,
            status=summary.status,
            outputs=_outputs(outcome),
            workflow=summary.workflow,
            session=summary.session,
            events=[event_json(r) for r in records],
        )
        if outcome.error is not None:
            body["error"] = outcome.error
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
        req = decode_json(body, w.ReplayRequest)
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
