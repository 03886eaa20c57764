"""The ``kserve`` peer's server, run in the peer's virtual environment (it imports kserve).

A ``kserve.Model`` whose ``predict`` takes the V2 request KServe decoded (JSON,
or the binary tensor extension, which KServe's REST server reads) and answers
the model's output as JSON.

``python -m smss.bench.peers.kserve_server --port P --workers N --model-json JSON``
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import kserve
from kserve import InferOutput, InferRequest, InferResponse
from kserve.utils.utils import generate_uuid

from smss.bench.peers.common import ModelInfo, load_model


class DemoModel(kserve.Model):  # type: ignore[misc]
    def __init__(self, info: ModelInfo) -> None:
        super().__init__(info.name)
        self.info = info
        self.model: Any = None
        self.ready = False

    def load(self) -> bool:
        self.model = load_model(self.info)
        self.ready = True
        return True

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # With workers > 1 KServe hands the registered models to spawned processes:
        # each of them loads the model again rather than receiving its modules.
        return (_loaded, (self.info.encode(),))

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        y = self.model.predict({self.info.input_name: x})[self.info.output_name]
        out = InferOutput(name=self.info.output_name, shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(
            model_name=self.name, infer_outputs=[out], response_id=payload.id or generate_uuid()
        )


def _loaded(info_json: str) -> DemoModel:
    model = DemoModel(ModelInfo.decode(info_json))
    model.load()
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m smss.bench.peers.kserve_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model-json", required=True)
    args, _ = parser.parse_known_args(argv)  # kserve's own flags too
    server = kserve.ModelServer(
        http_port=args.port,
        workers=args.workers,
        enable_grpc=False,
        enable_latency_logging=False,
        event_loop="uvloop",
    )
    server.start([_loaded(args.model_json)])


if __name__ == "__main__":
    # kserve parsed sys.argv when imported, leaving ours aside (parse_known_args).
    main(sys.argv[1:])
