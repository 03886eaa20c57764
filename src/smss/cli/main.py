"""The ``smss`` command line: the composition root for every entry point.

``smss serve`` runs a platform; every other command reaches a running one by
``--url`` (default ``$SMSS_URL``, else http://127.0.0.1:8000).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import msgspec
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from smss import config
from smss.client import Client
from smss.errors import InvalidSpec, SmssError
from smss.spec import DATATYPES

app = typer.Typer(no_args_is_help=True, add_completion=False, help="SMSS: serverless model serving.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; each prints one JSON object.")
app.add_typer(bench_app, name="bench")
runs_app = typer.Typer(no_args_is_help=True, help="Workflow runs: list, show, resume, replay.")
app.add_typer(runs_app, name="runs")
traces_app = typer.Typer(no_args_is_help=True, help="Invocation traces for simulate and bench replay.")
app.add_typer(traces_app, name="traces")
console = Console()
#: Errors go to stderr, so that stdout holds only a command's output (``--json``).
err_console = Console(stderr=True)

DEFAULT_GRPC_PORT = 8001
Url = Annotated[str | None, typer.Option("--url", help="Platform URL [default: $SMSS_URL or :8000]")]
Token = Annotated[str | None, typer.Option("--token", help="Admin token [default: $SMSS_TOKEN]")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON")]


def _client(url: str | None, token: str | None) -> Client:
    return Client(url or config.env_url(), token or config.env_token())


def _error(message: object) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)


def _print_json(data: object) -> None:
    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            help="gRPC (Open Inference Protocol) port; 0: none "
            "[default: 8001 with the grpc extra installed, else none]"
        ),
    ] = None,
    request_timeout: Annotated[
        float,
        typer.Option(help="Longest a request may take, s (x-request-timeout-seconds asks for less)"),
    ] = 60.0,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory [default: ~/.smss]")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Deploy the demo models")] = False,
    token: Token = None,
    keep_alive: Annotated[
        float | None,
        typer.Option(help="Seconds an idle instance stays up [default: $SMSS_KEEP_ALIVE_S or 300]"),
    ] = None,
    weight_cache: Annotated[
        str | None, typer.Option(help="Weight store budget per node, e.g. 4G [default: RAM/4]")
    ] = None,
    start_mode: Annotated[str, typer.Option(help="fork (zygote, fast) or exec (new interpreter)")] = "fork",
    spares: Annotated[
        bool, typer.Option(help="Each model template keeps a forked, rehearsed spare instance")
    ] = True,
    keep_alive_policy: Annotated[
        str | None,
        typer.Option(help="fixed:SECONDS, hybrid or tiered[:key=value,...] [default: fixed:--keep-alive]"),
    ] = None,
    latency_objective_ms: Annotated[
        float,
        typer.Option(help="Latency a start may add at --latency-percentile (kept by the tiered policy)"),
    ] = 10.0,
    latency_percentile: Annotated[float, typer.Option(help="Percentile of --latency-objective-ms")] = 99.0,
    prices: Annotated[Path | None, typer.Option(help="TOML price table for `smss cost`")] = None,
    cpus: Annotated[
        float | None,
        typer.Option(help="Cores the platform may place on [default: the machine's, see `smss devices`]"),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(
            help="Host memory the platform may place, e.g. 8GiB [default: the machine's less 512 MiB + 5 %]"
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(help="A Host name clients may use besides loopback and --host (repeatable)"),
    ] = None,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a client may take to send a request's headers")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option(help="Seconds a request body may stall before the client is closed")
    ] = 60.0,
    adopt_window: Annotated[
        float,
        typer.Option(
            help="Seconds instances outlive a killed server, waiting for the next one on this "
            "data dir to adopt them (0: they die with it)"
        ),
    ] = 30.0,
    max_start_failures: Annotated[
        int,
        typer.Option(
            help="Failed starts in a row (retried with back-off) before a function is failed "
            "until it is loaded or deployed again"
        ),
    ] = 6,
    drain_timeout: Annotated[
        float,
        typer.Option(
            help="On SIGTERM, seconds the requests in flight (and then each instance) get to finish"
        ),
    ] = 10.0,
    queue_limit: Annotated[
        int,
        typer.Option(help="Requests a function holds waiting for an instance; past it: 429 with Retry-After"),
    ] = 256,
    max_connections: Annotated[
        int,
        typer.Option(help="Client connections held at once; past it new ones get 503 with Retry-After"),
    ] = 1024,
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
    log_retention: Annotated[
        float | None,
        typer.Option(
            help="Seconds a finished run stays in the workflow log before compaction removes it "
            "(inf: never) [default: 7 days]"
        ),
    ] = None,
    allow_faults: Annotated[
        bool,
        typer.Option(
            "--allow-faults", help="Tests only: switch on the fault points named in $SMSS_FAULT", hidden=True
        ),
    ] = False,
) -> None:
    """Run the platform: gateway, controller and a local node. SIGTERM drains it:
    no new connections, the requests in flight finish, instances stop, exit 0."""
    from smss.compose import build, run

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    settings = config.Settings(
        host=host,
        port=port,
        grpc_port=_grpc_port(grpc_port),
        data_dir=data_dir or Path.home() / ".smss",
        token=token or config.env_token(),
        allowed_hosts=tuple(allow_host or ()),
        demo=demo,
        log_level=log_level,
        serving=config.ServingSettings(
            keep_alive_s=keep_alive if keep_alive is not None else (config.env_keep_alive() or 300.0),
            request_timeout_s=request_timeout,
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            drain_grace_s=drain_timeout,
            max_start_failures=max_start_failures,
            queue_limit=queue_limit,
            max_connections=max_connections,
        ),
        start_mode=start_mode,
        spares=spares,
        adopt_window_s=adopt_window,
        keep_alive_policy=keep_alive_policy,
        latency_objective_ms=latency_objective_ms,
        latency_percentile=latency_percentile,
        prices_path=prices,
        cpus=cpus,
        cuda_visible_devices=config.env_cuda_visible_devices(),
        faults=config.env_faults(),
        allow_faults=allow_faults,
    )
    try:
        if weight_cache is not None:
            settings = dataclasses.replace(settings, weight_cache_bytes=config.parse_size(weight_cache))
        if memory is not None:
            settings = dataclasses.replace(settings, memory_mb=config.parse_size(memory) // 2**20)
        if log_retention is not None:
            workflows = dataclasses.replace(settings.workflows, log_retention_s=log_retention)
            settings = dataclasses.replace(settings, workflows=workflows)
        ctx = build(settings)
    except InvalidSpec as e:  # a setting it cannot honour (a cap above the machine's, a bad size)
        _error(e)
        raise typer.Exit(2) from None
    except SmssError as e:  # the platform cannot start (a damaged log, a store it cannot open)
        _error(e)
        raise typer.Exit(1) from None
    run(ctx)


def _listed(array: np.ndarray) -> Any:
    """An output as nested lists for JSON: BYTES elements as text (undecodable bytes escaped)."""
    if array.dtype == object:
        return np.vectorize(lambda b: b.decode(errors="backslashreplace"), otypes=[object])(array).tolist()
    return array.tolist()


def _grpc_port(asked: int | None) -> int:
    """The gRPC port to serve: as asked, or 8001 when the grpc extra is installed."""
    import importlib.util

    installed = all(importlib.util.find_spec(m) is not None for m in ("grpc", "tritonclient"))
    installed = installed and importlib.util.find_spec("tritonclient.grpc") is not None
    if asked is None:
        if not installed:
            logging.getLogger(__name__).warning("no gRPC port: install smss[grpc] to serve one")
        return DEFAULT_GRPC_PORT if installed else 0
    if asked and not installed:
        _error(InvalidSpec("--grpc-port needs the grpc extra: pip install 'smss[grpc]'"))
        raise typer.Exit(2)
    return asked


@app.command()
def deploy(
    target: Annotated[str, typer.Argument(help="FILE.py:ClassName")],
    weights: Annotated[Path | None, typer.Option(help="Weights (.safetensors or .onnx)")] = None,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Deploy (or replace) a model (FILE.py:Class) or a workflow (FILE.yaml, or FILE.py:var
    holding a smss.Workflow)."""
    with _client(url, token) as client:
        if _is_workflow(target):
            result = client.deploy_workflow(Path(target))
            if as_json:
                _print_json(result)
            else:
                console.print(f"deployed workflow {result['name']} (stages: {', '.join(result['stages'])})")
            return
        result = client.deploy(target, weights)
    if as_json:
        _print_json(result)
    else:
        console.print(
            f"deployed {result['name']} (version {result['version']}, generation {result['generation']})"
        )


