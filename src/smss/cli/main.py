"""The ``smss`` command line: the composition root for every entry point.

``smss serve`` runs a platform; every other command reaches a running one by
``--url`` (default ``$SMSS_URL``, else http://127.0.0.1:8000).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import msgspec
import numpy as np
import typer
from rich.table import Table

from smss import config
from smss.cli.bench import bench_app
from smss.cli.output import AsJson, console
from smss.cli.output import error as _error
from smss.cli.output import print_json as _print_json
from smss.client import Client
from smss.errors import InvalidInput, InvalidSpec, NotFound, SmssError

app = typer.Typer(no_args_is_help=True, help="SMSS: serverless model serving.")
app.add_typer(bench_app, name="bench")
runs_app = typer.Typer(no_args_is_help=True, help="Workflow runs: start, list, show, resume, replay.")
app.add_typer(runs_app, name="runs")
traces_app = typer.Typer(no_args_is_help=True, help="Invocation traces for simulate and bench replay.")
app.add_typer(traces_app, name="traces")

DEFAULT_GRPC_PORT = 8001
Url = Annotated[str | None, typer.Option("--url", help="Platform URL [default: $SMSS_URL or :8000]")]
Token = Annotated[str | None, typer.Option("--token", help="Admin token [default: $SMSS_TOKEN]")]


def _client(url: str | None, token: str | None) -> Client:
    return Client(url or config.env_url(), token or config.env_token())


def _version(value: bool) -> None:
    if value:
        from smss import __version__

        print(f"smss {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """SMSS: serverless model serving."""


def _serve_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """``--config FILE.toml``: its settings become the defaults of the flags not given."""
    if value is not None:
        known = [p.name for p in ctx.command.params if p.name and p.name != "config_file"]
        try:
            settings = config.read_flags_file(value, known)
        except InvalidSpec as e:
            raise typer.BadParameter(e.message) from None
        ctx.default_map = {**(ctx.default_map or {}), **settings}
    return value


@app.command()
def serve(
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            is_eager=True,
            callback=_serve_config,
            help="TOML file of settings named as these flags (a flag given wins)",
        ),
    ] = None,
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
    max_body: Annotated[
        str, typer.Option(help="Largest request body (infer, run), e.g. 64MiB; past it: 413")
    ] = "64MiB",
    max_upload: Annotated[str, typer.Option(help="Largest weights upload, e.g. 4GiB")] = "4GiB",
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
    log_format: Annotated[
        str,
        typer.Option(
            help="text, or json: one object a line with the request, function, instance and run ids"
        ),
    ] = "text",
    log_retention: Annotated[
        float | None,
        typer.Option(
            help="Seconds a finished run stays in the workflow log before compaction removes it "
            "(inf: never) [default: 7 days]"
        ),
    ] = None,
    store: Annotated[
        str,
        typer.Option(
            help="Where the registry, workflow log and session state live: sqlite (files in the data "
            "dir) or postgresql://user@host:port/db?schema=NAME, shared by several gateways and engines"
        ),
    ] = "sqlite",
    blob_dir: Annotated[
        Path | None,
        typer.Option(help="Workflow blobs in this directory (one every node can reach), not in the log"),
    ] = None,
    run_lease: Annotated[
        float,
        typer.Option(
            help="PostgreSQL store: seconds after which a dead engine's runs are resumed by another"
        ),
    ] = 10.0,
    allow_faults: Annotated[
        bool,
        typer.Option(
            "--allow-faults", help="Tests only: switch on the fault points named in $SMSS_FAULT", hidden=True
        ),
    ] = False,
    backend: Annotated[
        str, typer.Option(help="local (this machine) or ray (the nodes of a Ray cluster)")
    ] = "local",
    address: Annotated[
        str,
        typer.Option(
            help="With --backend ray: the Ray cluster's GCS address, auto (the one `ray start` "
            "ran here), or local (start a private one here)"
        ),
    ] = "auto",
    gateway_nodes: Annotated[
        str | None,
        typer.Option(
            help="With --backend ray: comma-separated Ray node ids or IPs that run a gateway [default: all]"
        ),
    ] = None,
) -> None:
    """Run the platform: gateway, controller and a local node. SIGTERM drains it:
    no new connections, the requests in flight finish, instances stop, exit 0.

    With --backend ray: the controller runs as the detached Ray actor smss-controller
    (found if one runs), an agent on every Ray node and a gateway on every node (or on
    --gateway-nodes); this command prints the gateways and waits; SIGINT / SIGTERM
    stops the platform if this command started it."""
    from smss.cli.logsetup import configure_logging
    from smss.compose import build, run

    data = data_dir or Path.home() / ".smss"
    log_file = data / "logs" / "platform.log"
    try:
        # To stderr until the settings are accepted: a refused start creates nothing.
        configure_logging(log_level, log_format, None)
    except InvalidSpec as e:
        _error(e)
        raise typer.Exit(2) from None
    settings = config.Settings(
        host=host,
        port=port,
        grpc_port=_grpc_port(grpc_port),
        data_dir=data,
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
        backend=backend,
        cluster=config.ClusterSettings(
            address=address,
            gateway_nodes=tuple(n.strip() for n in (gateway_nodes or "").split(",") if n.strip()),
        ),
        store=config.StoreSettings(store, blob_dir, run_lease),
    )
    try:
        if weight_cache is not None:
            settings = dataclasses.replace(settings, weight_cache_bytes=config.parse_size(weight_cache))
        if memory is not None:
            settings = dataclasses.replace(settings, memory_mb=config.parse_size(memory) // 2**20)
        limits = dataclasses.replace(
            settings.limits,
            max_body_bytes=config.parse_size(max_body),
            max_upload_bytes=config.parse_size(max_upload),
        )
        settings = dataclasses.replace(settings, limits=limits)
        if log_retention is not None:
            workflows = dataclasses.replace(settings.workflows, log_retention_s=log_retention)
            settings = dataclasses.replace(settings, workflows=workflows)
        if settings.backend == "ray":
            settings.check()
            configure_logging(log_level, log_format, log_file)
            from smss.cluster.ray_launch import serve as serve_on_ray

            serve_on_ray(settings)
            return
        ctx = build(settings)
        configure_logging(log_level, log_format, log_file)
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
    version: Annotated[
        str | None, typer.Option("--version", help="Deploy as this version (beside the others)")
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="Make this version the default (ends any canary split)")
    ] = False,
    canary: Annotated[
        float | None,
        typer.Option("--canary", min=0, max=100, help="Send PCT percent of unversioned requests here"),
    ] = None,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Deploy (or replace) a model (FILE.py:Class) or a workflow (FILE.yaml, or FILE.py:var
    holding a smss.Workflow). ``--version V`` deploys V beside a name's running versions."""
    with _client(url, token) as client:
        if _is_workflow(target):
            result = client.deploy_workflow(Path(target))
            if as_json:
                _print_json(result)
            else:
                console.print(f"deployed workflow {result['name']} (stages: {', '.join(result['stages'])})")
            return
        from smss.packaging import package

        pkg = package(target, weights)
        if version is not None:
            pkg = dataclasses.replace(pkg, spec=msgspec.structs.replace(pkg.spec, version=version))
        result = client.deploy_package(pkg)
        if default or canary is not None:
            v = result["version"]
            body: dict[str, Any] = {"default": v, "split": {}} if default else {}
            if canary is not None:
                body["split"] = {v: canary / 100}
            result["traffic"] = client.post(f"/v1/functions/{result['name']}/traffic", body)
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
def delete(
    name: str,
    workflow: Annotated[
        bool, typer.Option("--workflow", help="NAME is a workflow [default: a function, else a workflow]")
    ] = False,
    url: Url = None,
    token: Token = None,
) -> None:
    """Delete a function and stop its instances, or a workflow definition."""
    with _client(url, token) as client:
        if not workflow:
            try:
                client.delete(name)
            except NotFound:
                workflow = True  # no function of that name: a workflow's, or an error
            else:
                console.print(f"deleted function {name}")
                return
        client.delete_workflow(name)
    console.print(f"deleted workflow {name}")


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
        cluster = client.get("/v1/cluster")
    console.print(_devices_table(reports, title="devices"))
    if cluster["backend"] != "local":
        _print_cluster(cluster)


