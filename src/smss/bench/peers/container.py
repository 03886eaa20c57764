"""The ``container`` and ``container_per_core`` peers: what a team ships in a container.

One uvicorn process (Starlette, uvloop, httptools) serving the same model class
inline: each request's JSON is decoded, ``predict`` runs on it in the event loop
(one torch thread), the answer is encoded. No batching, no queue of its own.
``container`` runs one worker; ``container_per_core`` one per core of the
server's share (uvicorn's ``--workers``: the workers accept from one shared socket).

``python -m smss.bench.peers.container --port P --workers N --model-json JSON``
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from smss.bench.peers.common import BadRequest, ModelInfo, decode_request, encode_response, load_model
from smss.bench.peers.launch import Launch, Placement

#: uvicorn's workers are new interpreters that import the app by name: the model rides in this variable.
MODEL_ENV = "SMSS_PEER_MODEL"


def build_app() -> Any:
    """The ASGI app (uvicorn's ``--factory``): the model is loaded before the first request."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    info = ModelInfo.decode(os.environ[MODEL_ENV])
    model = load_model(info)

    async def infer(request: Request) -> Response:
        try:
            inputs = decode_request(await request.body())
        except BadRequest as e:
            return Response(str(e), status_code=400)
        outputs = model.predict(inputs)
        return Response(encode_response(info.name, outputs), media_type="application/json")

    async def ready(_: Request) -> Response:
        return Response(b"", status_code=200)

    return Starlette(
        routes=[
            Route(f"/v2/models/{info.name}/infer", infer, methods=["POST"]),
            Route("/v2/health/ready", ready),
        ]
    )


def launch_one(info: ModelInfo, placement: Placement, port: int, python: Path, work: Path) -> Launch:
    """``container``: one worker."""
    return _launch(info, placement, port, python, 1)


def launch_per_core(info: ModelInfo, placement: Placement, port: int, python: Path, work: Path) -> Launch:
    """``container_per_core``: one worker per server core."""
    return _launch(info, placement, port, python, len(placement.server_cores))


def _launch(info: ModelInfo, placement: Placement, port: int, python: Path, workers: int) -> Launch:
    return Launch(
        argv=[
            str(python),
            "-m",
            "smss.bench.peers.container",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--model-json",
            info.encode(),
        ],
        url=f"http://127.0.0.1:{port}",
        infer_path=f"/v2/models/{info.name}/infer",
        binary=False,
        settings={
            "server": "uvicorn + Starlette, uvloop, httptools; predict inline in the event loop",
            "workers": workers,
            "batching": "none",
            "torch_threads": placement.threads,
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m smss.bench.peers.container")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model-json", required=True)
    args = parser.parse_args(argv)
    import uvicorn

    os.environ[MODEL_ENV] = args.model_json
    uvicorn.run(
        "smss.bench.peers.container:build_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
