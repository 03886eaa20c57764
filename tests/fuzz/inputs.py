"""Inputs for the fuzz targets: a valid seed per target, and hypothesis strategies
that make near-valid inputs (structures with hostile values, mutated seeds) as well
as arbitrary bytes."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import yaml
from hypothesis import strategies as st
from safetensors.numpy import save

from smss.spec import DATATYPES

WORDS = [
    "name", "datatype", "shape", "data", "parameters", "binary_data_size", "binary_data",
    "binary_data_output", "shared_memory_region", "classification", "inputs", "outputs", "id",
    "x", "flag", "n", "u", "h", "y", "z", "stages", "function", "state", "retries", "timeout_s",
    "version", "spec", "source", "weights_sha256", "entrypoint", "runtime", "session", "wait",
    "durable", "from", "dtype", "data_offsets", "__metadata__",
]  # fmt: skip
#: Tokens spliced into seeds: numbers at the edges of every type, JSON and YAML syntax.
TOKENS = [
    b"-1", b"0", b"1e999", b"-1e999", b"NaN", b"Infinity", b"4294967296", b"18446744073709551616",
    b"9223372036854775808", b"-9223372036854775809", b"1.5", b"null", b"true", b"[", b"]", b"{",
    b"}", b'"', b",", b":", b"\\u0000", b"\\ud800", b"\xff", b"\xc3", b"&a", b"*a", b"!!python/object",
    b"!!binary", b"<<", b"- ", b"? ", b"\n", b"\t", b"\x00" * 8, b"\xff" * 8,
]  # fmt: skip

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**65), 2**65)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([*DATATYPES, "BYTES", *WORDS])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=16,
)
SHAPES = st.lists(st.integers(-2, 5) | st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64]), max_size=9)
NUMBERS = st.integers(-(2**64), 2**65) | st.floats() | st.booleans()


@st.composite
def nested_data(draw: st.DrawFn) -> object:
    flat = draw(st.lists(NUMBERS, max_size=12))
    depth = draw(st.integers(0, 3))
    data: object = flat
    for _ in range(depth):
        data = [data] * draw(st.integers(1, 3))
    return data


TENSOR = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["x", "flag", "n", "u", "h", "", "y"]) | JSON_VALUES,
        "datatype": st.sampled_from([*DATATYPES, "BYTES", "bad"]) | JSON_VALUES,
        "shape": SHAPES | JSON_VALUES,
        "data": nested_data() | JSON_VALUES,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "binary_data", "shared_memory_region", "other"]),
            st.integers(-1, 80) | JSON_VALUES,
        )
        | JSON_VALUES,
    },
)
REQUEST = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(TENSOR, max_size=6) | JSON_VALUES,
        "outputs": st.lists(TENSOR, max_size=3) | JSON_VALUES,
        "id": st.text(max_size=4) | JSON_VALUES,
        "parameters": st.dictionaries(st.just("binary_data_output"), JSON_VALUES) | JSON_VALUES,
    },
)


# --- seeds ---------------------------------------------------------------------------------


def _json_request() -> bytes:
    return msgspec.json.encode(
        {
            "id": "r1",
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [[0.5] * 4, [1.5] * 4]},
                {"name": "flag", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                {"name": "n", "datatype": "INT64", "shape": [3], "data": [1, -2, 2**62]},
                {"name": "u", "datatype": "UINT64", "shape": [1, 2], "data": [2**64 - 1, 0]},
                {"name": "h", "datatype": "FP16", "shape": [1], "data": [65504.0]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )


def binary_request() -> tuple[bytes, int]:
    """A body in the binary extension's layout (as tritonclient writes it) and its header length."""
    arrays = {
        "x": np.arange(8, dtype=np.float32).reshape(2, 4),
        "flag": np.array([True, False]),
        "n": np.array([7], dtype=np.int64),
        "u": np.array([[1, 2]], dtype=np.uint64),
        "h": np.array([1.5], dtype=np.float16),
    }
    datatype = {v: k for k, v in DATATYPES.items()}
    inputs = [
        {
            "name": k,
            "datatype": datatype[a.dtype],
            "shape": list(a.shape),
            "parameters": {"binary_data_size": a.nbytes},
        }
        for k, a in arrays.items()
    ]
    header = msgspec.json.encode({"inputs": inputs, "parameters": {"binary_data_output": True}})
    return header + b"".join(a.tobytes() for a in arrays.values()), len(header)


