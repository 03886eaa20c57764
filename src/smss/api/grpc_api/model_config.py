"""A model's spec as Triton's ``ModelConfig`` (what ``get_model_config`` and perf_analyzer read).

Triton leaves the batch dimension out of ``dims`` when ``max_batch_size`` > 0:
a spec whose tensors all start with a variable dimension and that batches is
described that way; any other is ``max_batch_size`` 0 with its full shapes.
"""

from __future__ import annotations

from tritonclient.grpc import model_config_pb2 as mc

from smss.spec import FunctionSpec, TensorSpec


def _data_type(datatype: str) -> int:
    value: int = mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")
    return value


def model_config(spec: FunctionSpec, platform: str) -> mc.ModelConfig:
    tensors = (*spec.inputs, *spec.outputs)
    batch = spec.batching.max_batch_size
    batched = batch > 1 and all(t.shape[:1] == (-1,) for t in tensors)

    def dims(t: TensorSpec) -> list[int]:
        return list(t.shape[1:] if batched else t.shape)

    config = mc.ModelConfig(name=spec.name, platform=platform, max_batch_size=batch if batched else 0)
    for t in spec.inputs:
        config.input.add(name=t.name, data_type=_data_type(t.datatype), dims=dims(t))
    for t in spec.outputs:
        config.output.add(name=t.name, data_type=_data_type(t.datatype), dims=dims(t))
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = int(spec.batching.batch_wait_ms * 1000)
    return config