def _print_cluster(cluster: dict[str, Any]) -> None:
    """The nodes and the distance matrix: round trips measured by the agents, ms."""
    nodes = [n["node"] for n in cluster["nodes"]]
    short = {n: n[:8] for n in nodes}
    table = Table("node", "ip", "relay", "gateway", title="nodes")
    for n in cluster["nodes"]:
        table.add_row(short[n["node"]], n["ip"], n["relay"], n["gateway"] or "-")
    console.print(table)
    rtt = cluster["rtt_ms"]
    matrix = Table("from \\ to (RTT ms)", *(short[n] for n in nodes), title="distance matrix")
    for a in nodes:
        row = rtt.get(a, {})
        matrix.add_row(short[a], *("0" if a == b else (f"{row[b]:.2f}" if b in row else "?") for b in nodes))
    console.print(matrix)


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
        str | None,
        typer.Argument(
            help="Inputs: a JSON object of name -> nested list ('{\"x\": [[0.1, ...]]}') or an OIP v2 "
            "request body; omitted or '-': read from stdin"
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            exists=True,
            dir_okay=False,
            help="Read the inputs from FILE: JSON, or .npz / .npy",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the outputs to FILE.npz (binary, all outputs)")
    ] = None,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Call a function (or a workflow) once: inputs as JSON or NumPy (.npz / .npy), from
    the argument, --file or stdin; sent as binary tensors."""
    from smss.cli import inputs as tensors

    with _client(url, token) as client:
        meta = client.get(f"/v2/models/{name}")
        arrays = tensors.parse(_input_bytes(inputs, file), meta)
        outputs = client.infer(name, arrays)
    if out is not None:
        plain = {k: v.astype(bytes) if v.dtype == object else v for k, v in outputs.items()}
        np.savez(out, allow_pickle=False, **plain)  # BYTES as fixed-width bytes: nothing pickled
    result = {k: _listed(v) for k, v in outputs.items()}
    if as_json:
        _print_json(result)
    elif out is None:
        for k, v in outputs.items():
            console.print(f"{k} {list(v.shape)} {v.dtype}:\n{v}")
    else:
        console.print(f"wrote {', '.join(outputs)} to {out}")


def _input_bytes(text: str | None, file: Path | None) -> bytes:
    """The inputs' bytes: from ``file``, the argument, or stdin (when it is not a terminal)."""
    if file is not None:
        if text not in (None, "-"):
            raise InvalidInput("give the inputs once: as an argument or with --file, not both")
        return file.read_bytes()
    if text not in (None, "-"):
        return text.encode()
    if sys.stdin.isatty():
        raise InvalidInput("no inputs: give them as an argument, with --file FILE, or on stdin")
    return sys.stdin.buffer.read()