def _workflow() -> dict[str, Any]:
    return {
        "name": "wf",
        "version": "2",
        "stages": [
            {"name": "a", "function": "f", "inputs": {"x": "request.x"}},
            {"name": "b", "function": "g", "inputs": {"h": "a.y"}, "state": True, "retries": 1},
        ],
        "outputs": {"out": "b.z"},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    }


def _deploy() -> bytes:
    spec = {
        "name": "m",
        "entrypoint": "m.py:M",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "batching": {"max_batch_size": 8, "batch_wait_ms": 2},
    }
    return msgspec.json.encode({"spec": spec, "source": "print(1)", "weights_sha256": "ab" * 32})


def _safetensors() -> bytes:
    return save(
        {
            "w": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b": np.array([1, 2], dtype=np.int64),
            "e": np.zeros((0, 3), dtype=np.float16),
        },
        metadata={"format": "np"},
    )


def _yaml_with_aliases() -> bytes:
    return b"""\
name: wf
version: 2
stages:
  - &first {name: a, function: f, inputs: &in {x: request.x}}
  - {name: b, function: f, inputs: *in}
outputs: {out: b.y, again: a.y}
"""


BINARY, HEADER_LEN = binary_request()
SEEDS: dict[str, list[bytes]] = {
    "infer_json": [_json_request()],
    "infer_binary": [bytes([1]) + HEADER_LEN.to_bytes(2, "little") + BINARY, bytes([3]) + _json_request()],
    "tensor_list": [msgspec.json.encode(msgspec.json.decode(_json_request())["inputs"])],
    "deploy_body": [_deploy()],
    "run_body": [
        b'{"inputs": '
        + msgspec.json.encode(msgspec.json.decode(_json_request())["inputs"])
        + b', "session": "s", "wait": false, "durable": false}'
    ],
    "replay_body": [b'{"from": "a", "wait": true}'],
    "workflow_json": [msgspec.json.encode(_workflow())],
    "workflow_yaml": [yaml.safe_dump(_workflow()).encode(), _yaml_with_aliases()],
    "safetensors": [_safetensors()],
}


# --- strategies ----------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level edits: flips, insertions of hostile tokens, deletions,
    duplications and a cut."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 4))
        if op == 0 and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == 1:
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif op == 2:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == 3:
            data[at:at] = data[at : at + draw(st.integers(1, 32))]
        else:
            data[at:at] = draw(st.binary(max_size=8))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def edited(draw: st.DrawFn, value: Any) -> Any:
    """``value`` (decoded JSON) with one to three nodes replaced by hostile values or deleted:
    near-valid inputs that get past the first checks to the deeper ones."""
    value = msgspec.json.decode(msgspec.json.encode(value))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        parent, key = draw(_node(value))
        if parent is None:
            return draw(JSON_VALUES)
        if draw(st.integers(0, 4)) == 0:
            del parent[key]
        else:
            parent[key] = draw(JSON_VALUES | NUMBERS | SHAPES)
    return value


@st.composite
def _node(draw: st.DrawFn, value: Any) -> tuple[Any, Any]:
    """A (container, key) pair somewhere in ``value``; (None, None) for the root itself."""
    parent, key = None, None
    node = value
    while isinstance(node, dict | list) and node and draw(st.integers(0, 3)) > 0:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, draw(st.sampled_from(keys))
        node = node[key]
    return parent, key


def _json(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return strategy.map(_encode)


def _encode(value: object) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (OverflowError, TypeError):  # ints past 64 bits: msgspec refuses to encode them
        import json

        return json.dumps(value).encode()


@st.composite
def binary_requests(draw: st.DrawFn) -> bytes:
    """Infer bodies with a binary tail, in the target's framing (first byte: header mode)."""
    request = draw(REQUEST)
    header = _encode(request)
    tail = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["exact", "off"]))
    length = len(header) if framing == "exact" else draw(st.integers(0, 2**16 - 1))
    return bytes([1]) + length.to_bytes(2, "little") + header + tail


