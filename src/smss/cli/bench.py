"""``smss bench ...``: the benchmarks, each a thin command over its module in :mod:`smss.bench`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from smss.cli.output import AsJson, console, err_console
from smss.cli.output import error as _error
from smss.cli.output import print_json as _print_json

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; each prints one JSON object.")
Plot = Annotated[
    Path | None, typer.Option("--plot", help="Also draw the figures into FILE.png (needs smss[plots])")
]


@bench_app.command("overhead")
def bench_overhead(
    as_json: AsJson = True,
    requests: Annotated[int, typer.Option(help="Requests per concurrency level")] = 2000,
) -> None:
    """Platform overhead over an in-process predict() for the mlp model."""
    from smss.bench.overhead import run
    from smss.cli.progress import shown

    with shown("bench overhead: mlp over HTTP against in-process predict()"):
        result = run(requests=requests)
    _print_json(result)


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
    from smss.cli.progress import shown

    with shown(f"bench load: sweep and {duration:g} s steady ({', '.join(targets)})"):
        result = run(duration_s=duration, step_s=step, targets=targets, p99_limit_ms=p99_limit_ms)
    _print_json(result)


@bench_app.command("soak")
def bench_soak(
    as_json: AsJson = True,
    minutes: Annotated[float, typer.Option(help="How long to churn")] = 5.0,
) -> None:
    """Churn (scale to zero, cancelled requests, reloads); memory, fds, threads, segments, log per cycle."""
    from smss.bench.soak import run
    from smss.cli.progress import shown

    with shown(f"bench soak: {minutes:g} minutes of churn"):
        result = run(minutes=minutes)
    _print_json(result)


@bench_app.command("cold-start")
def bench_cold_start(as_json: AsJson = True, plot: Plot = None) -> None:
    """Cold start of cnn and cnn_large: container-style vs fork-and-attach (one JSON object per model)."""
    from smss.bench.coldstart import run
    from smss.cli.progress import shown

    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        _error("--plot needs matplotlib: pip install 'smss[plots]'")
        raise typer.Exit(2)
    with shown("bench cold-start: cnn and cnn_large, container-style and SMSS"):
        rows = run()
    for row in rows:
        _print_json(row)
    if plot is not None:
        from smss.plots import cold_start_figure

        cold_start_figure(plot, rows)


@bench_app.command("cluster")
def bench_cluster(
    as_json: AsJson = True,
    requests: Annotated[int, typer.Option(help="Requests per throughput / latency measurement")] = 400,
) -> None:
    """mlp on a 2-node Ray test cluster: throughput via one and both gateways, cross-node
    overhead, cold start with and without the weights on the node, recovery from a killed node."""
    from smss.bench.cluster import run

    _print_json(run(requests=requests))


@bench_app.command("gpu-sharing")
def bench_gpu_sharing(
    as_json: AsJson = True,
    tries: Annotated[int, typer.Option(help="Cold starts per tier and model (medians)")] = 5,
    instances: Annotated[int, typer.Option(help="Instances per model for instances_per_gpu")] = 8,
    seconds: Annotated[float, typer.Option(help="Seconds of the 4-model throughput run")] = 20.0,
    backend: Annotated[
        str, typer.Option(help="cuda, or host: the same code on the CPU path (a smoke test, no GPU figures)")
    ] = "cuda",
    logs: Annotated[Path | None, typer.Option(help="Keep the GPU processes' logs in this directory")] = None,
) -> None:
    """Two-layer GPU sharing on one GPU: cold starts per tier vs a container-style start, instances
    per GPU with and without one shared copy, 4 models sharing the GPU vs one at a time."""
    from smss.bench.gpusharing import run

    if backend not in ("cuda", "host"):
        _error(f"unknown --backend {backend!r}; choose cuda or host")
        raise typer.Exit(2)
    result = run(
        backend="cuda" if backend == "cuda" else "host", tries=tries, instances=instances, seconds=seconds
    )
    _print_json(result)
    if "error" in result:
        raise typer.Exit(1)


@bench_app.command("workflow")
def bench_workflow(
    as_json: AsJson = True,
    runs: Annotated[int, typer.Option(help="Runs per sequential measurement")] = 200,
    store: Annotated[
        str | None,
        typer.Option(
            help="Also measure with the store in this PostgreSQL (postgresql://...; fresh schemas, "
            "dropped after), reported beside SQLite under 'postgresql'"
        ),
    ] = None,
) -> None:
    """The behavior pipeline with the durable log vs direct stage calls, and recovery after kill -9."""
    from smss.bench.workflow import run
    from smss.cli.progress import shown

    with shown(f"bench workflow: {runs} runs with and without the log, then recovery"):
        result = run(runs=runs, store=store)
    _print_json(result)


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
    plot: Plot = None,
    as_json: AsJson = True,
) -> None:
    """Replay a trace open loop against a live platform, beside `smss simulate` on the same settings."""
    from smss.bench.replay import run
    from smss.cli.progress import shown

    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        _error("--plot needs matplotlib: pip install 'smss[plots]'")
        raise typer.Exit(2)
    with shown() as progress:
        result = run(
            trace,
            speedup=speedup,
            policy=policy,
            memory_mb=memory_mb,
            max_instances=max_instances,
            default_ttl_s=default_ttl_s,
            cpu=cpu,
            work=work,
            latency_objective_ms=latency_objective_ms,
            progress=progress,
            plot=plot,
        )
    _print_json(result)


def _names(text: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        _error(f"unknown {option} {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}")
        raise typer.Exit(2)
    return names


@bench_app.command("peers")
def bench_peers(
    setup: Annotated[
        bool,
        typer.Option(
            "--setup",
            help="Prepare the framework peers' virtual environments (downloads from PyPI) and exit",
        ),
    ] = False,
    as_json: AsJson = False,
    systems: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of smss,ray_serve,kserve,mlserver,container,container_per_core"
        ),
    ] = "smss,ray_serve,kserve,mlserver,container,container_per_core",
    models: Annotated[str, typer.Option(help="Comma-separated demo models")] = "mlp,cnn",
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts (closed loop)")] = "1,8,32",
    duration: Annotated[float, typer.Option(help="Seconds recorded per point (and per bursty phase)")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Seconds before each point, not recorded")] = 3.0,
    bursty: Annotated[bool, typer.Option(help="Run the bursty phase (1 -> 32 -> 1 clients)")] = True,
    binary: Annotated[
        bool, typer.Option(help="Also measure binary tensor bodies where a system takes them")
    ] = True,
    peers_dir: Annotated[
        Path | None, typer.Option(help="Where the peers' environments live [default: ~/.cache/smss/peers]")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Also draw the comparison as a bar chart (PNG)")] = None,
) -> None:
    """SMSS beside Ray Serve, KServe, MLServer and container-style servers (same models, bodies,
    cores and load generator): rps and latency per concurrency, ratios at 32 clients, a burst.

    Run once with --setup (it creates the peers' environments); then --json installs nothing."""
    from smss.bench.peers import report, venvs

    chosen = _names(systems, "--systems", report.SYSTEMS)
    directory = peers_dir or venvs.default_dir()
    quiet = as_json or not err_console.is_terminal

    def progress(line: str) -> None:
        if not quiet:
            err_console.print(line, highlight=False)

    if setup:
        peers = [n for n in chosen if n in venvs.PINS]
        if not peers:
            _error(f"--setup prepares {', '.join(venvs.PINS)}; --systems names none of them")
            raise typer.Exit(2)
        result = venvs.setup(directory, peers, progress)
        if as_json:
            _print_json(result)
        for name, r in result.items():
            if not as_json:
                console.print(
                    f"{name}: {r.get('error') or r['versions']} ({r['seconds']} s)", highlight=False
                )
        if any("error" in r for r in result.values()):
            raise typer.Exit(1)
        return
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        _error("--plot needs matplotlib: pip install 'smss[plots]'")
        raise typer.Exit(2)
    from smss.bench.peers.runner import Options, run

    try:
        levels = tuple(int(c) for c in concurrency.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        _error(f"--concurrency takes client counts such as 1,8,32, got {concurrency!r}")
        raise typer.Exit(2)
    if duration <= 0 or warmup < 0:
        _error("--duration must be above 0 and --warmup at least 0")
        raise typer.Exit(2)
    options = Options(
        systems=chosen,
        models=_names(models, "--models", ("mlp", "cnn", "cnn_large")),
        concurrency=levels,
        duration_s=duration,
        warmup_s=warmup,
        bursty=bursty,
        binary=binary,
        peers_dir=directory,
    )
    result = run(options, progress)
    if plot is not None:
        from smss.bench.peers.plot import draw

        draw(result, plot)
    if as_json:
        _print_json(result)
    else:
        from smss.cli.peers_view import render

        render(console, result)
