"""``smss.Client`` and ``smss.AsyncClient``: call a running platform over HTTP.

Both send the same requests and read the same answers (built and parsed in
:mod:`smss._client_wire`): ``infer`` uses binary tensors by default (raw
little-endian bytes; BYTES tensors as length-prefixed elements) and returns
numpy arrays, BYTES outputs as object arrays of ``bytes``. ``timeout_s`` asks
the server for a shorter per-request timeout (``x-request-timeout-seconds``).
Errors are raised as the server's own :class:`smss.SmssError` subclass.
``AsyncClient`` covers the data plane; deployment and admin calls are on
``Client`` (and the ``smss`` command).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss import _client_wire as wire
from smss.packaging import Package, load_attribute, package

DEFAULT_URL = "http://127.0.0.1:8000"


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class Client:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 300) -> None:
        self._http = httpx.Client(base_url=url, headers=_headers(token), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> Any:
        return wire.checked(response)

    def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        outputs: Sequence[str] | None = None,
        binary: bool = True,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run a model (or a workflow) on ``inputs``; ``outputs`` None: all of them."""
        request = wire.infer_request(self._http, name, inputs, outputs, binary, timeout_s)
        return wire.infer_answer(self._http.send(request))

    def model_metadata(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._check(self._http.get(f"/v2/models/{name}"))
        return result

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

    def delete_workflow(self, name: str) -> None:
        self._check(self._http.delete(f"/v1/workflows/{name}"))

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
        body = {"session": session, "wait": wait, "inputs": wire.tensors_json(inputs)}
        result: dict[str, Any] = self._check(self._http.post(f"/v1/workflows/{workflow}/runs", json=body))
        return result


class AsyncClient:
    """The data plane of :class:`Client`, awaitable: infer, metadata, readiness, functions."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 300) -> None:
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(token), timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        outputs: Sequence[str] | None = None,
        binary: bool = True,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        request = wire.infer_request(self._http, name, inputs, outputs, binary, timeout_s)
        return wire.infer_answer(await self._http.send(request))

    async def model_metadata(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = wire.checked(await self._http.get(f"/v2/models/{name}"))
        return result

    async def ready(self) -> bool:
        return (await self._http.get("/v2/health/ready")).status_code == 200

    async def functions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = wire.checked(await self._http.get("/v1/functions"))["functions"]
        return result