@app.command()
def logs(
    name: Annotated[str, typer.Argument(help="platform, a function, or an instance id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Last N lines of each file")] = 100,
    data_dir: Annotated[
        Path | None, typer.Option(help="The platform's data directory [default: ~/.smss]")
    ] = None,
) -> None:
    """A log of a platform on this machine: the platform's, a function's or an instance's,
    read from DATA/logs (DATA: smss serve --data-dir, default ~/.smss)."""
    from smss.cli import logs as log_files

    folder = (data_dir or Path.home() / ".smss") / "logs"
    if not folder.is_dir():
        raise InvalidInput(f"no logs at {folder}: is --data-dir the one smss serve uses?")
    paths, pattern = log_files.sources(folder, name)
    for line in log_files.tail(paths, pattern, lines):
        print(line)
    if follow:
        try:
            for line in log_files.follow(paths, pattern):
                print(line, flush=True)
        except KeyboardInterrupt:
            return


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


@runs_app.command("start")
def runs_start(
    workflow: str,
    session: Annotated[
        str | None, typer.Option(help="The session whose state the run reads and writes")
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            exists=True,
            dir_okay=False,
            help="The run's inputs: JSON, OIP v2 request, .npz / .npy",
        ),
    ] = None,
    random: Annotated[
        bool, typer.Option("--random", help="Random inputs of the workflow's declared shapes")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of --random")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the run to finish")] = True,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Start a run of a workflow: with the inputs in a file, or random ones (--random)."""
    from smss.cli import inputs as tensors

    if (inputs is None) == (not random):
        raise InvalidInput("give the run's inputs with --inputs FILE, or --random")
    with _client(url, token) as client:
        meta = client.get(f"/v2/models/{workflow}")
        arrays = (
            tensors.random_inputs(meta, seed) if inputs is None else tensors.parse(inputs.read_bytes(), meta)
        )
        result = client.run(workflow, arrays, session=session, wait=wait)
    if as_json:
        _print_json(result)
        return
    console.print(f"run {result['run_id']}: {result['status']}")
    if result.get("error"):
        _error(result["error"])
    for name, t in (result.get("outputs") or {}).items():
        console.print(f"{name} {t['shape']} {t['datatype']}")
    if result["status"] == "failed":
        raise typer.Exit(1)


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
