"""What ``smss.Client`` and ``smss.AsyncClient`` send and read: pure, no I/O.

Both clients build the same ``httpx.Request`` here and parse the same
``httpx.Response``; each only sends (one blocking, one awaiting), so the two
cannot drift. Infer requests use the binary tensor extension by default:
tensors travel as raw little-endian bytes (BYTES as length-prefixed elements)
after a JSON header, and answers come back the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import msgspec
import numpy as np

from smss import bytes_tensors, errors
from smss.headers import REQUEST_TIMEOUT
from smss.spec import DATATYPES, datatype_of

#: The binary tensor extension's header (the protocol's name).
HEADER_LENGTH = "Inference-Header-Content-Length"


def _error_types(root: type[errors.SmssError]) -> dict[str, type[errors.SmssError]]:
    """Every error type of the tree by its wire ``code``, so a client raises what the server did."""
    found = {root.code: root}
    for sub in root.__subclasses__():
        found.update(_error_types(sub))
    return found


_BY_CODE = _error_types(errors.SmssError)


def checked(response: httpx.Response) -> Any:
    """The JSON of a successful answer; the server's own error type otherwise."""
    if response.status_code >= 400:
        try:
            body = response.json()
            message, code = body.get("error", response.text), body.get("code", "")
        except ValueError:
            message, code = response.text, ""
        kind = _BY_CODE.get(code, errors.SmssError)
        raise kind(f"HTTP {response.status_code}: {message}")
    return response.json()


def infer_request(
    client: httpx.Client | httpx.AsyncClient,
    name: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None,
    binary: bool,
    timeout_s: float | None,
) -> httpx.Request:
    headers: dict[str, str] = {}
    if timeout_s is not None:
        headers[REQUEST_TIMEOUT] = repr(float(timeout_s))
    wanted = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs or ()]
    url = f"/v2/models/{name}/infer"
    inputs = as_sendable(inputs)
    if not binary:
        body: dict[str, Any] = {"inputs": tensors_json(inputs)}
        if wanted:
            body["outputs"] = wanted
        return client.build_request("POST", url, json=body, headers=headers)
    tensors, buffers = [], []
    for key, value in inputs.items():
        array = np.asarray(value)
        datatype = _datatype(array)
        raw = bytes_tensors.pack(array) if datatype == "BYTES" else _little_endian(array).tobytes()
        tensors.append(
            {
                "name": key,
                "datatype": datatype,
                "shape": list(array.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        buffers.append(raw)
    header: dict[str, Any] = {"inputs": tensors, "parameters": {"binary_data_output": True}}
    if wanted:
        header["outputs"] = wanted
    head = msgspec.json.encode(header)
    headers[HEADER_LENGTH] = str(len(head))
    headers["Content-Type"] = "application/octet-stream"
    return client.build_request("POST", url, content=b"".join([head, *buffers]), headers=headers)


def infer_answer(response: httpx.Response) -> dict[str, np.ndarray]:
    """The output tensors of an infer answer, JSON or binary (BYTES as object arrays of bytes)."""
    if response.status_code >= 400:
        checked(response)
    content = response.content
    length = response.headers.get(HEADER_LENGTH)
    split = int(length) if length is not None else len(content)
    body = msgspec.json.decode(content[:split])
    tail = memoryview(content)[split:]
    out: dict[str, np.ndarray] = {}
    offset = 0
    for o in body["outputs"]:
        datatype, shape = o["datatype"], tuple(o["shape"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = _from_json(o["data"], datatype, shape)
            continue
        chunk = tail[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            out[o["name"]] = bytes_tensors.unpack(chunk, shape, f"output {o['name']!r}")
        else:
            out[o["name"]] = np.frombuffer(chunk, dtype=DATATYPES[datatype]).reshape(shape)
    return out


def tensors_json(inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, value in as_sendable(inputs).items():
        array = np.asarray(value)
        datatype = _datatype(array)
        data = array.ravel().tolist()
        if datatype == "BYTES":
            data = [v.decode() for v in data]
        out.append({"name": key, "datatype": datatype, "shape": list(array.shape), "data": data})
    return out


def _from_json(data: list[Any], datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        return bytes_tensors.from_elements((str(v).encode() for v in data), shape)
    return np.asarray(data, dtype=DATATYPES[datatype]).reshape(shape)


def _datatype(array: np.ndarray) -> str:
    if bytes_tensors.is_bytes(array):
        return "BYTES"
    return datatype_of(_little_endian(array).dtype)


def _little_endian(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder == ">":
        return array.astype(array.dtype.newbyteorder("<"))
    return array


def as_sendable(inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inputs as arrays; str/bytes arrays and lists of strings become BYTES object arrays."""
    out = {}
    for key, value in inputs.items():
        array = np.asarray(value) if not isinstance(value, np.ndarray) else value
        if array.dtype.kind in "OSU":
            array = bytes_tensors.as_bytes_array(array, f"input {key!r}")
        out[key] = array
    return out