def _is_workflow(target: str) -> bool:
    if target.endswith((".yaml", ".yml")):
        return True
    from smss.packaging import load_attribute
    from smss.workflow.builder import Workflow
    from smss.workflow.spec import WorkflowSpec

    _, obj = load_attribute(target)
    return isinstance(obj, Workflow | WorkflowSpec)


@app.command()
def functions(url: Url = None, as_json: AsJson = False) -> None:
    """List deployed functions."""
    with _client(url, None) as client:
        items = client.functions()
    if as_json:
        _print_json(items)
        return
    table = Table("name", "version", "runtime", "instances", "cold starts", "last error")
    for f in items:
        table.add_row(
            f["name"],
            f["version"],
            f["runtime"],
            str(len(f["instances"])),
            str(f["cold_starts"]),
            f["last_error"] or "",
        )
    console.print(table)


@app.command()
def delete(name: str, url: Url = None, token: Token = None) -> None:
    """Delete a function and stop its instances."""
    with _client(url, token) as client:
        client.delete(name)
    console.print(f"deleted {name}")


@app.command()
def status(url: Url = None, as_json: AsJson = False) -> None:
    """Functions, their instances and their state."""
    with _client(url, None) as client:
        items = client.functions()
    if as_json:
        _print_json(items)
        return
    table = Table("function", "tier", "instance", "node", "pid", "state", "in flight", "served")
    for f in items:
        tier = f.get("tier") or "-"
        if not f["instances"]:
            state = f"starting ({f['starting']})" if f["starting"] else "scaled to zero"
            if f["state"] == "failed":  # no more starts are tried until it is loaded again
                state = f"failed: {f['last_error']}"
            elif f["last_error"]:
                state = f"retrying: {f['last_error']}"
            table.add_row(f["name"], tier, "-", "-", "-", state, str(f["queued"]), "-")
        for i in f["instances"]:
            table.add_row(
                f["name"],
                tier,
                i["id"],
                i["node"],
                str(i["pid"]),
                i["state"],
                str(i["in_flight"]),
                str(i["served"]),
            )
    console.print(table)
    with _client(url, None) as client:
        stores = client.get("/v1/weights")
    store_table = Table(
        "node", "models", "resident", "budget", "hits", "misses", "evictions", title="weight store"
    )
    for node, st in stores.items():
        store_table.add_row(
            node,
            ", ".join(st["models"]) or "-",
            f"{st['bytes'] / 2**20:.1f} MiB",
            f"{st['budget_bytes'] / 2**20:.0f} MiB",
            str(st["hits"]),
            str(st["misses"]),
            str(st["evictions"]),
        )
    console.print(store_table)
    with _client(url, None) as client:
        reports = client.devices()
    console.print(_devices_table(reports, title="devices"))


