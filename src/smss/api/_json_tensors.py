"""Tensor ``data`` in JSON form: typed decoding into numpy and encoding back.

Decoding never walks Python objects element by element: msgspec decodes the
raw ``data`` text straight into a list of the right element type, range and
nesting depth (ints out of range, floats for an int tensor, strings, ``null``
or a wrong depth all fail inside msgspec's C code), and numpy builds the array.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any

import msgspec
import numpy as np

from smss import bytes_tensors
from smss.errors import InvalidInput, ModelError


def _int(lo: int, hi: int) -> object:
    return Annotated[int, msgspec.Meta(ge=lo, le=hi)]


def _float(limit: float) -> object:
    # A bound keeps inf out and stops numpy overflowing (and warning) on the cast.
    return Annotated[float, msgspec.Meta(ge=-limit, le=limit)]


_ELEMENT: dict[str, object] = {
    "BOOL": bool,
    "UINT8": _int(0, 2**8 - 1),
    "UINT16": _int(0, 2**16 - 1),
    "UINT32": _int(0, 2**32 - 1),
    # msgspec bounds must fit an int64; numpy's cast checks the top of the range.
    "UINT64": Annotated[int, msgspec.Meta(ge=0)],
    "INT8": _int(-(2**7), 2**7 - 1),
    "INT16": _int(-(2**15), 2**15 - 1),
    "INT32": _int(-(2**31), 2**31 - 1),
    "INT64": _int(-(2**63), 2**63 - 1),
    "FP16": _float(float(np.finfo(np.float16).max)),
    "FP32": _float(float(np.finfo(np.float32).max)),
    "FP64": _float(float(np.finfo(np.float64).max)),
    # Strings in JSON; each becomes the UTF-8 ``bytes`` element the model sees.
    "BYTES": str,
}


@functools.cache
def _decoder(datatype: str, depth: int) -> msgspec.json.Decoder[Any]:
    """A decoder for exactly ``depth`` nested lists of ``datatype`` elements."""
    element: Any = _ELEMENT[datatype]
    for _ in range(depth):
        element = list[element]
    return msgspec.json.Decoder(element)


def show(name: object) -> str:
    """A name fit for an error message: quoted, and short even when hostile."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _explain(error: Exception) -> str:
    # msgspec paths are relative to ``data``; say so rather than print a bare ``$``.
    return str(error).replace("`$", "`data")


def decode_data(
    name: str, datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], raw: msgspec.Raw
) -> np.ndarray[Any, Any]:
    """Decode the JSON ``data`` of one tensor, flat or nested row-major."""
    count = element_count(shape)
    decoder = _decoder(datatype, 1)
    try:
        flat = decoder.decode(raw)
    except msgspec.ValidationError as error:
        if len(shape) < 2:
            raise InvalidInput(f"input {show(name)}: {_explain(error)}") from None
        return _decode_nested(name, datatype, dtype, shape, raw)
    except (msgspec.DecodeError, ValueError, RecursionError):
        raise InvalidInput(f"input {show(name)}: data is not valid JSON") from None
    if len(flat) != count:
        raise InvalidInput(
            f"input {show(name)}: data has {len(flat)} elements, shape {list(shape)} needs {count}"
        )
    return _to_array(name, flat, dtype).reshape(shape)


def _to_array(name: str, values: list[Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    if dtype == bytes_tensors.DTYPE:  # the decoder let only str elements through
        array = np.empty(len(values), dtype=dtype)
        array[:] = [v.encode() for v in values]
        return array
    try:
        return np.asarray(values, dtype=dtype)
    except OverflowError:  # only UINT64 values above 2**64 - 1 get this far
        raise InvalidInput(f"input {show(name)}: a value is out of range for {dtype}") from None


def _decode_nested(
    name: str, datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], raw: msgspec.Raw
) -> np.ndarray[Any, Any]:
    decoder = _decoder(datatype, len(shape))
    try:
        nested = decoder.decode(raw)
    except msgspec.ValidationError as error:
        raise InvalidInput(
            f"input {show(name)}: data must be a flat list or {len(shape)} nested lists "
            f"of {datatype} values: {_explain(error)}"
        ) from None
    try:
        # An object array of ragged lists is 1-D (of lists); its shape gives it away below.
        strings = dtype == bytes_tensors.DTYPE
        array: np.ndarray[Any, Any] | None = (
            np.asarray(nested, dtype=dtype) if strings else _to_array(name, nested, dtype)
        )
    except ValueError:  # ragged
        array = None
    if array is not None and array.shape == shape and dtype == bytes_tensors.DTYPE:
        array = _to_array(name, array.reshape(-1).tolist(), dtype).reshape(shape)
    if array is None or array.shape != shape:
        raise InvalidInput(f"input {show(name)}: nested data does not have shape {list(shape)}")
    return array


def element_count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def encode_data(array: np.ndarray[Any, Any], name: str = "") -> list[Any] | msgspec.Raw:
    """The flat row-major JSON ``data`` of an array (BYTES elements as UTF-8 strings).

    NaN and infinities have no JSON number, and msgspec would write them as
    ``null`` (so -inf would come back as NaN). Triton writes the ``NaN`` /
    ``Infinity`` / ``-Infinity`` tokens that tritonclient and Python's json
    read back exactly; we do the same, on a slow path taken only when needed.
    """
    values: list[Any] = array.ravel().tolist()
    if array.dtype == bytes_tensors.DTYPE:
        try:
            return [v.decode() for v in values]
        except UnicodeDecodeError:
            raise ModelError(
                f"output {show(name)} holds bytes that are not UTF-8: ask for it as binary data"
            ) from None
    if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
        return msgspec.Raw(json.dumps(values, allow_nan=True, separators=(",", ":")).encode())
    return values
