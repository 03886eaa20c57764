"""Workflow definitions: validation against function specs, order, hashing, YAML/JSON decoding."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from hypothesis import given, settings
from hypothesis import strategies as st

from smss.errors import InvalidSpec
from smss.spec import FunctionSpec, TensorSpec
from smss.workflow.builder import Workflow
from smss.workflow.spec import (
    StageSpec,
    WorkflowSpec,
    decode_workflow,
    dependencies,
    load_yaml,
    spec_hash,
    state_tensors,
    topological_order,
    validate_workflow,
)

#: A tensor declaration: an FP32 shape, or (datatype, shape).
Decl = list[int] | tuple[str, list[int]]


def fn(name: str, inputs: dict[str, Decl], outputs: dict[str, Decl]) -> FunctionSpec:
    def tensors(decls: dict[str, Decl]) -> tuple[TensorSpec, ...]:
        out = []
        for n, d in decls.items():
            datatype, shape = ("FP32", d) if isinstance(d, list) else d
            out.append(TensorSpec(n, datatype, tuple(shape)))
        return tuple(out)

    return FunctionSpec(name, tensors(inputs), tensors(outputs), "model.py:Model").validate()


FUNCTIONS = {
    f.name: f
    for f in (
        fn("enc", {"frame": [-1, 3, 8, 8]}, {"features": [-1, 16]}),
        fn("rnn", {"features": [-1, 16], "h": [-1, 4]}, {"h": [-1, 4]}),
        fn("head", {"h": [-1, 4]}, {"action": [-1, 2]}),
        fn("add", {"a": [-1, 16], "b": [-1, 16]}, {"sum": [-1, 16]}),
        fn("wide", {"x": [-1, 32]}, {"y": [-1, 32]}),
        fn("fixed", {"x": [2, 16]}, {"y": [2, 16]}),
        fn("ints", {"x": ("INT64", [-1, 16])}, {"y": ("INT64", [-1, 16])}),
        fn("flat", {"x": [-1]}, {"y": [-1]}),
        fn("bad_state", {"features": [-1, 16], "c": [-1, 4]}, {"h": [-1, 4]}),
        fn("odd_state", {"features": [-1, 16], "h": [-1, 4]}, {"h": [-1, 5]}),
    )
}


def stage(name: str, function: str, inputs: dict[str, str], **kw: Any) -> StageSpec:
    return StageSpec(name=name, function=function, inputs=inputs, **kw)


def behavior(**changes: Any) -> WorkflowSpec:
    spec = WorkflowSpec(
        name="behavior",
        stages=(
            stage("perceive", "enc", {"frame": "request.frame"}),
            stage("track", "rnn", {"features": "perceive.features"}, state=True),
            stage("respond", "head", {"h": "track.h"}),
        ),
        outputs={"action": "respond.action"},
    )
    return msgspec.structs.replace(spec, **changes)


def with_stage(spec: WorkflowSpec, index: int, **changes: Any) -> WorkflowSpec:
    stages = list(spec.stages)
    stages[index] = msgspec.structs.replace(stages[index], **changes)
    return msgspec.structs.replace(spec, stages=tuple(stages))


def rejected(spec: WorkflowSpec, match: str) -> InvalidSpec:
    with pytest.raises(InvalidSpec, match=match) as info:
        validate_workflow(spec, FUNCTIONS)
    # Raised "from None": the message is the whole story, with no chained traceback.
    assert info.value.__cause__ is None
    return info.value


# -- valid definitions ---------------------------------------------------------------------------


def test_a_valid_workflow_gets_its_request_inputs_inferred() -> None:
    spec = validate_workflow(behavior(), FUNCTIONS)
    assert spec.inputs == (TensorSpec("frame", "FP32", (-1, 3, 8, 8)),)
    assert msgspec.structs.replace(spec, inputs=()) == behavior()
    assert validate_workflow(spec, FUNCTIONS) == spec  # idempotent


def test_declared_request_inputs_are_kept() -> None:
    declared = (TensorSpec("frame", "FP32", (1, 3, 8, 8)),)
    assert validate_workflow(behavior(inputs=declared), FUNCTIONS).inputs == declared


def test_inferred_inputs_merge_every_use_to_the_most_specific_shape() -> None:
    spec = WorkflowSpec(
        "merge",
        stages=(
            stage("a", "add", {"a": "request.x", "b": "request.x"}),
            stage("b", "fixed", {"x": "request.x"}),
        ),
        outputs={"y": "b.y"},
    )
    assert validate_workflow(spec, FUNCTIONS).inputs == (TensorSpec("x", "FP32", (2, 16)),)


def test_state_tensors_are_the_unmapped_inputs_of_a_state_stage() -> None:
    spec = behavior()
    assert state_tensors(spec.stages[1], FUNCTIONS["rnn"]) == (TensorSpec("h", "FP32", (-1, 4)),)
    assert state_tensors(spec.stages[0], FUNCTIONS["enc"]) == ()


def test_unknown_dims_match_on_either_side() -> None:
    spec = WorkflowSpec(
        "dims",
        stages=(stage("a", "fixed", {"x": "request.x"}), stage("b", "add", {"a": "a.y", "b": "a.y"})),
        outputs={"s": "b.sum"},
    )
    validate_workflow(spec, FUNCTIONS)


def test_limits_are_inclusive() -> None:
    spec = with_stage(behavior(), 0, retries=0, timeout_s=3600.0)
    spec = with_stage(spec, 1, retries=10, timeout_s=0.001)
    validate_workflow(spec, FUNCTIONS)
    chain = [stage("s0", "wide", {"x": "request.x"})]
    chain += [stage(f"s{i}", "wide", {"x": f"s{i - 1}.y"}) for i in range(1, 64)]
    validate_workflow(WorkflowSpec("long", tuple(chain), {"y": "s63.y"}), FUNCTIONS)


# -- rejections ----------------------------------------------------------------------------------


REJECTIONS: list[tuple[str, Callable[[], WorkflowSpec], str]] = [
    ("workflow name", lambda: behavior(name="bad name"), "invalid workflow name 'bad name'"),
    ("workflow version", lambda: behavior(version="../1"), "invalid version name"),
    ("stage name", lambda: with_stage(behavior(), 1, name="tr/ack"), "invalid stage name 'tr/ack'"),
    ("dotted stage name", lambda: with_stage(behavior(), 1, name="tr.ack"), "may not contain '.'"),
    ("reserved stage name", lambda: with_stage(behavior(), 0, name="request"), "nor be 'request'"),
    (
        "duplicate stage",
        lambda: with_stage(behavior(), 2, name="track", inputs={"h": "perceive.features"}),
        "duplicate stage name 'track'",
    ),
    (
        "unknown function",
        lambda: with_stage(behavior(), 2, function="nope"),
        "stage 'respond': unknown function 'nope'",
    ),
    (
        "unknown stage",
        lambda: with_stage(behavior(), 2, inputs={"h": "tracker.h"}),
        "stage 'respond' input 'h': 'tracker.h' names unknown stage 'tracker'",
    ),
    (
        "unknown stage output",
        lambda: with_stage(behavior(), 2, inputs={"h": "track.hidden"}),
        r"stage 'respond' input 'h': stage 'track' \(function 'rnn'\) has no output 'hidden' "
        r"\(its outputs: h\)",
    ),
    (
        "malformed source",
        lambda: with_stage(behavior(), 2, inputs={"h": "track"}),
        "stage 'respond' input 'h': source 'track' must be 'request.<input>' or '<stage>.<output>'",
    ),
    (
        "unmapped input",
        lambda: with_stage(behavior(), 1, state=False),
        "stage 'track': unmapped input 'h' of function 'rnn'",
    ),
    (
        "state input without output",
        lambda: with_stage(behavior(), 1, function="bad_state"),
        "stage 'track': state input 'c' of function 'bad_state' has no output of the same name",
    ),
    (
        "state declared but none",
        lambda: with_stage(behavior(), 1, inputs={"features": "perceive.features", "h": "request.h"}),
        "stage 'track' declares state=True but maps every input of function 'rnn'",
    ),
    (
        "state read and written differently",
        lambda: with_stage(behavior(), 1, function="odd_state"),
        r"stage 'track': state 'h' of function 'odd_state' is read as FP32 \[-1, 4\] "
        r"but written as FP32 \[-1, 5\]",
    ),
    (
        "mapped name not an input",
        lambda: with_stage(behavior(), 2, inputs={"h": "track.h", "hh": "track.h"}),
        r"stage 'respond': 'hh' is not an input of function 'head' \(its inputs: h\)",
    ),
    (
        "dim mismatch",
        lambda: with_stage(behavior(), 1, function="wide", state=False, inputs={"x": "perceive.features"}),
        r"stage 'track' input 'x': 'perceive.features' is FP32 \[-1, 16\] "
        r"but function 'wide' takes FP32 \[-1, 32\]",
    ),
    (
        "datatype mismatch",
        lambda: with_stage(behavior(), 1, function="ints", state=False, inputs={"x": "perceive.features"}),
        r"'perceive.features' is FP32 \[-1, 16\] but function 'ints' takes INT64 \[-1, 16\]",
    ),
    (
        "rank mismatch",
        lambda: with_stage(behavior(), 1, function="flat", state=False, inputs={"x": "perceive.features"}),
        r"'perceive.features' is FP32 \[-1, 16\] but function 'flat' takes FP32 \[-1\]",
    ),
    (
        "request input feeding incompatible specs",
        lambda: WorkflowSpec(
            "r",
            (stage("a", "wide", {"x": "request.x"}), stage("b", "add", {"a": "request.x", "b": "request.x"})),
            {"y": "a.y"},
        ),
        r"request input 'x' feeds stage 'a' input 'x' as FP32 \[-1, 32\] and stage 'b' input 'a' as "
        r"FP32 \[-1, 16\]: incompatible",
    ),
    (
        # Each use is compatible with the next, but no tensor is [2, 16] and [-1, 32].
        "request input incompatible only through a merge",
        lambda: WorkflowSpec(
            "r",
            (stage("a", "fixed", {"x": "request.x"}), stage("b", "wide", {"x": "request.x"})),
            {"y": "a.y"},
        ),
        "request input 'x' feeds stage 'a' input 'x' as FP32 \\[2, 16\\] and stage 'b' input 'x'",
    ),
    (
        "declared request input incompatible",
        lambda: behavior(inputs=(TensorSpec("frame", "FP32", (1, 3, 8, 9)),)),
        r"request input 'frame' is declared FP32 \[1, 3, 8, 9\] but stage 'perceive' input 'frame' "
        r"takes FP32 \[-1, 3, 8, 8\]",
    ),
    (
        "undeclared request input",
        lambda: behavior(inputs=(TensorSpec("image", "FP32", (1, 3, 8, 8)),)),
        "stage 'perceive' input 'frame' reads request input 'frame', which the workflow does not declare",
    ),
    (
        "declared request input unused",
        lambda: behavior(inputs=(TensorSpec("frame", "FP32", (1, 3, 8, 8)), TensorSpec("z", "FP32", (1,)))),
        "request input 'z' feeds no stage",
    ),
    (
        "duplicate request inputs",
        lambda: behavior(inputs=(TensorSpec("frame", "FP32", (1, 3, 8, 8)),) * 2),
        "duplicate request input names",
    ),
    (
        "invalid request input",
        lambda: behavior(inputs=(TensorSpec("frame", "FP33", (1, 3, 8, 8)),)),
        "unsupported datatype 'FP33'",
    ),
    (
        "output of unknown stage",
        lambda: behavior(outputs={"action": "reply.action"}),
        "workflow output 'action': 'reply.action' names unknown stage 'reply'",
    ),
    (
        "unknown output of a stage",
        lambda: behavior(outputs={"action": "respond.act"}),
        "workflow output 'action': stage 'respond' .* has no output 'act'",
    ),
    (
        "output from the request",
        lambda: behavior(outputs={"frame": "request.frame"}),
        "output 'frame' must come from a stage",
    ),
    (
        "malformed output",
        lambda: behavior(outputs={"action": "respond"}),
        "output 'action': source 'respond'",
    ),
    ("no stages", lambda: behavior(stages=()), "workflow 'behavior' has no stages"),
    (
        "too many stages",
        lambda: WorkflowSpec(
            "long",
            (
                stage("s0", "wide", {"x": "request.x"}),
                *(stage(f"s{i}", "wide", {"x": f"s{i - 1}.y"}) for i in range(1, 65)),
            ),
            {"y": "s64.y"},
        ),
        "workflow 'long' has 65 stages; at most 64 are allowed",
    ),
    (
        "negative retries",
        lambda: with_stage(behavior(), 1, retries=-1),
        "stage 'track': retries -1 must be 0-10",
    ),
    (
        "too many retries",
        lambda: with_stage(behavior(), 1, retries=11),
        "stage 'track': retries 11 must be 0-10",
    ),
    (
        "zero timeout",
        lambda: with_stage(behavior(), 0, timeout_s=0.0),
        r"stage 'perceive': timeout_s 0.0 must be in \(0, 3600\]",
    ),
    ("negative timeout", lambda: with_stage(behavior(), 0, timeout_s=-1.0), "timeout_s -1.0 must be"),
    ("long timeout", lambda: with_stage(behavior(), 0, timeout_s=3600.5), "timeout_s 3600.5 must be"),
    ("nan timeout", lambda: with_stage(behavior(), 0, timeout_s=math.nan), "timeout_s nan must be"),
    (
        "wrong type",
        lambda: with_stage(behavior(), 0, retries="2"),
        r"invalid workflow spec: Expected `int`, got `str`",
    ),
    ("bool as int", lambda: with_stage(behavior(), 0, retries=True), "Expected `int`, got `bool`"),
]


@pytest.mark.parametrize(
    ("spec", "match"), [(s, m) for _, s, m in REJECTIONS], ids=[i for i, _, _ in REJECTIONS]
)
def test_rejections_name_what_is_wrong(spec: Callable[[], WorkflowSpec], match: str) -> None:
    rejected(spec(), match)


def test_a_cycle_is_named() -> None:
    spec = behavior(
        stages=(
            stage("perceive", "add", {"a": "request.x", "b": "respond.sum"}),
            stage("track", "add", {"a": "perceive.sum", "b": "request.x"}),
            stage("respond", "add", {"a": "track.sum", "b": "request.x"}),
        ),
        outputs={"s": "respond.sum"},
    )
    rejected(spec, "workflow 'behavior' has a cycle: perceive -> track -> respond -> perceive")
    with pytest.raises(InvalidSpec, match="has a cycle"):
        topological_order(spec)


def test_a_stage_reading_its_own_output_is_a_cycle() -> None:
    spec = with_stage(behavior(), 2, function="wide", inputs={"x": "respond.y"})
    spec = msgspec.structs.replace(spec, outputs={"y": "respond.y"})
    rejected(spec, "has a cycle: respond -> respond")


# -- order ---------------------------------------------------------------------------------------


def test_topological_order_and_dependencies() -> None:
    spec = WorkflowSpec(
        "diamond",
        stages=(
            stage("join", "add", {"a": "left.y", "b": "right.y"}),
            stage("right", "fixed", {"x": "src.y"}),
            stage("left", "fixed", {"x": "src.y"}),
            stage("src", "fixed", {"x": "request.x"}),
            stage("aside", "fixed", {"x": "request.x"}),
        ),
        outputs={"s": "join.sum"},
    )
    validate_workflow(spec, FUNCTIONS)
    assert dependencies(spec) == {
        "join": {"left", "right"},
        "right": {"src"},
        "left": {"src"},
        "src": set(),
        "aside": set(),
    }
    # Ready stages come in declaration order: deterministic.
    assert topological_order(spec) == ["src", "aside", "right", "left", "join"]
    assert topological_order(validate_workflow(behavior(), FUNCTIONS)) == ["perceive", "track", "respond"]


@st.composite
def dags(draw: st.DrawFn) -> tuple[WorkflowSpec, dict[str, FunctionSpec], dict[str, set[str]]]:
    """A random DAG: stage i may read any earlier stage; declared in a shuffled order."""
    n = draw(st.integers(1, 12))
    deps = [draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set() for i in range(n)]
    perm = draw(st.permutations(range(n)))
    functions, stages = {}, []
    for i in perm:
        ins = {f"in{j}": f"s{j}.out" for j in sorted(deps[i])} or {"x": "request.x"}
        functions[f"f{i}"] = fn(f"f{i}", {k: [-1, 4] for k in ins}, {"out": [-1, 4]})
        stages.append(stage(f"s{i}", f"f{i}", ins))
    spec = WorkflowSpec("dag", tuple(stages), {"y": f"s{n - 1}.out"})
    return spec, functions, {f"s{i}": {f"s{j}" for j in deps[i]} for i in range(n)}


@settings(max_examples=60, deadline=None)
@given(dags())
def test_random_dags_validate_and_order_respects_dependencies(
    case: tuple[WorkflowSpec, dict[str, FunctionSpec], dict[str, set[str]]],
) -> None:
    spec, functions, deps = case
    validated = validate_workflow(spec, functions)
    assert validated.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert dependencies(spec) == deps
    order = topological_order(spec)
    assert sorted(order) == sorted(deps)
    position = {name: i for i, name in enumerate(order)}
    for name, needs in deps.items():
        assert all(position[d] < position[name] for d in needs)


@settings(max_examples=60, deadline=None)
@given(dags(), st.data())
def test_random_graphs_with_a_cycle_are_rejected(
    case: tuple[WorkflowSpec, dict[str, FunctionSpec], dict[str, set[str]]], data: st.DataObject
) -> None:
    spec, functions, deps = case
    # A back edge: stage i reads a stage j that is i itself or (transitively) reads i.
    i = data.draw(st.integers(0, len(deps) - 1))
    downstream = {f"s{i}"}
    for k in range(i + 1, len(deps)):  # a stage reads only lower-numbered ones
        if deps[f"s{k}"] & downstream:
            downstream.add(f"s{k}")
    j = data.draw(st.sampled_from(sorted(downstream)))
    index = next(k for k, s in enumerate(spec.stages) if s.name == f"s{i}")
    target = spec.stages[index]
    inputs = {**target.inputs, "back": f"{j}.out"}
    functions[target.function] = fn(target.function, {k: [-1, 4] for k in inputs}, {"out": [-1, 4]})
    spec = with_stage(spec, index, inputs=inputs)
    with pytest.raises(InvalidSpec, match="has a cycle: ") as info:
        validate_workflow(spec, functions)
    # The named cycle is real: each stage feeds the next, and it closes.
    cycle = re.sub(r".*has a cycle: ", "", str(info.value)).split(" -> ")
    assert cycle[0] == cycle[-1]
    all_deps = dependencies(spec)
    for feeder, reader in itertools.pairwise(cycle):
        assert feeder in all_deps[reader]


# -- hashing -------------------------------------------------------------------------------------


def test_spec_hash_is_stable() -> None:
    spec = validate_workflow(behavior(), FUNCTIONS)
    assert spec_hash(spec) == spec_hash(validate_workflow(behavior(), FUNCTIONS))
    assert spec_hash(spec) == spec_hash(decode_workflow(msgspec.json.encode(spec)))
    # Pinned: a definition's hash is stored in the log and must not drift between releases.
    assert spec_hash(spec) == "4ff313c699bf367fdce7129c647ff9fd0b80d8b933083e0a81f653db79129372"


def test_spec_hash_ignores_dict_order_and_int_timeouts() -> None:
    a = behavior(
        stages=(stage("s", "add", {"a": "request.x", "b": "request.y"}, timeout_s=5.0),),
        outputs={"o": "s.sum"},
    )
    b = behavior(
        stages=(stage("s", "add", {"b": "request.y", "a": "request.x"}, timeout_s=5),), outputs={"o": "s.sum"}
    )
    assert spec_hash(validate_workflow(a, FUNCTIONS)) != ""
    assert validate_workflow(b, FUNCTIONS).stages[0].timeout_s == 5.0
    # Request inputs are inferred in first-use order, so hash the structure with inputs declared.
    x, y = TensorSpec("x", "FP32", (-1, 16)), TensorSpec("y", "FP32", (-1, 16))
    a, b = (msgspec.structs.replace(s, inputs=(x, y)) for s in (a, b))
    assert spec_hash(validate_workflow(a, FUNCTIONS)) == spec_hash(validate_workflow(b, FUNCTIONS))


@settings(max_examples=30, deadline=None)
@given(dags())
def test_random_dags_survive_json_and_yaml_with_their_hash(
    case: tuple[WorkflowSpec, dict[str, FunctionSpec], dict[str, set[str]]],
) -> None:
    spec = validate_workflow(case[0], case[1])
    via_json = decode_workflow(msgspec.json.encode(spec))
    via_yaml = load_yaml(yaml.safe_dump(msgspec.to_builtins(spec)))
    assert via_json == via_yaml == spec
    assert spec_hash(via_json) == spec_hash(via_yaml) == spec_hash(spec)


CHANGES: list[tuple[str, Callable[[WorkflowSpec], WorkflowSpec]]] = [
    ("name", lambda s: msgspec.structs.replace(s, name="behavior2")),
    ("version", lambda s: msgspec.structs.replace(s, version="2")),
    ("outputs", lambda s: msgspec.structs.replace(s, outputs={"act": "respond.action"})),
    ("inputs", lambda s: msgspec.structs.replace(s, inputs=(TensorSpec("frame", "FP32", (1, 3, 8, 8)),))),
    ("stage name", lambda s: with_stage(s, 2, name="reply")),
    ("stage function", lambda s: with_stage(s, 2, function="head2")),
    ("stage inputs", lambda s: with_stage(s, 2, inputs={"h": "track.h2"})),
    ("stage state", lambda s: with_stage(s, 1, state=False)),
    ("stage retries", lambda s: with_stage(s, 1, retries=3)),
    ("stage timeout", lambda s: with_stage(s, 1, timeout_s=60.5)),
    ("stage order", lambda s: msgspec.structs.replace(s, stages=s.stages[::-1])),
]


@pytest.mark.parametrize("change", [c for _, c in CHANGES], ids=[i for i, _ in CHANGES])
def test_spec_hash_changes_when_anything_changes(change: Callable[[WorkflowSpec], WorkflowSpec]) -> None:
    spec = validate_workflow(behavior(), FUNCTIONS)
    assert spec_hash(change(spec)) != spec_hash(spec)


# -- YAML and JSON -------------------------------------------------------------------------------

BEHAVIOR_YAML = """
name: behavior
version: 2
stages:
  - name: perceive
    function: enc
    inputs: {frame: request.frame}
  - name: track
    function: rnn
    inputs:
      features: perceive.features
    state: true
    retries: 0
    timeout_s: 5
  - name: respond
    function: head
    inputs: {h: track.h}
