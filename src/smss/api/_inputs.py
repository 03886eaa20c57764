"""One ``inputs`` list of an infer request: per-tensor validation and the binary tail.

Each tensor is checked (name, datatype, shape, element count) before its data
is decoded or sliced, so nothing is allocated for a tensor that is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np

from smss import bytes_tensors
from smss.api._json_tensors import decode_data, element_count, show
from smss.config import Limits
from smss.errors import InvalidInput, PayloadTooLarge
from smss.spec import DATATYPES, MAX_DIMS, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_NAME_CHARS = 128

# Parameter values are scalars in the protocol; typing them so keeps JSON depth bounded.
Params = dict[str, str | int | float | bool | None]


class InputWire(msgspec.Struct):
    """One tensor of ``inputs`` as it is on the wire."""

    name: str
    datatype: str
    shape: list[int]
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)  # decoded once the datatype is known
    parameters: Params | None = None


#: Decodes the data of input ``index`` once its name, datatype and shape are checked.
DecodeData = Callable[[int, InputWire, tuple[int, ...]], np.ndarray[Any, Any]]


def decode_inputs(
    wires: list[InputWire],
    spec_inputs: tuple[TensorSpec, ...] | None,
    limits: Limits,
    tail: memoryview | None,
) -> dict[str, np.ndarray[Any, Any]]:
    """The inputs of a REST request: JSON ``data`` or slices of the binary ``tail``."""
    offset = 0

    def decode(index: int, wire: InputWire, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        nonlocal offset
        size = _binary_size(wire)
        if size is None:
            return _json_array(wire, shape)
        array = _binary_array(wire, shape, size, tail, offset)
        offset += size
        return array

    arrays = decode_checked(wires, spec_inputs, limits, decode)
    if tail is not None and offset != len(tail):
        raise InvalidInput(
            f"binary data has {len(tail)} bytes but the inputs' binary_data_size add up to {offset}"
        )
    return arrays


def decode_checked(
    wires: Sequence[InputWire],
    spec_inputs: tuple[TensorSpec, ...] | None,
    limits: Limits,
    decode: DecodeData,
) -> dict[str, np.ndarray[Any, Any]]:
    """Check every tensor's count, name, datatype and shape, then ``decode`` its data.

    The checks every protocol shares: at most ``limits.max_inputs`` tensors, no
    name twice, each known to the spec with its datatype and a shape it accepts,
    and every input of the spec given. ``spec_inputs`` None accepts any names.
    """
    if len(wires) > limits.max_inputs:
        raise InvalidInput(f"request has {len(wires)} inputs, at most {limits.max_inputs} allowed")
    specs = None if spec_inputs is None else {t.name: t for t in spec_inputs}
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for index, wire in enumerate(wires):
        if wire.name in arrays:
            raise InvalidInput(f"input {show(wire.name)} is given more than once")
        spec = _spec_for(wire, specs)
        shape = _checked_shape(wire, spec, limits)
        arrays[wire.name] = decode(index, wire, shape)
    missing = [] if specs is None else [name for name in specs if name not in arrays]
    if missing:
        raise InvalidInput(f"missing required input(s): {', '.join(map(show, missing))}")
    return arrays


def decode_raw(wire: InputWire, shape: tuple[int, ...], raw: memoryview) -> np.ndarray[Any, Any]:
    """One checked input from its own raw little-endian (or length-prefixed BYTES) bytes."""
    return _binary_array(wire, shape, len(raw), raw, 0, what="its raw contents")


def _spec_for(wire: InputWire, specs: dict[str, TensorSpec] | None) -> TensorSpec | None:
    if wire.datatype not in DATATYPES:
        raise InvalidInput(f"input {show(wire.name)}: unsupported datatype {show(wire.datatype)}")
    if specs is None:
        if not wire.name or len(wire.name) > MAX_NAME_CHARS:
            raise InvalidInput(f"invalid input name {show(wire.name)}")
        return None
    spec = specs.get(wire.name)
    if spec is None:
        raise InvalidInput(f"unknown input {show(wire.name)}; expected {', '.join(map(show, specs))}")
    if wire.datatype != spec.datatype:
        raise InvalidInput(
            f"input {show(wire.name)}: datatype {wire.datatype} given, {spec.datatype} expected"
        )
    return spec


def _checked_shape(wire: InputWire, spec: TensorSpec | None, limits: Limits) -> tuple[int, ...]:
    shape = tuple(wire.shape)
    max_dims = min(MAX_DIMS, limits.max_json_depth - 3)  # 3: request, inputs, tensor
    if len(shape) > max_dims or any(dim < 0 for dim in shape):
        raise InvalidInput(
            f"input {show(wire.name)}: shape {_show_shape(shape)} must have at most "
            f"{max_dims} non-negative dimensions"
        )
    # Zero-size tensors count too: numpy refuses shapes whose non-zero dims overflow.
    span = element_count(tuple(max(dim, 1) for dim in shape))  # exact: Python ints
    if span >= 2**63:
        raise InvalidInput(f"input {show(wire.name)}: shape {_show_shape(shape)} overflows a 64-bit size")
    if span > limits.max_tensor_elements:
        raise PayloadTooLarge(
            f"input {show(wire.name)}: shape {_show_shape(shape)} has more than "
            f"{limits.max_tensor_elements} elements"
        )
    if wire.datatype == bytes_tensors.DATATYPE and span > limits.max_bytes_elements:
        raise PayloadTooLarge(
            f"input {show(wire.name)}: shape {_show_shape(shape)} has more than "
            f"{limits.max_bytes_elements} BYTES elements"
        )
    if spec is not None and not spec.accepts(shape):
        raise InvalidInput(
            f"input {show(wire.name)}: shape {list(shape)} does not match {list(spec.shape)} (-1 is any size)"
        )
    return shape


def _show_shape(shape: tuple[int, ...]) -> str:
    text = str(list(shape))
    return text if len(text) <= 80 else text[:77] + "..."


def _binary_size(wire: InputWire) -> int | None:
    params = wire.parameters or {}
    if "shared_memory_region" in params:
        raise InvalidInput(f"input {show(wire.name)}: shared memory is not supported")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input {show(wire.name)}: binary_data_size must be a non-negative integer")
    if not _absent(wire.data):
        raise InvalidInput(f"input {show(wire.name)}: give either data or binary_data_size")
    return size


def _json_array(wire: InputWire, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if _absent(wire.data):
        raise InvalidInput(f"input {show(wire.name)}: no data and no binary_data_size")
    return decode_data(wire.name, wire.datatype, DATATYPES[wire.datatype], shape, wire.data)


def _absent(data: msgspec.Raw) -> bool:
    return len(data) == 0 or (len(data) == 4 and bytes(data) == b"null")


def _binary_array(
    wire: InputWire,
    shape: tuple[int, ...],
    size: int,
    tail: memoryview | None,
    offset: int,
    *,
    what: str = "binary_data_size",
) -> np.ndarray[Any, Any]:
    name = show(wire.name)
    if tail is None:
        raise InvalidInput(f"input {name}: binary_data_size given without {HEADER_LENGTH}")
    if offset + size > len(tail):
        raise InvalidInput(f"input {name}: binary data ends before its {size} bytes")
    if wire.datatype == bytes_tensors.DATATYPE:
        # Each element's 4-byte length prefix is checked against the tensor's own bytes.
        return bytes_tensors.unpack(tail[offset : offset + size], shape, f"input {name}")
    dtype = DATATYPES[wire.datatype]
    count = element_count(shape)
    if size != count * dtype.itemsize:
        raise InvalidInput(
            f"input {name}: {what} is {size} bytes, shape {list(shape)} of "
            f"{wire.datatype} needs {count * dtype.itemsize}"
        )
    array = np.frombuffer(tail, dtype=dtype, count=count, offset=offset)
    if dtype.kind == "b" and bool((array.view(np.uint8) > 1).any()):
        raise InvalidInput(f"input {name}: BOOL bytes must be 0 or 1")
    return array.reshape(shape)
