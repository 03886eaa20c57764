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

import msgspec
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from smss import config
from smss.client import Client
from smss.errors import SmssError
from smss.spec import DATATYPES

app = typer.Typer(no_args_is_help=True, add_completion=False, help="SMSS: serverless model serving.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks; each prints one JSON object.")
app.add_typer(bench_app, name="bench")
console = Console()

Url = Annotated[str | None, typer.Option("--url", help="Platform URL [default: $SMSS_URL or :8000]")]
Token = Annotated[str | None, typer.Option("--token", help="Admin token [default: $SMSS_TOKEN]")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON")]


def _client(url: str | None, token: str | None) -> Client:
    return Client(url or config.env_url(), token or config.env_token())


def _print_json(data: object) -> None:
    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    data_dir: Annotated[Path | None, typer.Option(help="Data directory [default: ~/.smss]")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Deploy the demo models")] = False,
    token: Token = None,
    keep_alive: Annotated[float, typer.Option(help="Seconds an idle instance stays up")] = 300.0,
    weight_cache: Annotated[
        str | None, typer.Option(help="Weight store budget per node, e.g. 4G [default: RAM/4]")
    ] = None,
    start_mode: Annotated[str, typer.Option(help="fork (zygote, fast) or exec (new interpreter)")] = "fork",
    log_level: Annotated[str, typer.Option(help="Log level")] = "info",
) -> None:
    """Run the platform: gateway, controller and a local node."""
    from smss.server import serve as run_server

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    settings = config.Settings(
        host=host,
        port=port,
        data_dir=data_dir or Path.home() / ".smss",
        token=token or config.env_token(),
        demo=demo,
        log_level=log_level,
        serving=config.ServingSettings(keep_alive_s=config.env_keep_alive() or keep_alive),
        start_mode=start_mode,
    )
    try:
        if weight_cache is not None:
            settings = dataclasses.replace(settings, weight_cache_bytes=config.parse_size(weight_cache))
        settings.check()
    except SmssError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    run_server(settings)


@app.command()
def deploy(
    target: Annotated[str, typer.Argument(help="FILE.py:ClassName")],
    weights: Annotated[Path | None, typer.Option(help="Weights (.safetensors or .onnx)")] = None,
    url: Url = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Deploy (or replace) a model as a function."""
    with _client(url, token) as client:
        result = client.deploy(target, weights)
    if as_json:
        _print_json(result)
    else:
        console.print(
            f"deployed {result['name']} (version {result['version']}, generation {result['generation']})"
        )


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
    table = Table("function", "instance", "node", "pid", "state", "in flight", "served")
    for f in items:
        if not f["instances"]:
            state = f"starting ({f['starting']})" if f["starting"] else "scaled to zero"
            if f["last_error"]:
                state = f"failed: {f['last_error']}"
            table.add_row(f["name"], "-", "-", "-", state, str(f["queued"]), "-")
        for i in f["instances"]:
            table.add_row(
                f["name"],
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
    result = {k: v.tolist() for k, v in outputs.items()}
    if as_json:
        _print_json(result)
    else:
        for k, v in outputs.items():
            console.print(f"{k} {list(v.shape)} {v.dtype}:\n{v}")


@bench_app.command("overhead")
def bench_overhead(
    as_json: AsJson = True,
    requests: Annotated[int, typer.Option(help="Requests per concurrency level")] = 2000,
) -> None:
    """Platform overhead over an in-process predict() for the mlp model."""
    from smss.bench.overhead import run

    _print_json(run(requests=requests))


@bench_app.command("cold-start")
def bench_cold_start(as_json: AsJson = True) -> None:
    """Cold start of cnn and cnn_large: container-style vs fork-and-attach (one JSON object per model)."""
    from smss.bench.coldstart import run

    for row in run():
        _print_json(row)


def main() -> None:
    try:
        app()
    except SmssError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