@st.composite
def safetensors_images(draw: st.DrawFn) -> bytes:
    """A header with entries whose fields are drawn (often wrong), and some data."""
    entries = draw(
        st.dictionaries(
            st.text(max_size=6) | st.just("__metadata__"),
            st.fixed_dictionaries(
                {},
                optional={
                    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "X"]) | JSON_VALUES,
                    "shape": SHAPES | JSON_VALUES,
                    "data_offsets": st.lists(st.integers(-2, 80) | st.just(2**64), max_size=3) | JSON_VALUES,
                },
            )
            | JSON_VALUES,
            max_size=4,
        )
        | JSON_VALUES
    )
    header = _encode(entries)
    declared = len(header) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
    return declared.to_bytes(8, "little") + header + draw(st.binary(max_size=96))


@st.composite
def yaml_documents(draw: st.DrawFn) -> bytes:
    workflow: dict[str, Any] = _workflow()
    for key in draw(st.lists(st.sampled_from(sorted(workflow)), max_size=3)):
        workflow[key] = draw(JSON_VALUES)
    try:
        text = yaml.safe_dump(workflow)
    except yaml.YAMLError:
        text = "{}"
    return (
        text.encode()
        + draw(st.sampled_from(["", "x: &a [*a]\n", "y: !!python/object:os.system {}\n"])).encode()
    )


def workflow_structures() -> st.SearchStrategy[Any]:
    stage = st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["a", "b", "request", "a.b", ""]) | JSON_VALUES,
            "function": st.sampled_from(["f", "g"]) | JSON_VALUES,
            "inputs": st.dictionaries(st.sampled_from(["x", "h"]), st.sampled_from(["request.x", "a.y", "b"]))
            | JSON_VALUES,
            "state": JSON_VALUES,
            "retries": st.integers(-1, 12) | JSON_VALUES,
            "timeout_s": st.floats() | JSON_VALUES,
        },
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["wf", "", "../x", "a" * 200]) | JSON_VALUES,
            "stages": st.lists(stage, max_size=4) | JSON_VALUES,
            "outputs": st.dictionaries(st.text(max_size=3), st.sampled_from(["a.y", "b.z", "x"]))
            | JSON_VALUES,
            "inputs": st.lists(TENSOR, max_size=3) | JSON_VALUES,
            "version": JSON_VALUES,
        },
    )


def deploy_structures() -> st.SearchStrategy[Any]:
    seed = msgspec.json.decode(_deploy())
    return st.fixed_dictionaries(
        {},
        optional={
            "spec": st.fixed_dictionaries(
                {k: st.just(v) for k, v in seed["spec"].items()},
                optional={k: JSON_VALUES for k in ("runtime", "scaling", "resources", "weights", "version")},
            )
            | JSON_VALUES,
            "source": st.text(max_size=8) | JSON_VALUES,
            "weights_sha256": JSON_VALUES,
        },
    )


def _edited_json(name: str) -> st.SearchStrategy[bytes]:
    return _json(edited(msgspec.json.decode(SEEDS[name][0])))


def _edited_yaml() -> st.SearchStrategy[bytes]:
    return edited(_workflow()).map(lambda v: yaml.safe_dump(v).encode())


def _edited_safetensors() -> st.SearchStrategy[bytes]:
    image = SEEDS["safetensors"][0]
    length = int.from_bytes(image[:8], "little")
    data = image[8 + length :]

    def frame(header: Any) -> bytes:
        text = _encode(header)
        return len(text).to_bytes(8, "little") + text + data

    return edited(msgspec.json.decode(image[8 : 8 + length])).map(frame)


