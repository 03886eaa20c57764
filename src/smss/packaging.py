"""Turn ``app.py:ClassName [--weights file]`` into what a deploy sends.

The user's file is imported here, on the deploying side, only to read the
``@smss.model`` spec; the platform stores the source and runs it in instances.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec

from smss._model import spec_of
from smss.errors import InvalidSpec, UnsafeArtifact
from smss.spec import FunctionSpec, WeightsFormat

_FORMATS: dict[str, WeightsFormat] = {".safetensors": "safetensors", ".onnx": "onnx"}


@dataclass(frozen=True)
class Package:
    spec: FunctionSpec
    source: str
    weights: Path | None
    weights_sha256: str | None


def weights_format(path: Path) -> WeightsFormat:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UnsafeArtifact(
            f"weights {path.name!r}: only .safetensors and .onnx are accepted (pickle formats are refused)"
        )
    return fmt


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_attribute(target: str) -> tuple[Path, object]:
    """Import ``FILE.py`` and return its attribute ``NAME`` from ``FILE.py:NAME``."""
    file_part, sep, attr = target.rpartition(":")
    if not sep or not file_part.endswith(".py") or not attr.isidentifier():
        raise InvalidSpec(f"expected FILE.py:NAME, got {target!r}")
    path = Path(file_part)
    if not path.is_file():
        raise InvalidSpec(f"no such file {file_part!r}")
    module_name = f"smss_deploy_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise InvalidSpec(f"cannot import {file_part!r}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, attr):
        raise InvalidSpec(f"{file_part} has no attribute {attr}")
    return path, getattr(module, attr)


def load_class(target: str) -> tuple[Path, type]:
    path, cls = load_attribute(target)
    if not isinstance(cls, type):
        raise InvalidSpec(f"{target.rpartition(':')[0]} has no class {target.rpartition(':')[2]}")
    return path, cls


def package(target: str, weights: Path | None) -> Package:
    path, cls = load_class(target)
    return package_class(path, cls, weights)


def package_class(path: Path, cls: type, weights: Path | None) -> Package:
    template = spec_of(cls)
    entry_file = "model.py" if path.name == "model.py" else path.name
    spec = msgspec.structs.replace(
        template,
        entrypoint=f"{entry_file}:{cls.__name__}",
        weights=None if weights is None else f"weights{weights.suffix.lower()}",
        weights_format=None if weights is None else weights_format(weights),
    ).validate()
    sha = None if weights is None else sha256_of(weights)
    return Package(spec=spec, source=path.read_text(), weights=weights, weights_sha256=sha)
