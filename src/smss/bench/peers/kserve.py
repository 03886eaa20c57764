"""The ``kserve`` peer: KServe's ModelServer (0.21) serving the model over the V2 protocol.

The server is :mod:`smss.bench.peers.kserve_server`, run in the peer's virtual
environment (``smss bench peers --setup``); this module only says how to start it.
ModelServer runs as many uvicorn workers (KServe's own multi-process REST
server) as the other systems may run instances; gRPC and the per-request
latency log line are off. ModelServer has no batching of its own (KServe's
batcher is a sidecar of a Knative deployment).
"""

from __future__ import annotations

import json
from pathlib import Path

from smss.bench.peers.common import ModelInfo
from smss.bench.peers.launch import Launch, Placement

#: KServe's logging, quiet: no access log line per request (in every worker: KServe's
#: workers configure their logging from this file again).
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
    "loggers": {
        name: {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
        for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.error", "uvicorn.access")
    },
}


def launch(info: ModelInfo, placement: Placement, port: int, python: Path, work: Path) -> Launch:
    workers = placement.max_instances(info)
    log_config = work / "kserve-logging.json"
    return Launch(
        argv=[
            str(python),
            "-m",
            "smss.bench.peers.kserve_server",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--model-json",
            info.encode(),
            # read by kserve itself (it parses sys.argv when imported)
            "--log_config_file",
            str(log_config),
        ],
        files={log_config.name: json.dumps(LOG_CONFIG)},
        url=f"http://127.0.0.1:{port}",
        infer_path=f"/v2/models/{info.name}/infer",
        binary=True,
        settings={
            "server": "kserve.ModelServer, REST V2 (binary tensor extension on), gRPC off",
            "workers": workers,
            "batching": "none (ModelServer has none; KServe's batcher is a Knative sidecar)",
            "enable_latency_logging": False,
            "access_log": False,
            "event_loop": "uvloop",
            "torch_threads": placement.threads,
        },
    )
