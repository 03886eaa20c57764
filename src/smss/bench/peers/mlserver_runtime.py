"""The ``mlserver`` peer's runtime, imported by MLServer in the peer's virtual
environment (it imports mlserver): the model, built as SMSS builds it, behind
MLServer's ``MLModel``. Adaptive batching hands ``predict`` the requests stacked
on the first axis; MLServer splits the answer back."""

from __future__ import annotations

from typing import Any

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from smss.bench.peers.common import ModelInfo, load_model


class DemoRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        self.info = ModelInfo.decode(self.settings.parameters.extra["model"])
        self.model: Any = load_model(self.info)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self.model.predict({self.info.input_name: x})[self.info.output_name]
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output(name=self.info.output_name, payload=y)]
        )
