"""The request decoders as fuzz targets, shared by the hypothesis properties
(``test_decoders.py``) and ``scripts/fuzz`` (atheris, or hypothesis at length).

Each target takes its input as a client (or a weights file) hands it over and
checks the one property: the input decodes into something well-formed, or the
decoder raises one of our typed errors whose status is a 4xx. Any other
exception escapes the target, and that is a crash.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator

import msgspec
import numpy as np

from smss.api import codec
from smss.api.errors import status_of
from smss.api.http import decode_json
from smss.api.wire import DeployRequest, ReplayRequest, RunRequest
from smss.config import Limits
from smss.errors import SmssError
from smss.node.attach import safetensors_views
from smss.safetensors_header import read_header
from smss.spec import DATATYPES, FunctionSpec, TensorSpec
from smss.workflow.spec import decode_workflow, load_yaml

#: Small limits, so that the fuzzer reaches them.
LIMITS = Limits(max_body_bytes=1 << 20, max_inputs=8, max_tensor_elements=1 << 12, max_json_depth=12)
SPEC = FunctionSpec(
    name="m",
    inputs=(
        TensorSpec("x", "FP32", (-1, 4)),
        TensorSpec("flag", "BOOL", (2,)),
        TensorSpec("n", "INT64", (-1,)),
        TensorSpec("u", "UINT64", (-1, -1)),
        TensorSpec("h", "FP16", (-1,)),
    ),
    outputs=(TensorSpec("y", "FP32", (-1,)), TensorSpec("z", "INT64", (-1,))),
    entrypoint="m.py:M",
)


class Outcome:
    refused = False


@contextlib.contextmanager
def decodes_or_refuses() -> Iterator[Outcome]:
    """The property: a typed error is fine only when it is a client's fault (4xx)."""
    outcome = Outcome()
    try:
        yield outcome
    except SmssError as error:
        status = status_of(error)
        if not 400 <= status < 500:
            raise AssertionError(f"{type(error).__name__} maps to {status}, not a 4xx: {error}") from error
        outcome.refused = True


def _check_arrays(arrays: dict[str, np.ndarray], spec_inputs: tuple[TensorSpec, ...] | None) -> None:
    for array in arrays.values():
        assert isinstance(array, np.ndarray)
        assert array.size <= LIMITS.max_tensor_elements
        assert array.dtype in DATATYPES.values()
    if spec_inputs is not None:
        specs = {t.name: t for t in spec_inputs}
        assert set(arrays) == set(specs)
        for name, array in arrays.items():
            assert array.dtype == DATATYPES[specs[name].datatype]
            assert specs[name].accepts(array.shape)


def infer(body: bytes, header: str | None) -> bool:
    """An infer request: JSON tensors, or the binary extension when ``header`` is given."""
    with decodes_or_refuses() as outcome:
        length = codec.parse_header_length(header)
        decoded = codec.decode_request(body, length, SPEC, LIMITS)
        _check_arrays(decoded.inputs, SPEC.inputs)
        assert {o.name for o in decoded.outputs} <= {"y", "z"}
    return not outcome.refused


def infer_json(body: bytes) -> bool:
    return infer(body, None)


def infer_binary(data: bytes) -> bool:
    """Raw bytes split into a header value and a body, so that a byte fuzzer can reach
    both: the first byte says how the header is made."""
    if not data:
        return infer(b"", None)
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        header, body = None, rest
    elif mode == 1:
        header, body = str(int.from_bytes(rest[:2], "little")), rest[2:]
    elif mode == 2:
        cut = data[0] >> 5
        header, body = rest[:cut].decode("latin-1"), rest[cut:]
    else:  # the whole body is the header: no binary tail
        header, body = str(len(rest)), rest
    return infer(body, header)


def tensor_list(body: bytes) -> bool:
    """An ``inputs`` list with any names (as a workflow run's body carries it)."""
    with decodes_or_refuses() as outcome:
        _check_arrays(codec.decode_tensor_list(body, None, LIMITS, None), None)
    return not outcome.refused


def deploy_body(body: bytes) -> bool:
    with decodes_or_refuses() as outcome:
        request = decode_json(body, DeployRequest)
        request.spec.validate()
    return not outcome.refused


def run_body(body: bytes) -> bool:
    with decodes_or_refuses() as outcome:
        request = decode_json(body, RunRequest)
        _check_arrays(codec.decode_tensor_list(request.inputs, None, LIMITS, None), None)
    return not outcome.refused


def replay_body(body: bytes) -> bool:
    with decodes_or_refuses() as outcome:
        decode_json(body, ReplayRequest)
    return not outcome.refused


def workflow_json(body: bytes) -> bool:
    with decodes_or_refuses() as outcome:
        decode_workflow(body)
    return not outcome.refused


def workflow_yaml(body: bytes) -> bool:
    # As the route reads a YAML body: bytes that are not UTF-8 are replaced, not refused.
    with decodes_or_refuses() as outcome:
        load_yaml(body.decode("utf-8", "replace"))
    return not outcome.refused


def safetensors(data: bytes) -> bool:
    """A weights file: checked at deploy (from the file) and at attach (the segment's image)."""
    with decodes_or_refuses() as deploy:
        header = read_header(io.BytesIO(data), len(data))
    with decodes_or_refuses() as attach:
        views = safetensors_views(memoryview(data))
    if not attach.refused:  # what attaches was accepted at deploy, tensor for tensor
        assert not deploy.refused
        assert [t.name for t in header.tensors] == list(views)
        for t in header.tensors:
            assert views[t.name].shape == t.shape
            assert views[t.name].nbytes == t.end - t.start
    return not attach.refused


#: Every target, by name: each takes one input as raw bytes and says whether it decoded.
TARGETS: dict[str, Callable[[bytes], bool]] = {
    "infer_json": infer_json,
    "infer_binary": infer_binary,
    "tensor_list": tensor_list,
    "deploy_body": deploy_body,
    "run_body": run_body,
    "replay_body": replay_body,
    "workflow_json": workflow_json,
    "workflow_yaml": workflow_yaml,
    "safetensors": safetensors,
}


def encode(value: object) -> bytes:
    return msgspec.json.encode(value)
