"""gRPC ``ModelInferRequest`` to numpy, numpy to ``ModelInferResponse``.

A request carries each input either in ``raw_input_contents`` (one entry per
input, in order: little-endian bytes, or length-prefixed elements for BYTES, as
tritonclient.grpc sends them) or in the typed ``contents`` fields; as in
Triton, a request uses one way for all of its inputs. The checks are the REST
codec's (:func:`smss.api._inputs.decode_checked`): names, datatypes, shapes and
element counts are refused, naming the input, before any tensor is built.
Responses always carry ``raw_output_contents``, which every client reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from smss import bytes_tensors
from smss.api._inputs import InputWire, Params, decode_checked, decode_raw
from smss.api._json_tensors import element_count, show
from smss.api.codec import output_raw, requested_outputs
from smss.config import Limits
from smss.errors import InvalidInput
from smss.spec import DATATYPES, MAX_DIMS, FunctionSpec

#: The typed ``contents`` field of each datatype (FP16 has none: raw only, as in Triton).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_request(
    request: pb.ModelInferRequest, spec: FunctionSpec, limits: Limits
) -> tuple[dict[str, np.ndarray[Any, Any]], tuple[str, ...]]:
    """The checked inputs of a request, and the outputs it asks for (() means all)."""
    # Counted before anything is copied out of the message (a hostile one may list
    # millions of inputs or dimensions within its size limit).
    if len(request.inputs) > limits.max_inputs:
        raise InvalidInput(f"request has {len(request.inputs)} inputs, at most {limits.max_inputs} allowed")
    for t in request.inputs:
        if len(t.shape) > MAX_DIMS:
            raise InvalidInput(f"input {show(t.name)}: shape has more than {MAX_DIMS} dimensions")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "give every input raw, or none"
        )
    wires = [
        InputWire(
            t.name, t.datatype, list(t.shape), parameters=_params(t.parameters, f"input {show(t.name)}")
        )
        for t in request.inputs
    ]

    def decode(index: int, wire: InputWire, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        if wire.parameters and "shared_memory_region" in wire.parameters:
            raise InvalidInput(f"input {show(wire.name)}: shared memory is not supported")
        if raw:
            return decode_raw(wire, shape, memoryview(raw[index]))
        return _typed(wire, shape, request.inputs[index].contents)

    inputs = decode_checked(wires, spec.inputs, limits, decode)
    wanted = requested_outputs(
        [(o.name, _params(o.parameters, f"output {show(o.name)}")) for o in request.outputs], spec
    )
    return inputs, tuple(o.name for o in wanted)


def encode_response(
    spec: FunctionSpec, request_id: str, outputs: dict[str, np.ndarray[Any, Any]]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=spec.name, model_version=spec.version, id=request_id)
    for name, array in outputs.items():
        datatype, shape, raw = output_raw(name, array)
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(bytes(raw))
    return response


def _typed(wire: InputWire, shape: tuple[int, ...], contents: pb.InferTensorContents) -> np.ndarray[Any, Any]:
    name = show(wire.name)
    field = _CONTENTS.get(wire.datatype)
    if field is None:
        raise InvalidInput(f"input {name}: {wire.datatype} data must be sent in raw_input_contents")
    values = getattr(contents, field)
    count = element_count(shape)
    if len(values) != count:  # checked before anything is copied out of the message
        raise InvalidInput(
            f"input {name}: {field} has {len(values)} elements, shape {list(shape)} needs {count}"
        )
    if wire.datatype == bytes_tensors.DATATYPE:
        return bytes_tensors.from_elements(values, shape)
    dtype = DATATYPES[wire.datatype]
    if dtype.kind in "iu" and dtype.itemsize < 8 and count:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype.str)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise InvalidInput(f"input {name}: a value is out of range for {wire.datatype}")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _params(params: Any, where: str) -> Params:
    """A protobuf ``map<string, InferParameter>`` as the REST codec's parameter dict."""
    out: Params = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is None:
            raise InvalidInput(f"{where}: parameter {key!r} has no value")
        out[key] = getattr(value, kind)
    return out
