"""Workflow definitions: a DAG of stages, each calling one function.

A stage maps each input of its function from a *source*: ``"request.<name>"``
(a tensor of the run's request) or ``"<stage>.<output>"`` (an output of an
earlier stage). A stage with ``state=True`` leaves some inputs unmapped: those
are the session's *state tensors*; the function returns their new values as
outputs of the same names, which the engine writes back to the session.

Decoding (:func:`decode_workflow`, :func:`load_yaml`) checks what a definition
says on its own; :func:`validate_workflow` checks it against the functions it
calls and fills in the request's tensors. The engine runs only validated specs
and identifies a definition in its log by :func:`spec_hash` of the validated
spec.

Stage names may not contain ``.`` (a source is split at its first ``.``) and
may not be ``request``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from smss.errors import InvalidSpec
from smss.spec import FunctionSpec, TensorSpec, check_name

MAX_STAGES = 64
MAX_RETRIES = 10
MAX_TIMEOUT_S = 3600.0
#: A YAML or JSON definition larger than this is refused before parsing.
MAX_DEFINITION_BYTES = 1 << 20
#: YAML aliases can make a small document expand into a huge (or cyclic) one.
_MAX_YAML_NODES = 100_000
REQUEST = "request"


class StageSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One stage: ``inputs`` maps a function input name to its source."""

    name: str
    function: str
    inputs: dict[str, str]
    state: bool = False
    retries: int = 2
    timeout_s: float = 60.0


class WorkflowSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A workflow: ``outputs`` maps a workflow output name to ``"<stage>.<output>"``.

    ``inputs`` are the request's tensors; left empty they are inferred by
    :func:`validate_workflow` from the function inputs they feed.
    """

    name: str
    stages: tuple[StageSpec, ...]
    outputs: dict[str, str]
    inputs: tuple[TensorSpec, ...] = ()
    version: str = "1"


# -- sources -------------------------------------------------------------------------------------


def parse_source(source: str) -> tuple[str, str]:
    """``"perceive.features"`` -> ``("perceive", "features")``; ``"request.x"`` -> ``("request", "x")``."""
    head, dot, tensor = source.partition(".") if isinstance(source, str) else ("", "", "")
    if not dot or not head or not tensor:
        raise InvalidSpec(f"source {source!r} must be 'request.<input>' or '<stage>.<output>'")
    return head, tensor


def state_tensors(stage: StageSpec, function: FunctionSpec) -> tuple[TensorSpec, ...]:
    """The session state a stage reads: its function's inputs the stage leaves unmapped
    (none unless ``stage.state``). The function's outputs of the same names are the new state."""
    if not stage.state:
        return ()
    return tuple(t for t in function.inputs if t.name not in stage.inputs)


def dependencies(spec: WorkflowSpec) -> dict[str, set[str]]:
    """Each stage -> the stages whose outputs it reads (only stages the spec has)."""
    names = {s.name for s in spec.stages}
    deps: dict[str, set[str]] = {}
    for s in spec.stages:
        found = deps.setdefault(s.name, set())
        for source in s.inputs.values():
            head, _, _ = source.partition(".")
            if head in names:
                found.add(head)
    return deps


def topological_order(spec: WorkflowSpec) -> list[str]:
    """Stage names, each after every stage it depends on; ties keep declaration order.

    Raises :class:`InvalidSpec` naming a cycle if there is one.
    """
    deps = dependencies(spec)
    order: list[str] = []
    done: set[str] = set()
    pending = list(deps)
    while pending:
        ready = [n for n in pending if deps[n] <= done]
        if not ready:
            raise InvalidSpec(f"workflow {spec.name!r} has a cycle: {' -> '.join(_find_cycle(deps))}")
        order += ready
        done.update(ready)
        pending = [n for n in pending if n not in done]
    return order


def _find_cycle(deps: Mapping[str, set[str]]) -> list[str]:
    """One cycle of ``deps`` as ``[a, b, ..., a]`` in data-flow order (a feeds b)."""
    colour: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        colour[node] = 1
        path.append(node)
        for dep in sorted(deps.get(node, ())):
            if colour.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                return cycle[::-1]  # path follows "depends on"; report the direction data flows
            if dep not in colour and (found := visit(dep, path)):
                return found
        path.pop()
        colour[node] = 2
        return None

    for start in deps:
        if start not in colour and (found := visit(start, [])):
            return found
    raise AssertionError("no cycle found")  # pragma: no cover - callers check first


