"""The ``ray_serve`` peer's server, run in the peer's virtual environment (it imports ray).

Starts a private local Ray on ``--cpus`` CPUs and Serve's HTTP proxy on
``--port``, deploys the model with :func:`smss.bench.peers.ray_serve.deployment_options`
and serves until SIGTERM, then shuts Serve and Ray down.

``python -m smss.bench.peers.ray_serve_server --port P --cpus N --model-json JSON``
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
from starlette.requests import Request
from starlette.responses import Response

from smss.bench.peers.common import BadRequest, ModelInfo, decode_request, encode_response, load_model
from smss.bench.peers.launch import Placement
from smss.bench.peers.ray_serve import deployment_options

# Imported by name: typed as Any whether or not ray is where the types are checked.
ray: Any = importlib.import_module("ray")
serve: Any = importlib.import_module("ray.serve")


class RayModel:
    """The deployment's class: the model, loaded as every peer loads it, batched by Serve."""

    def __init__(self, info_json: str) -> None:
        self.info = ModelInfo.decode(info_json)
        self.model: Any = load_model(self.info)
        # Serve's batching with the spec's batch size and wait (wrapped here, where they are known).
        self.infer = serve.batch(
            max_batch_size=self.info.max_batch_size, batch_wait_timeout_s=self.info.batch_wait_ms / 1000.0
        )(self._infer_batch)

    async def _infer_batch(self, xs: list[npt.NDArray[np.float32]]) -> list[npt.NDArray[np.float32]]:
        y = self.model.predict({self.info.input_name: np.concatenate(xs)})[self.info.output_name]
        cuts = np.cumsum([len(x) for x in xs])[:-1]
        return list(np.split(y, cuts))

    async def __call__(self, request: Request) -> Response:
        try:
            x = decode_request(await request.body())[self.info.input_name]
        except (BadRequest, KeyError) as e:
            return Response(str(e), status_code=400)
        y = await self.infer(x)
        return Response(
            encode_response(self.info.name, {self.info.output_name: y}), media_type="application/json"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smss.bench.peers.ray_serve_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpus", type=int, required=True)
    parser.add_argument("--model-json", required=True)
    args = parser.parse_args(argv)
    info = ModelInfo.decode(args.model_json)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port},
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        # The placement only sizes the autoscaler here: the cores are the taskset's.
        placement = Placement(tuple(range(args.cpus)), args.cpus)
        deployment = serve.deployment(RayModel, name=info.name, **deployment_options(info, placement))
        serve.run(deployment.bind(args.model_json), name=info.name, route_prefix=f"/v2/models/{info.name}")
        print("ready", flush=True)
        stop.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    # Serve pickles the deployment's class: use the importable module's, not __main__'s.
    from smss.bench.peers import ray_serve_server

    sys.exit(ray_serve_server.main())