outputs:
  action: respond.action
inputs:
  - {name: frame, datatype: FP32, shape: [1, 3, 8, 8]}
"""


def test_yaml_definition() -> None:
    spec = load_yaml(BEHAVIOR_YAML)
    assert spec.version == "2"
    assert spec.stages[1] == stage(
        "track", "rnn", {"features": "perceive.features"}, state=True, retries=0, timeout_s=5.0
    )
    assert spec.inputs == (TensorSpec("frame", "FP32", (1, 3, 8, 8)),)
    assert validate_workflow(spec, FUNCTIONS) == spec


def test_yaml_round_trip() -> None:
    spec = validate_workflow(behavior(), FUNCTIONS)
    text = yaml.safe_dump(msgspec.to_builtins(spec), sort_keys=False)
    again = load_yaml(text)
    assert again == spec
    assert spec_hash(again) == spec_hash(spec)


def test_builder_yaml_and_json_agree() -> None:
    built = (
        Workflow("behavior", version="2")
        .input("frame", "FP32", [1, 3, 8, 8])
        .stage("perceive", "enc", inputs={"frame": "request.frame"})
        .stage("track", "rnn", inputs={"features": "perceive.features"}, state=True, retries=0, timeout_s=5)
        .stage("respond", "head", inputs={"h": "track.h"})
        .output("action", "respond.action")
        .spec()
    )
    from_yaml = load_yaml(BEHAVIOR_YAML)
    assert built == from_yaml == decode_workflow(msgspec.json.encode(from_yaml))
    assert spec_hash(built) == spec_hash(from_yaml)


YAML_REJECTIONS = [
    ("syntax", "name: [unclosed\n", r"workflow YAML could not be read: .*\(line \d+, column \d+\)"),
    ("list", "- a\n- b\n", "workflow YAML must be a mapping with name, stages and outputs, not a list"),
    ("scalar", "behavior\n", "must be a mapping .* not a str"),
    ("empty", "", "must be a mapping .* not nothing"),
    (
        "missing field",
        "name: w\nstages: []\n",
        "invalid workflow spec: Object missing required field `outputs`",
    ),
    (
        "unknown field",
        "name: w\nstages: []\noutputs: {}\nowner: me\n",
        "invalid workflow spec: Object contains unknown field `owner`",
    ),
    (
        "unknown stage field",
        "name: w\noutputs: {}\nstages:\n  - {name: a, function: f, inputs: {}, retry: 3}\n",
        r"Object contains unknown field `retry` - at `\$.stages\[0\]`",
    ),
    ("wrong type", "name: w\nstages: 3\noutputs: {}\n", r"Expected `array`, got `int` - at `\$.stages`"),
    ("no stages", "name: w\nstages: []\noutputs: {}\n", "workflow 'w' has no stages"),
    (
        "python object",
        "!!python/object:smss.workflow.spec.WorkflowSpec {name: w}\n",
        "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:",
    ),
    (
        "python apply",
        "name: !!python/object/apply:os.getcwd []\nstages: []\noutputs: {}\n",
        "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.getcwd'",
    ),
    ("python name", "name: !!python/name:os.system\n", "could not determine a constructor"),
    (
        "alias bomb",
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True)
        )
        + "name: *g\n",
        "workflow YAML expands to more than 100000 values",
    ),
    ("recursive alias", "name: w\nstages: &s [*s]\noutputs: {}\n", "expands to more than"),
    ("deep nesting", "name: " + "[" * 5_000, "workflow YAML is nested too deeply"),
]


@pytest.mark.parametrize(
    ("text", "match"), [(t, m) for _, t, m in YAML_REJECTIONS], ids=[i for i, _, _ in YAML_REJECTIONS]
)
def test_bad_yaml_is_refused_with_a_clear_message(text: str, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match) as info:
        load_yaml(text)
    assert info.value.__cause__ is None
    # No "during handling of ..." traceback either.
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert "Traceback" not in str(info.value)


def test_oversized_definitions_are_refused() -> None:
    with pytest.raises(InvalidSpec, match="larger than"):
        load_yaml("#" * (2 << 20))
    with pytest.raises(InvalidSpec, match="larger than"):
        decode_workflow(b" " * (2 << 20))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"{", "workflow spec is not valid JSON"),
        (b"[]", "invalid workflow spec: Expected `object`, got `array`"),
        (b'{"name": "w", "stages": [], "outputs": {}, "extra": 1}', "unknown field `extra`"),
        (b'{"name": "w", "stages": [], "outputs": {}}', "workflow 'w' has no stages"),
        (
            b'{"name": "w", "outputs": {}, '
            b'"stages": [{"name": "a", "function": "f", "inputs": {"x": "nodot"}}]}',
            "stage 'a' input 'x': source 'nodot' must be",
        ),
    ],
)
def test_bad_json_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match):
        decode_workflow(data)


# -- builder -------------------------------------------------------------------------------------


def test_builder_builds_the_spec() -> None:
    wf = Workflow("behavior")
    assert wf.stage("perceive", "enc", inputs={"frame": "request.frame"}) is wf
    wf.stage("track", "rnn", inputs={"features": "perceive.features"}, state=True)
    assert wf.stage("respond", "head", {"h": "track.h"}).output("action", "respond.action") is wf
    assert wf.spec() == behavior()


def test_builder_copies_what_it_is_given() -> None:
    inputs = {"frame": "request.frame"}
    wf = Workflow("w").stage("perceive", "enc", inputs=inputs).output("f", "perceive.features")
    inputs["other"] = "request.other"
    assert wf.spec().stages[0].inputs == {"frame": "request.frame"}


def test_builder_refuses_duplicates_and_checks_structure() -> None:
    wf = Workflow("w").stage("a", "enc", {"frame": "request.frame"}).output("f", "a.features")
    with pytest.raises(InvalidSpec, match="duplicate stage name 'a'"):
        wf.stage("a", "head", {"h": "a.features"})
    with pytest.raises(InvalidSpec, match="output 'f' declared twice"):
        wf.output("f", "a.features")
    with pytest.raises(InvalidSpec, match="request input 'frame' declared twice"):
        wf.input("frame", "FP32", [1]).input("frame", "FP32", [1])
    with pytest.raises(InvalidSpec, match="has no stages"):
        Workflow("empty").spec()
    with pytest.raises(InvalidSpec, match="retries 20 must be 0-10"):
        Workflow("w").stage("a", "enc", {"frame": "request.frame"}, retries=20).spec()


def test_builder_takes_a_model_class() -> None:
    import smss

    @smss.model(
        name="enc", inputs={"frame": ("FP32", [-1, 3, 8, 8])}, outputs={"features": ("FP32", [-1, 16])}
    )
    class Enc:
        def load(self, weights: object) -> None: ...

        def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
            return {}

    spec = Workflow("w").stage("a", Enc, {"frame": "request.frame"}).output("f", "a.features").spec()
    assert spec.stages[0].function == "enc"
    with pytest.raises(InvalidSpec, match=r"not decorated with @smss\.model"):
        Workflow("w").stage("a", int, {})