# -- hashing and decoding ------------------------------------------------------------------------


def spec_hash(spec: WorkflowSpec) -> str:
    """Hex sha256 of the canonical JSON (every field, dict keys sorted): names one
    definition in the log. Hash the spec :func:`validate_workflow` returned.

    Remembered per spec object (specs are never mutated; every run of a deployed
    workflow hashes the same one), keyed by identity and holding the spec, so a
    reused ``id`` cannot return another spec's hash."""
    entry = _HASHES.get(id(spec))
    if entry is not None and entry[0] is spec:
        return entry[1]
    digest = hashlib.sha256(msgspec.json.encode(spec, order="deterministic")).hexdigest()
    if len(_HASHES) >= 256:
        _HASHES.clear()
    _HASHES[id(spec)] = (spec, digest)
    return digest


_HASHES: dict[int, tuple[WorkflowSpec, str]] = {}


def decode_workflow(data: bytes) -> WorkflowSpec:
    """A spec from JSON, checked on its own (see :func:`check_structure`)."""
    if len(data) > MAX_DEFINITION_BYTES:
        raise InvalidSpec(f"workflow definition is larger than {MAX_DEFINITION_BYTES} bytes")
    try:
        spec = msgspec.json.decode(data, type=WorkflowSpec)
    except msgspec.ValidationError as e:
        raise InvalidSpec(f"invalid workflow spec: {e}") from None
    except msgspec.DecodeError:
        raise InvalidSpec("workflow spec is not valid JSON") from None
    return check_structure(spec)