def _anything(name: str, *structured: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(*structured, mutated(SEEDS[name]), st.binary(max_size=256))


#: A strategy of raw inputs per target.
STRATEGIES: dict[str, st.SearchStrategy[bytes]] = {
    "infer_json": _anything("infer_json", _json(REQUEST), _edited_json("infer_json")),
    "infer_binary": _anything("infer_binary", binary_requests()),
    "tensor_list": _anything(
        "tensor_list", _json(st.lists(TENSOR, max_size=5) | JSON_VALUES), _edited_json("tensor_list")
    ),
    "deploy_body": _anything("deploy_body", _json(deploy_structures()), _edited_json("deploy_body")),
    "run_body": _anything(
        "run_body",
        _json(
            st.fixed_dictionaries(
                {},
                optional={
                    "inputs": st.lists(TENSOR, max_size=3) | JSON_VALUES,
                    **dict.fromkeys(("session", "wait", "timeout_s", "durable"), JSON_VALUES),
                },
            )
        ),
        _edited_json("run_body"),
    ),
    "replay_body": _anything(
        "replay_body", _json(st.dictionaries(st.sampled_from(["from", "wait"]), JSON_VALUES))
    ),
    "workflow_json": _anything("workflow_json", _json(workflow_structures()), _edited_json("workflow_json")),
    "workflow_yaml": _anything("workflow_yaml", yaml_documents(), _edited_yaml()),
    "safetensors": _anything("safetensors", safetensors_images(), _edited_safetensors()),
}


def _deep(prefix: bytes, opener: bytes = b"[", depth: int = 100_000, suffix: bytes = b"") -> bytes:
    return prefix + opener * depth + suffix


def _st(length: int, header: bytes, data: bytes = b"") -> bytes:
    return length.to_bytes(8, "little") + header + data


_TENSOR = b'{"name":"x","datatype":"FP32","shape":[1,4],"data":'
#: Hand-made hostile inputs, run on every test run: deep nesting, aliases, pickle tags,
#: sizes past the data, overflowing shapes.
HOSTILE: dict[str, list[bytes]] = {
    "infer_json": [
        _deep(b'{"inputs":[' + _TENSOR, suffix=b"]}]}"),
        _deep(b'{"unknown":'),
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[4294967296,4294967296],"data":[]}]}',
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[-1,4],"data":[]}]}',
        b'{"inputs":[' + _TENSOR + b"[NaN,Infinity,-Infinity,1e999]}]}",
        b'{"inputs":[' + _TENSOR + b'[1,2,3,4]}], "id": "\xff\xfe"}',
        b"[]",
        b"",
    ],
    "infer_binary": [
        bytes([1]) + (2**16 - 1).to_bytes(2, "little") + b'{"inputs":[]}',
        bytes([1]) + (10).to_bytes(2, "little") + b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],'
        b'"parameters":{"binary_data_size":18446744073709551615}}]}',
        bytes([2 | (3 << 5)]) + b"-10" + b"{}",
    ],
    "tensor_list": [_deep(b""), _deep(b"[" + _TENSOR, suffix=b"]}]"), b"{}", b"null"],
    "deploy_body": [_deep(b'{"spec":'), _deep(b'{"spec":{"x":'), b'{"spec":null,"source":"\xc3"}'],
    "run_body": [_deep(b'{"inputs":'), _deep(b'{"inputs":[' + _TENSOR, suffix=b"]}]}"), b'{"inputs":1e999}'],
    "replay_body": [_deep(b'{"from":'), b'{"from":"\\ud800"}'],
    "workflow_json": [_deep(b""), _deep(b'{"name":"a","stages":'), b'{"name":"a","stages":[],"outputs":{}}'],
    "workflow_yaml": [
        _deep(b""),
        _deep(b"a: ", depth=5000),
        b"- " * 50_000,
        b"a: &a [*a]",
        b"? [a]\n: b",
        b"name: !!python/object/apply:os.system [ls]",
        b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        b"e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
        b"name: wf\nversion: 1e400\noutputs: {y: a.y}\n"
        b"stages: [{name: a, function: f, inputs: {x: request.x}, timeout_s: .nan}]\n",
    ],
    "safetensors": [
        _st(10**6, b"{"),
        _st(20, _deep(b'{"a":', depth=12)),
        _st(2**64 - 1, b"{}"),
        _st(len(b'{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'),
            b'{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'),
        _st(len(b'{"w":{"dtype":"F32","shape":[-1,-4],"data_offsets":[0,16]}}'),
            b'{"w":{"dtype":"F32","shape":[-1,-4],"data_offsets":[0,16]}}', b"\0" * 16),
    ],
}  # fmt: skip
