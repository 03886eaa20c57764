"""The Open Inference Protocol v2 REST codec: request bodies to numpy, numpy to response bodies.

Wire format (as tritonclient.http writes and reads it)::

    request   {"id"?, "parameters"?: {"binary_data_output": bool},
               "inputs": [{"name", "datatype", "shape", "data"?,
                           "parameters"?: {"binary_data_size": N}}],
               "outputs"?: [{"name", "parameters"?: {"binary_data": bool}}]}
    response  {"model_name", "model_version", "id"?,
               "outputs": [{"name", "datatype", "shape",
                            "data" | "parameters": {"binary_data_size": N}}]}

With the binary extension the header ``Inference-Header-Content-Length: L``
says the first L bytes are the JSON; the rest are raw little-endian tensors,
concatenated in the order of the tensors that carry ``binary_data_size``.

Every problem with a request is an :class:`InvalidInput` (or
:class:`PayloadTooLarge`) whose message names the offending tensor. Nothing
is allocated for a tensor before its element count is checked, binary tensors
are zero-copy (read-only) views of the body, and JSON nesting is bounded by
the schema: fields we read are typed (at most ``3 + MAX_DIMS`` levels) and
unknown fields msgspec skips are cut off by its recursion guard.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from smss import bytes_tensors
from smss.api._inputs import HEADER_LENGTH, InputWire, Params, decode_inputs
from smss.api._json_tensors import encode_data, show
from smss.api.wire import BinaryParameters, InferResponse, OutputTensor, TensorJson
from smss.config import Limits
from smss.errors import InvalidInput, ModelError, PayloadTooLarge
from smss.spec import DTYPE_TO_DATATYPE, FunctionSpec, TensorSpec

__all__ = [
    "HEADER_LENGTH",
    "DecodedRequest",
    "InferRequest",
    "RequestedOutput",
    "decode_request",
    "decode_tensor_list",
    "encode_response",
    "encode_tensor_json",
    "output_raw",
    "parse_header_length",
    "raw_bytes",
    "requested_outputs",
]

MAX_ID_CHARS = 1024


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: use the request's default


@dataclass(frozen=True, slots=True)
class DecodedRequest:
    id: str | None
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: tuple[RequestedOutput, ...]  # () means every output of the spec
    binary_default: bool


class OutputRequest(msgspec.Struct):
    """An output the client asks for (and whether in binary)."""

    name: str
    parameters: Params | None = None


class InferRequest(msgspec.Struct):
    """An infer request's JSON (the binary extension's header)."""

    inputs: list[InputWire]
    id: str | None = None
    parameters: Params | None = None
    outputs: list[OutputRequest] | None = None


class _NameOnly(msgspec.Struct):
    name: object = None


class _NamesWire(msgspec.Struct):
    inputs: list[_NameOnly] | None = None


_REQUEST = msgspec.json.Decoder(InferRequest)
_INPUTS = msgspec.json.Decoder(list[InputWire])
_NAMES_IN_REQUEST = msgspec.json.Decoder(_NamesWire)
_NAMES_IN_LIST = msgspec.json.Decoder(list[_NameOnly])
_INPUT_INDEX = re.compile(r"`\$(?:\.inputs)?\[(\d+)\]")


def decode_request(
    body: bytes, header_length: int | None, spec: FunctionSpec, limits: Limits
) -> DecodedRequest:
    """Decode and validate an infer request for ``spec``."""
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(f"request body exceeds {limits.max_body_bytes} bytes")
    header, tail = _split(body, header_length)
    wire = _decode_json(_REQUEST, header, "inference request")
    if wire.id is not None and len(wire.id) > MAX_ID_CHARS:
        raise InvalidInput(f"request id is longer than {MAX_ID_CHARS} characters")
    binary_default = _param_bool(wire.parameters, "binary_data_output", "request") or False
    outputs = _requested_outputs(wire.outputs or [], spec)
    inputs = decode_inputs(wire.inputs, spec.inputs, limits, tail)
    return DecodedRequest(wire.id, inputs, outputs, binary_default)


def parse_header_length(raw: str | None) -> int | None:
    """The ``Inference-Header-Content-Length`` header's value (None when absent)."""
    if raw is None:
        return None
    # Digits only: int() would also take "+1", " 1", "1_000" and thousands of digits.
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer")
    return int(raw)


def decode_tensor_list(
    items: object,
    spec_inputs: tuple[TensorSpec, ...] | None,
    limits: Limits,
    binary_tail: memoryview | None,
) -> dict[str, np.ndarray[Any, Any]]:
    """Decode an ``inputs`` list shaped like an infer request's.

    ``items`` is the list's JSON text (``msgspec.Raw``, bytes, memoryview) or the
    list already decoded into Python objects. ``spec_inputs`` None accepts any
    names (all other checks still apply); otherwise every spec input is required.
    """
    if isinstance(items, msgspec.Raw | bytes | bytearray | memoryview):
        text = items
    else:
        try:
            text = msgspec.json.encode(items)
        except (TypeError, ValueError, RecursionError):
            raise InvalidInput("inputs must be a JSON list of tensors") from None
    wires = _decode_json(_INPUTS, text, "inputs")
    return decode_inputs(wires, spec_inputs, limits, binary_tail)


def _split(body: bytes, header_length: int | None) -> tuple[memoryview, memoryview | None]:
    view = memoryview(body)
    if header_length is None:
        return view, None
    if not 0 < header_length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
    return view[:header_length], view[header_length:]