def load_yaml(text: str) -> WorkflowSpec:
    """A spec from YAML (``yaml.safe_load``: no tags that build Python objects),
    checked on its own (see :func:`check_structure`)."""
    import yaml  # type: ignore[import-untyped,unused-ignore]  # optional: only YAML definitions need it

    if len(text) > MAX_DEFINITION_BYTES:
        raise InvalidSpec(f"workflow definition is larger than {MAX_DEFINITION_BYTES} bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidSpec(f"workflow YAML could not be read: {_yaml_problem(e)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise InvalidSpec("workflow YAML is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidSpec(f"workflow YAML must be a mapping with name, stages and outputs, not {_kind(data)}")
    _check_size(data)
    if isinstance(data.get("version"), int | float) and not isinstance(data["version"], bool):
        data["version"] = str(data["version"])  # `version: 2` is a number in YAML
    return check_structure(_convert(data))


def _yaml_problem(e: Exception) -> str:
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem is None:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(problem)


def _kind(value: object) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def _check_size(data: object) -> None:
    """Refuse documents whose aliases expand past a bound (or into a cycle) before
    anything walks them without one."""
    budget = _MAX_YAML_NODES
    todo = [data]
    while todo:
        budget -= 1
        if budget < 0:
            raise InvalidSpec(f"workflow YAML expands to more than {_MAX_YAML_NODES} values")
        item = todo.pop()
        if isinstance(item, dict):
            todo += item.keys()
            todo += item.values()
        elif isinstance(item, list):
            todo += item


def _convert(data: Any) -> WorkflowSpec:
    try:
        return msgspec.convert(data, WorkflowSpec)
    except msgspec.ValidationError as e:
        raise InvalidSpec(f"invalid workflow spec: {e}") from None
    except RecursionError:
        raise InvalidSpec("workflow spec is nested too deeply") from None


# -- validation ----------------------------------------------------------------------------------


def check_structure(spec: WorkflowSpec) -> WorkflowSpec:
    """What can be checked without the functions: field types, names, limits,
    unique stages, well-formed sources. Returns the spec with its numbers
    normalised (``timeout_s`` a float), so equal definitions hash equally."""
    if not isinstance(spec, WorkflowSpec):
        raise InvalidSpec(f"expected a WorkflowSpec, not {type(spec).__name__}")
    # Structs built in Python are not type-checked; a round trip through builtins is.
    try:
        data = msgspec.to_builtins(spec)
    except TypeError as e:
        raise InvalidSpec(f"invalid workflow spec: {e}") from None
    spec = _convert(data)
    check_name("workflow", spec.name)
    check_name("version", spec.version)
    where = f"workflow {spec.name!r}"
    if not spec.stages:
        raise InvalidSpec(f"{where} has no stages")
    if len(spec.stages) > MAX_STAGES:
        raise InvalidSpec(f"{where} has {len(spec.stages)} stages; at most {MAX_STAGES} are allowed")
    seen: set[str] = set()
    for s in spec.stages:
        _check_stage(s)
        if s.name in seen:
            raise InvalidSpec(f"{where}: duplicate stage name {s.name!r}")
        seen.add(s.name)
    for out, source in spec.outputs.items():
        _check_tensor_name(f"{where}: output", out)
        try:
            head, _ = parse_source(source)
        except InvalidSpec as e:
            raise InvalidSpec(f"{where}: output {out!r}: {e}") from None
        if head == REQUEST:
            raise InvalidSpec(
                f"{where}: output {out!r} must come from a stage ('<stage>.<output>'), not {source!r}"
            )
    names = [t.name for t in spec.inputs]
    if len(set(names)) != len(names):
        raise InvalidSpec(f"{where}: duplicate request input names {names}")
    for t in spec.inputs:
        t.validate()
    return spec


def _check_stage(s: StageSpec) -> None:
    check_name("stage", s.name)
    if "." in s.name or s.name == REQUEST:
        raise InvalidSpec(f"invalid stage name {s.name!r}: it may not contain '.' nor be {REQUEST!r}")
    check_name(f"stage {s.name!r}: function", s.function)
    if not 0 <= s.retries <= MAX_RETRIES:
        raise InvalidSpec(f"stage {s.name!r}: retries {s.retries} must be 0-{MAX_RETRIES}")
    if not 0 < s.timeout_s <= MAX_TIMEOUT_S:  # NaN fails too
        raise InvalidSpec(f"stage {s.name!r}: timeout_s {s.timeout_s} must be in (0, {MAX_TIMEOUT_S:g}]")
    for target, source in s.inputs.items():
        try:
            parse_source(source)
        except InvalidSpec as e:
            raise InvalidSpec(f"stage {s.name!r} input {target!r}: {e}") from None


def _check_tensor_name(what: str, name: str) -> None:
    if not name or len(name) > 128:
        raise InvalidSpec(f"{what} name {name!r} must be 1-128 characters")


def validate_workflow(spec: WorkflowSpec, functions: Mapping[str, FunctionSpec]) -> WorkflowSpec:
    """Check ``spec`` against the functions it calls (by name); returns the spec with
    ``inputs`` filled in when it declared none. Any problem is an :class:`InvalidSpec`
    naming the stage and input."""
    spec = check_structure(spec)
    stages = {s.name: s for s in spec.stages}
    fns: dict[str, FunctionSpec] = {}
    for s in spec.stages:
        if s.function not in functions:
            raise InvalidSpec(f"stage {s.name!r}: unknown function {s.function!r}")
        fns[s.name] = functions[s.function]
    uses: dict[str, list[tuple[str, TensorSpec]]] = {}  # request input -> (where, spec it feeds)
    for s in spec.stages:
        for target, source in s.inputs.items():
            want = _input_of(s, fns[s.name], target)
            head, tensor = parse_source(source)
            where = f"stage {s.name!r} input {target!r}"
            if head == REQUEST:
                _check_tensor_name(f"{where}: request input", tensor)
                uses.setdefault(tensor, []).append((where, want))
                continue
            if head not in stages:
                raise InvalidSpec(f"{where}: {source!r} names unknown stage {head!r}")
            got = _output_of(fns[head], head, tensor, where)
            if not compatible(got, want):
                raise InvalidSpec(
                    f"{where}: {source!r} is {_show(got)} but function {s.function!r} takes {_show(want)}"
                )
        _check_state(s, fns[s.name])
    topological_order(spec)  # names a cycle if there is one
    for out, source in spec.outputs.items():
        head, tensor = parse_source(source)
        where = f"workflow output {out!r}"
        if head not in stages:
            raise InvalidSpec(f"{where}: {source!r} names unknown stage {head!r}")
        _output_of(fns[head], head, tensor, where)
    return msgspec.structs.replace(spec, inputs=_request_inputs(spec, uses))


def _input_of(s: StageSpec, fn: FunctionSpec, name: str) -> TensorSpec:
    t = fn.input(name)
    if t is None:
        raise InvalidSpec(
            f"stage {s.name!r}: {name!r} is not an input of function {fn.name!r} "
            f"(its inputs: {_names(fn.inputs)})"
        )
    return t


def _output_of(fn: FunctionSpec, stage: str, name: str, where: str) -> TensorSpec:
    t = next((o for o in fn.outputs if o.name == name), None)
    if t is None:
        raise InvalidSpec(
            f"{where}: stage {stage!r} (function {fn.name!r}) has no output {name!r} "
            f"(its outputs: {_names(fn.outputs)})"
        )
    return t


def _check_state(s: StageSpec, fn: FunctionSpec) -> None:
    unmapped = [t for t in fn.inputs if t.name not in s.inputs]
    if not s.state:
        if unmapped:
            raise InvalidSpec(
                f"stage {s.name!r}: unmapped input {unmapped[0].name!r} of function {fn.name!r}: "
                "map it from 'request.<input>' or '<stage>.<output>', or declare state=True "
                "to make it session state"
            )
        return
    if not unmapped:
        raise InvalidSpec(
            f"stage {s.name!r} declares state=True but maps every input of function {fn.name!r}: "
            "leave the state inputs unmapped"
        )
    for t in unmapped:
        out = next((o for o in fn.outputs if o.name == t.name), None)
        if out is None:
            raise InvalidSpec(
                f"stage {s.name!r}: state input {t.name!r} of function {fn.name!r} has no output "
                f"of the same name to carry the new state (its outputs: {_names(fn.outputs)})"
            )
        if not compatible(out, t):
            raise InvalidSpec(
                f"stage {s.name!r}: state {t.name!r} of function {fn.name!r} is read as {_show(t)} "
                f"but written as {_show(out)}"
            )


def compatible(a: TensorSpec, b: TensorSpec) -> bool:
    """Same datatype and rank, each dimension equal or -1 on either side."""
    return (
        a.datatype == b.datatype
        and len(a.shape) == len(b.shape)
        and all(x == y or -1 in (x, y) for x, y in zip(a.shape, b.shape, strict=True))
    )


def _request_inputs(
    spec: WorkflowSpec, uses: Mapping[str, Sequence[tuple[str, TensorSpec]]]
) -> tuple[TensorSpec, ...]:
    declared = {t.name: t for t in spec.inputs}
    inferred = []
    for name, fed in uses.items():
        merged = _merge(name, fed)
        inferred.append(merged)
        if not declared:
            continue
        if name not in declared:
            raise InvalidSpec(
                f"{fed[0][0]} reads request input {name!r}, which the workflow does not declare"
            )
        for where, want in fed:
            if not compatible(declared[name], want):
                raise InvalidSpec(
                    f"request input {name!r} is declared {_show(declared[name])} but {where} "
                    f"takes {_show(want)}"
                )
    if not declared:
        return tuple(inferred)
    unused = [n for n in declared if n not in uses]
    if unused:
        raise InvalidSpec(f"workflow {spec.name!r}: request input {unused[0]!r} feeds no stage")
    return spec.inputs


def _merge(name: str, fed: Sequence[tuple[str, TensorSpec]]) -> TensorSpec:
    """The most specific spec that every use of request input ``name`` accepts.

    Checked against the merge so far, not pairwise: [-1, 3] and [-1, 4] both
    accept [-1, -1], but no tensor fits both.
    """
    merged = TensorSpec(name, fed[0][1].datatype, fed[0][1].shape)
    for i, (where, t) in enumerate(fed):
        if not compatible(merged, t):
            other, o = next(((w, u) for w, u in fed[:i] if not compatible(u, t)), fed[0])
            raise InvalidSpec(
                f"request input {name!r} feeds {other} as {_show(o)} and {where} as {_show(t)}: incompatible"
            )
        shape = tuple(y if x == -1 else x for x, y in zip(merged.shape, t.shape, strict=True))
        merged = TensorSpec(name, t.datatype, shape)
    merged.validate()
    return merged


def _show(t: TensorSpec) -> str:
    return f"{t.datatype} {list(t.shape)}"


def _names(tensors: Iterable[TensorSpec]) -> str:
    return ", ".join(t.name for t in tensors) or "none"
