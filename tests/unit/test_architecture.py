"""The layout's rules, checked: public API pinned, imports point inward."""

from __future__ import annotations

import ast
from pathlib import Path

import smss

SRC = Path(smss.__file__).parent

# The composition root (compose) and the command (cli) sit above everything.
_ROOT = ("smss.cli", "smss.compose")
# package -> smss modules it must not import: every package of smss has a rule.
FORBIDDEN = {
    "control": ("smss.api", "smss.app", "smss.node", "smss.store", "smss.sim", "smss.bench", *_ROOT),
    "workflow": ("smss.api", "smss.app", "smss.node", "smss.sim", "smss.bench", *_ROOT),
    "app": ("smss.api", "smss.node", "smss.sim", "smss.bench", *_ROOT),
    "api": ("smss.store.sqlite", "smss.node", "smss.sim", "smss.bench", *_ROOT),
    "node": ("smss.api", "smss.app", "smss.control", "smss.store", "smss.sim", "smss.bench", *_ROOT),
    "store": ("smss.api", "smss.app", "smss.control", "smss.node", "smss.sim", "smss.bench", *_ROOT),
    # The cluster composes a controller's process (smss.compose) in an actor: not the CLI.
    "cluster": ("smss.sim", "smss.bench", "smss.cli"),
    "sim": ("smss.api", "smss.app", "smss.node", "smss.store", "smss.bench", "smss.workflow", *_ROOT),
    "demo": ("smss.api", "smss.app", "smss.control", "smss.node", "smss.store", "smss.sim", *_ROOT),
    "testing": ("smss.api", "smss.app", "smss.node", "smss.sim", "smss.bench", *_ROOT),
    "bench": ("smss.api", "smss.compose", "smss.cli"),
    "cli": ("smss.api", "smss.app", "smss.control", "smss.node", "smss.store", "smss.workflow.engine"),
}
# Modules at the top level that everything may import: they import no package but these.
LEAVES = {
    "errors": (),
    "inventory": (),
    "spec": ("smss.errors",),
    "config": ("smss.errors",),
    "bytes_tensors": ("smss.errors",),
    "safetensors_header": ("smss.errors",),
    "faults": ("smss.errors",),
    "logcontext": (),
    "progress": (),
}
FORBIDDEN_LIBS = {
    "control": ("sqlite3", "socket", "ray", "torch", "starlette", "uvicorn"),
    "workflow": ("ray", "starlette", "uvicorn"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_public_api_is_pinned() -> None:
    assert sorted(smss.__all__) == [
        "AsyncClient",
        "Batching",
        "Client",
        "FunctionSpec",
        "Resources",
        "Scaling",
        "SmssError",
        "StageSpec",
        "TensorSpec",
        "Weights",
        "Workflow",
        "WorkflowSpec",
        "__version__",
        "model",
    ]


def test_imports_point_inward() -> None:
    violations = []
    for package, banned in FORBIDDEN.items():
        for path in (SRC / package).rglob("*.py"):
            for name in _imports(path):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    violations.append(f"{path.relative_to(SRC)} imports {name}")
    assert violations == []


def test_every_package_has_an_import_rule() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(FORBIDDEN)


def test_leaf_modules_import_only_leaves() -> None:
    violations = []
    for module, allowed in LEAVES.items():
        for name in _imports(SRC / f"{module}.py"):
            if name.startswith("smss") and name not in allowed:
                violations.append(f"{module}.py imports {name}")
    assert violations == []


def test_pure_packages_do_no_io() -> None:
    violations = []
    for package, banned in FORBIDDEN_LIBS.items():
        for path in (SRC / package).rglob("*.py"):
            for name in _imports(path):
                if name.split(".")[0] in banned:
                    violations.append(f"{path.relative_to(SRC)} imports {name}")
    assert violations == []


def test_only_the_cluster_and_the_ray_peer_import_ray() -> None:
    """Within the cluster package only its ``ray_*`` modules: the rest is tested without Ray."""
    offenders = [
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if p != SRC / "bench" / "peers" / "rayserve.py"
        and not (p.parent == SRC / "cluster" and p.name.startswith("ray_"))
        and any(n.split(".")[0] == "ray" for n in _imports(p))
    ]
    assert offenders == []


def test_nothing_pickles() -> None:
    offenders = [
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if {"pickle", "cloudpickle", "dill"} & _imports(p)
    ]
    assert offenders == []