def _decode_json(decoder: msgspec.json.Decoder[Any], text: Any, what: str) -> Any:
    try:
        return decoder.decode(text)
    except msgspec.ValidationError as error:
        raise InvalidInput(_validation_message(error, text, what)) from None
    except RecursionError:
        raise InvalidInput(f"{what} JSON is nested too deeply") from None
    except (msgspec.DecodeError, ValueError):  # ValueError: invalid UTF-8 in a string
        raise InvalidInput(f"{what} is not valid JSON") from None


def _validation_message(error: msgspec.ValidationError, text: Any, what: str) -> str:
    """msgspec's message, naming the input it is about when the path says which."""
    match = _INPUT_INDEX.search(str(error))
    name = _input_name(text, int(match.group(1))) if match else None
    if name is None:
        return f"invalid {what}: {error}"
    return f"input {show(name)}: {error}"


def _input_name(text: Any, index: int) -> object:
    """Best effort: the name of input ``index`` in a request or inputs list."""
    for decoder in (_NAMES_IN_REQUEST, _NAMES_IN_LIST):
        try:
            decoded: Any = decoder.decode(text)
        except (msgspec.MsgspecError, ValueError, RecursionError):
            continue
        names = decoded.inputs if isinstance(decoded, _NamesWire) else decoded
        if names is not None and index < len(names):
            return names[index].name
    return None


def requested_outputs(
    outputs: Sequence[tuple[str, Params]], spec: FunctionSpec
) -> tuple[RequestedOutput, ...]:
    """Outputs a request names (with their parameters), checked against ``spec``."""
    return _requested_outputs([OutputRequest(name, params) for name, params in outputs], spec)


def _requested_outputs(wires: list[OutputRequest], spec: FunctionSpec) -> tuple[RequestedOutput, ...]:
    known = [t.name for t in spec.outputs]
    outputs: dict[str, RequestedOutput] = {}
    for wire in wires:
        name = show(wire.name)
        if wire.name not in known:
            raise InvalidInput(f"unknown output {name}; expected {', '.join(map(show, known))}")
        if wire.name in outputs:
            raise InvalidInput(f"output {name} is requested more than once")
        params = wire.parameters or {}
        if params.get("classification") or "shared_memory_region" in params:
            raise InvalidInput(f"output {name}: classification and shared memory are not supported")
        binary = _param_bool(params, "binary_data", f"output {name}")
        outputs[wire.name] = RequestedOutput(wire.name, binary)
    return tuple(outputs.values())


def _param_bool(params: Params | None, key: str, where: str) -> bool | None:
    value = (params or {}).get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"{where}: parameter {key} must be true or false")
    return value


def encode_tensor_json(name: str, array: np.ndarray[Any, Any]) -> TensorJson:
    """The JSON form ``{"name", "datatype", "shape", "data"}`` of one output tensor.

    ``data`` is a flat list, or a ``msgspec.Raw`` holding NaN/Infinity tokens
    when the tensor has non-finite values: encode the dict with msgspec.json.
    """
    array, datatype = _wire_array(name, array)
    return TensorJson(name=name, datatype=datatype, shape=list(array.shape), data=encode_data(array, name))


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Mapping[str, np.ndarray[Any, Any]],
    request: DecodedRequest,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers.

    When any output is binary the body is the JSON header followed by the raw
    tensors, and the headers carry its length; otherwise the body is JSON.
    """
    tensors: list[OutputTensor] = []
    buffers: list[memoryview] = []
    for name, binary in _selected(outputs, request):
        if not binary:
            t = encode_tensor_json(name, outputs[name])
            tensors.append(
                OutputTensor(name=t["name"], datatype=t["datatype"], shape=t["shape"], data=t["data"])
            )
            continue
        array, datatype = _wire_array(name, outputs[name])
        raw = raw_bytes(array)
        size = BinaryParameters(binary_data_size=raw.nbytes)
        tensors.append(OutputTensor(name=name, datatype=datatype, shape=list(array.shape), parameters=size))
        buffers.append(raw)
    response = InferResponse(model_name=model_name, model_version=model_version, outputs=tensors)
    if request_id is not None:
        response["id"] = request_id
    header = msgspec.json.encode(response)
    if not buffers:
        return header, {"Content-Type": "application/json"}
    body = b"".join([header, *buffers])
    return body, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _selected(outputs: Mapping[str, np.ndarray[Any, Any]], request: DecodedRequest) -> list[tuple[str, bool]]:
    if not request.outputs:
        return [(name, request.binary_default) for name in outputs]
    selected = []
    for wanted in request.outputs:
        if wanted.name not in outputs:
            raise ModelError(f"the model returned no output {show(wanted.name)}")
        binary = request.binary_default if wanted.binary is None else wanted.binary
        selected.append((wanted.name, binary))
    return selected


def output_raw(name: str, array: np.ndarray[Any, Any]) -> tuple[str, tuple[int, ...], memoryview]:
    """One output's protocol datatype, shape and raw wire bytes (``ModelError`` for a dtype
    the protocol has no datatype for)."""
    array, datatype = _wire_array(name, array)
    return datatype, tuple(int(d) for d in array.shape), raw_bytes(array)


def raw_bytes(array: np.ndarray[Any, Any]) -> memoryview:
    """The raw wire bytes of a little-endian array: its buffer, or length-prefixed BYTES."""
    if bytes_tensors.is_bytes(array):
        return memoryview(bytes_tensors.pack(array))
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _wire_array(name: str, array: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], str]:
    """The array in little-endian byte order, and its protocol datatype."""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    datatype = DTYPE_TO_DATATYPE.get(array.dtype.str)
    if datatype is None:
        raise ModelError(
            f"output {show(name)} has numpy dtype {array.dtype}, which has no "
            "Open Inference Protocol datatype"
        )
    return array, datatype
