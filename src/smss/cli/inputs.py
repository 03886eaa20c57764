"""Tensors given on the command line, in a file or on stdin, for ``smss invoke`` and
``smss runs start``.

Accepted forms, told apart by their first bytes:

* a JSON object of input name -> nested list: ``{"x": [[0.1, 0.2, 0.3, 0.4]]}``;
* an Open Inference Protocol v2 request body: ``{"inputs": [{"name": "x", "datatype":
  "FP32", "shape": [1, 4], "data": [...]}]}`` (what ``curl`` sends), ``data`` flat or nested;
* binary tensors: a NumPy ``.npz`` archive (one array per input name) or a ``.npy``
  array (for a model with one input). Read with ``allow_pickle=False``: object arrays
  are refused, never unpickled.

Datatypes come from the model's (or workflow's) metadata, so ``[[1, 2]]`` becomes FP32
where the model takes FP32. Anything else is :class:`~smss.errors.InvalidInput`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from smss.errors import InvalidInput
from smss.spec import DATATYPES

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def parse(data: bytes, metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays in ``data`` (any accepted form), typed as ``metadata['inputs']`` says."""
    declared = {i["name"]: i for i in metadata.get("inputs", ())}
    raw = _numpy(data, list(declared)) if data.startswith((NPY_MAGIC, ZIP_MAGIC)) else _json(data)
    unknown = sorted(set(raw) - set(declared))
    if unknown and declared:
        raise InvalidInput(f"no input named {', '.join(unknown)}; the inputs are {', '.join(declared)}")
    out = {}
    for name, value in raw.items():
        meta = declared.get(name)
        dtype = DATATYPES.get(meta["datatype"]) if meta else None
        try:
            out[name] = np.asarray(value, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"input {name!r} is not a {meta and meta['datatype']} tensor: {e}") from None
    return out


def _numpy(data: bytes, names: Sequence[str]) -> dict[str, Any]:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # an object array, or not a NumPy file
        raise InvalidInput(f"not a NumPy .npy / .npz file of plain arrays: {e}") from None
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise InvalidInput(f"a .npy file holds one array; this model takes {len(names)} inputs: use .npz")
        return {names[0]: loaded}
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def _json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"inputs are not JSON (nor .npy / .npz): {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("inputs"), list):
        return {t["name"]: _tensor(t) for t in doc["inputs"] if isinstance(t, dict) and "name" in t}
    if not isinstance(doc, dict):
        raise InvalidInput('inputs must be a JSON object, e.g. {"x": [[0.1, 0.2]]}')
    return doc


def _tensor(t: Mapping[str, Any]) -> Any:
    data = np.asarray(t.get("data", []))
    shape = t.get("shape")
    if shape is None:
        return data
    try:
        return data.reshape(shape)
    except ValueError as e:
        raise InvalidInput(f"input {t['name']!r}: data does not fit shape {shape}: {e}") from None


def random_inputs(metadata: Mapping[str, Any], seed: int | None = None) -> dict[str, np.ndarray]:
    """Random tensors of the declared shapes (variable dimensions as 1), for trying a
    model or a workflow: floats uniform in [0, 1), integers in [0, 10), booleans."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in metadata.get("inputs", ()):
        shape = [d if d > 0 else 1 for d in i["shape"]]
        dtype = np.dtype(DATATYPES.get(i["datatype"], object))
        if i["datatype"] == "BYTES":
            out[i["name"]] = np.full(shape, b"x", dtype=object)
        elif dtype.kind == "f":
            out[i["name"]] = rng.random(shape).astype(dtype)
        elif dtype.kind == "b":
            out[i["name"]] = rng.random(shape) < 0.5
        else:
            out[i["name"]] = rng.integers(0, 10, shape).astype(dtype)
    return out
