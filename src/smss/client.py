"""``smss.Client``: call a running platform over HTTP (synchronous, thin)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss import errors
from smss.packaging import Package, load_attribute, package
from smss.spec import DATATYPES, datatype_of


def _error_types(root: type[errors.SmssError]) -> dict[str, type[errors.SmssError]]:
    """Every error type of the tree by its wire ``code``, so a client raises what the server did."""
    found = {root.code: root}
    for sub in root.__subclasses__():
        found.update(_error_types(sub))
    return found


_BY_CODE = _error_types(errors.SmssError)


class Client:
    def __init__(
        self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 300
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                body = response.json()
                message, code = body.get("error", response.text), body.get("code", "")
            except ValueError:
                message, code = response.text, ""
            kind = _BY_CODE.get(code, errors.SmssError)
            raise kind(f"HTTP {response.status_code}: {message}")
        return response.json()

    def deploy(self, target: str, weights: Path | None = None) -> dict[str, Any]:
        return self.deploy_package(package(target, weights))

    def deploy_package(self, pkg: Package) -> dict[str, Any]:
        if pkg.weights is not None and pkg.weights_sha256 is not None:
            with pkg.weights.open("rb") as f:
                self._check(self._http.put(f"/v1/uploads/{pkg.weights_sha256}", content=f))
        body = {
            "spec": msgspec.to_builtins(pkg.spec),
            "source": pkg.source,
            "weights_sha256": pkg.weights_sha256,
        }
        result: dict[str, Any] = self._check(self._http.post("/v1/functions", json=body))
        return result

    def functions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._check(self._http.get("/v1/functions"))["functions"]
        return result

    def devices(self) -> list[dict[str, Any]]:
        """Each node's devices (``GET /v1/devices``): ``smss.inventory.DeviceReport`` as JSON."""
        result: list[dict[str, Any]] = self._check(self._http.get("/v1/devices"))["devices"]
        return result

    def delete(self, name: str) -> None:
        self._check(self._http.delete(f"/v1/functions/{name}"))

    def infer(self, name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        body = {"inputs": _tensors_json(inputs)}
        result = self._check(self._http.post(f"/v2/models/{name}/infer", json=body))
        return {
            o["name"]: np.asarray(o["data"], dtype=DATATYPES[o["datatype"]]).reshape(o["shape"])
            for o in result["outputs"]
        }

    def get(self, path: str) -> Any:
        return self._check(self._http.get(path))

    def post(self, path: str, body: object | None = None) -> Any:
        return self._check(self._http.post(path, json=body))

    def deploy_workflow(self, source: Path) -> dict[str, Any]:
        """Deploy a workflow from a YAML file, or from ``file.py:variable`` holding a smss.Workflow."""
        text = str(source)
        if text.endswith((".yaml", ".yml")):
            body = source.read_bytes()
            headers = {"Content-Type": "application/yaml"}
        else:
            from smss.workflow.builder import Workflow

            _, obj = load_attribute(text)
            spec = obj.spec() if isinstance(obj, Workflow) else obj
            body, headers = msgspec.json.encode(spec), {"Content-Type": "application/json"}
        result: dict[str, Any] = self._check(self._http.post("/v1/workflows", content=body, headers=headers))
        return result

    def run(
        self, workflow: str, inputs: dict[str, np.ndarray], session: str | None = None, wait: bool = True
    ) -> dict[str, Any]:
        body = {"session": session, "wait": wait, "inputs": _tensors_json(inputs)}
        result: dict[str, Any] = self._check(self._http.post(f"/v1/workflows/{workflow}/runs", json=body))
        return result


def _tensors_json(inputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [
        {"name": k, "datatype": datatype_of(v.dtype), "shape": list(v.shape), "data": v.ravel().tolist()}
        for k, v in inputs.items()
    ]