@app.command()
def devices(url: Url = None, as_json: AsJson = False) -> None:
    """Each node's devices: capacity, allocated, free and what is placed there."""
    with _client(url, None) as client:
        reports = client.devices()
    if as_json:
        _print_json(reports)
        return
    console.print(_devices_table(reports))


def _devices_table(reports: list[dict[str, Any]], title: str | None = None) -> Table:
    from smss.cli.tables import devices_table
    from smss.inventory import DeviceReport

    return devices_table(msgspec.convert(reports, list[DeviceReport]), title=title)


@app.command()
def invoke(
    name: str,
    inputs: Annotated[
        str, typer.Argument(help="JSON object of input name -> nested list, e.g. '{\"x\": [[0.1, ...]]}'")
    ],
    url: Url = None,
    as_json: AsJson = False,
) -> None:
    """Call a function once with JSON inputs."""
    with _client(url, None) as client:
        meta = client.get(f"/v2/models/{name}")
        dtypes = {i["name"]: DATATYPES[i["datatype"]] for i in meta["inputs"]}
        raw: dict[str, Any] = json.loads(inputs)
        arrays = {k: np.asarray(v, dtype=dtypes.get(k)) for k, v in raw.items()}
        outputs = client.infer(name, arrays)
    result = {k: _listed(v) for k, v in outputs.items()}
    if as_json:
        _print_json(result)
    else:
        for k, v in outputs.items():
            console.print(f"{k} {list(v.shape)} {v.dtype}:\n{v}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def simulate(ctx: typer.Context) -> None:
    """Replay a trace through the real autoscaler, keep-alive and router on a virtual clock.

    Usage: smss simulate TRACE.csv [--policy tiered|fixed:600|hybrid] [--latency-objective-ms 10]
    [--tiers standby_ms=3,...] [--memory-mb N] [--concurrency N] [--tick-s S] [--prices FILE] [--json]
    """
    from smss.sim.cli import main as simulate_main

    raise typer.Exit(simulate_main(list(ctx.args)))


@app.command()
def cost(url: Url = None, as_json: AsJson = False) -> None:
    """Cost per function and in total since metering began: instances, standby (templates, spares,
    weights kept resident) and a share of the overhead (zygotes, the platform's processes), beside
    always-on containers for the peak. The ratio counts instances and standby."""
    with _client(url, None) as client:
        rep = client.get("/v1/cost")
    if as_json:
        _print_json(rep)
        return
    table = Table(
        "function",
        "invocations",
        "alive s",
        "busy s",
        "GB-s",
        "instances $",
        "standby GB-s",
        "standby $",
        "cost $",
        "overhead $",
        "containers",
        "container $",
        "ratio",
    )
    rows = [*rep["functions"].items(), ("TOTAL", rep["total"])]
    for name, f in rows:
        ratio = f.get("cost_ratio")
        table.add_row(
            name,
            str(f["invocations"]),
            f"{f['alive_s']:.1f}",
            f"{f['busy_s']:.1f}",
            f"{f['memory_gb_s']:.2f}",
            f"{f.get('instance_usd', 0.0):.6f}",
            f"{f.get('standby_gb_s', 0.0):.2f}",
            f"{f.get('standby_usd', 0.0):.6f}",
            f"{f['cost_usd']:.6f}",
            f"{f.get('overhead_usd', 0.0):.6f}",
            str(f["containers"]),
            f"{f['container_cost_usd']:.6f}",
            "-" if ratio is None else f"{ratio:.3f}",
        )
    console.print(f"period {rep['period_s']:.0f} s")
    console.print(table)


@runs_app.command("list")
def runs_list(
    status: Annotated[str | None, typer.Option(help="running | completed | failed | parked")] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow")] = None,
    limit: Annotated[int, typer.Option(help="Most recent N")] = 50,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Recent runs, newest first."""
    params = "&".join(f"{k}={v}" for k, v in (("status", status), ("workflow", workflow)) if v)
    with _client(url, token) as client:
        runs = client.get(f"/v1/runs?limit={limit}&{params}")["runs"]
    if as_json:
        _print_json(runs)
        return
    table = Table("run", "workflow", "session", "status", "created", "updated")
    for r in runs:
        table.add_row(
            r["run_id"], r["workflow"], r["session"] or "-", r["status"], _ts(r["created"]), _ts(r["updated"])
        )
    console.print(table)


@runs_app.command("show")
def runs_show(run_id: str, url: Url = None, token: Token = None, as_json: AsJson = False) -> None:
    """A run's timeline: every event, per-stage durations, and where and why it failed."""
    from smss.cli.timeline import render_run

    with _client(url, token) as client:
        run = client.get(f"/v1/runs/{run_id}")
    if as_json:
        _print_json(run)
        return
    render_run(console, run)


@runs_app.command("resume")
def runs_resume(run_id: str, url: Url = None, token: Token = None) -> None:
    """Resume a failed (or orphaned) run: completed stages are kept, the rest run again."""
    with _client(url, token) as client:
        result = client.post(f"/v1/runs/{run_id}/resume")
    console.print(f"run {result['run_id']}: {result['status']}")


@runs_app.command("replay")
def runs_replay(
    run_id: str,
    from_stage: Annotated[str, typer.Option("--from", help="Re-execute from this stage")],
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Re-execute a run from a stage with its logged inputs, as a new run."""
    with _client(url, token) as client:
        result = client.post(f"/v1/runs/{run_id}/replay", {"from": from_stage, "wait": True})
    if as_json:
        _print_json(result)
    else:
        console.print(f"new run {result['run_id']}: {result['status']}")


def _ts(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


@bench_app.command("overhead")
def bench_overhead(
    as_json: AsJson = True,
    requests: Annotated[int, typer.Option(help="Requests per concurrency level")] = 2000,
) -> None:
    """Platform overhead over an in-process predict() for the mlp model."""
    from smss.bench.overhead import run

    _print_json(run(requests=requests))


@bench_app.command("load")
def bench_load(
    as_json: AsJson = True,
    duration: Annotated[float, typer.Option(help="Seconds of the steady phase at 70% of the knee")] = 120.0,
    step: Annotated[float, typer.Option(help="Seconds of each step of the saturation sweep")] = 15.0,
    target: Annotated[
        list[str] | None, typer.Option(help="mlp and/or behavior (repeatable; default both)")
    ] = None,
    p99_limit_ms: Annotated[float, typer.Option(help="A sweep step above this p99 is past the knee")] = 500.0,
) -> None:
    """Open-loop load (coordinated omission corrected): saturation sweep, knee, steady state at 70%."""
    from smss.bench.load import TARGETS, run

    targets = tuple(target or ("mlp", "behavior"))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        _error(f"unknown --target {', '.join(unknown)}; choose from {', '.join(sorted(TARGETS))}")
        raise typer.Exit(2)
    _print_json(run(duration_s=duration, step_s=step, targets=targets, p99_limit_ms=p99_limit_ms))


@bench_app.command("soak")
def bench_soak(
    as_json: AsJson = True,
    minutes: Annotated[float, typer.Option(help="How long to churn")] = 5.0,
) -> None:
    """Churn (scale to zero, cancelled requests, reloads); memory, fds, threads, segments, log per cycle."""
    from smss.bench.soak import run

    _print_json(run(minutes=minutes))


@bench_app.command("cold-start")
def bench_cold_start(as_json: AsJson = True) -> None:
    """Cold start of cnn and cnn_large: container-style vs fork-and-attach (one JSON object per model)."""
    from smss.bench.coldstart import run

    for row in run():
        _print_json(row)


@bench_app.command("workflow")
def bench_workflow(
    as_json: AsJson = True,
    runs: Annotated[int, typer.Option(help="Runs per sequential measurement")] = 200,
) -> None:
    """The behavior pipeline with the durable log vs direct stage calls, and recovery after kill -9."""
    from smss.bench.workflow import run

    _print_json(run(runs=runs))


@bench_app.command("replay")
def bench_replay(
    trace: Annotated[Path, typer.Argument(help="CSV trace: t_ms,function,duration_ms[,cluster]")],
    speedup: Annotated[
        float, typer.Option(help="Replay K times faster (times, durations, windows / K)")
    ] = 10.0,
    policy: Annotated[
        str, typer.Option(help="Keep-alive policy: tiered[:k=v,...], fixed:SECONDS or hybrid[:k=v,...]")
    ] = "tiered",
    latency_objective_ms: Annotated[
        float, typer.Option(help="Latency a start may add at the 99th percentile (the tiered policy)")
    ] = 10.0,
    memory_mb: Annotated[int, typer.Option(help="Declared memory of each instance (MiB)")] = 512,
    max_instances: Annotated[int, typer.Option(help="Instances per function at most")] = 8,
    default_ttl_s: Annotated[
        float, typer.Option(help="fixed's / hybrid's fallback TTL before scaling")
    ] = 600.0,
    cpu: Annotated[float, typer.Option(help="Declared cores of each instance (placed on the node)")] = 0.1,
    work: Annotated[
        str, typer.Option(help="How a function spends each request's duration: sleep, or spin on a core")
    ] = "sleep",
    as_json: AsJson = True,
) -> None:
    """Replay a trace open loop against a live platform, beside `smss simulate` on the same settings."""
    from smss.bench.replay import run

    _print_json(
        run(
            trace,
            speedup=speedup,
            policy=policy,
            memory_mb=memory_mb,
            max_instances=max_instances,
            default_ttl_s=default_ttl_s,
            cpu=cpu,
            work=work,
            latency_objective_ms=latency_objective_ms,
        )
    )


@traces_app.command("import-orcbench")
def traces_import_orcbench(
    raw: Annotated[Path, typer.Argument(help="A trace written by `orcbench trace --out`")],
    out: Annotated[Path, typer.Argument(help="The CSV to write (t_ms,function,duration_ms,cluster)")],
) -> None:
    """Convert an OrcBench trace to the CSV that `smss simulate` and `smss bench replay` read."""
    from smss.sim.orcbench import convert

    trace = convert(raw, out)
    print(f"{out}: {len(trace)} invocations of {len(trace.functions)} functions over {trace.span_s:.0f} s")


def main() -> None:
    try:
        app()
    except SmssError as e:
        _error(e)
        sys.exit(1)
    except httpx.TransportError as e:
        _error(f"cannot reach the platform{_at(e)}: {e or type(e).__name__}")
        sys.exit(1)


def _at(error: httpx.TransportError) -> str:
    try:
        url = error.request.url
    except RuntimeError:  # raised without a request
        return ""
    return f" at {url.scheme}://{url.netloc.decode()}"


if __name__ == "__main__":
    main()
