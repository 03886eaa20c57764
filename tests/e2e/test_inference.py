"""Inference, metadata, health and metrics through real clients against ``smss serve --demo``.

Outputs are compared with the same demo model loaded in this process from the
server's own weight files.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonhttp
from e2e_helpers import REQUEST_TIMEOUT_S, json_infer_body, output_of
from prometheus_client.parser import text_string_to_metric_families

from smss.testing.server import ServerProcess

#: model -> (input name, per-row shape, output name, tolerance).
MODELS: dict[str, tuple[str, tuple[int, ...], str, float]] = {
    "mlp": ("x", (64,), "y", 1e-5),
    "mlp_onnx": ("x", (64,), "y", 1e-5),
    "cnn": ("image", (3, 64, 64), "logits", 1e-4),
}


def sample(name: str, batch: int, seed: int = 0) -> np.ndarray:
    _, row, _, _ = MODELS[name]
    return np.random.default_rng(seed).standard_normal((batch, *row), dtype=np.float32)


def assert_close(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def triton(demo_server: ServerProcess) -> Iterator[tritonhttp.InferenceServerClient]:
    client = tritonhttp.InferenceServerClient(
        demo_server.url.removeprefix("http://"),
        connection_timeout=REQUEST_TIMEOUT_S,
        network_timeout=REQUEST_TIMEOUT_S,
    )
    yield client
    client.close()


@pytest.fixture
def http(demo_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=demo_server.url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


# ---------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("binary_out", [True, False, None], ids=["bin-out", "json-out", "default-out"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["bin-in", "json-in"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_tritonclient_infer_matches_in_process_model(
    triton: tritonhttp.InferenceServerClient,
    reference: dict[str, Any],
    model: str,
    batch: int,
    binary_in: bool,
    binary_out: bool | None,
) -> None:
    in_name, _, out_name, tol = MODELS[model]
    x = sample(model, batch, seed=batch)
    tensor = tritonhttp.InferInput(in_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    outputs = None if binary_out is None else [tritonhttp.InferRequestedOutput(out_name, binary_out)]

    result = triton.infer(model, [tensor], outputs=outputs, request_id=f"req-{model}-{batch}")

    response = result.get_response()
    assert response["model_name"] == model
    assert response["model_version"] == "1"
    assert response["id"] == f"req-{model}-{batch}"
    (out,) = response["outputs"]
    # No outputs listed: tritonclient asks for binary outputs by default.
    assert ("parameters" in out) == (binary_out is not False), out
    got = result.as_numpy(out_name)
    assert got is not None
    assert_close(got, reference[model](x), tol)


@pytest.mark.parametrize("nested", [False, True], ids=["flat-data", "nested-data"])
@pytest.mark.parametrize("model", list(MODELS))
def test_raw_http_json_infer(http: httpx.Client, reference: dict[str, Any], model: str, nested: bool) -> None:
    in_name, _, out_name, tol = MODELS[model]
    x = sample(model, 3, seed=7)
    body = json_infer_body({in_name: x}, id="abc")
    if nested:
        body["inputs"][0]["data"] = x.tolist()

    r = http.post(f"/v2/models/{model}/infer", json=body)

    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["id"] == "abc"
    assert_close(output_of(r, out_name), reference[model](x), tol)
    r2 = http.post(f"/v2/models/{model}/versions/1/infer", json=body)
    assert_close(output_of(r2, out_name), reference[model](x), tol)


def test_raw_http_binary_output(http: httpx.Client, reference: dict[str, Any]) -> None:
    x = sample("mlp", 2, seed=3)
    header = (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2,64],'
        b'"parameters":{"binary_data_size":512}}],'
        b'"outputs":[{"name":"y","parameters":{"binary_data":true}}]}'
    )
    r = http.post(
        "/v2/models/mlp/infer",
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    meta = httpx.Response(200, content=r.content[:length]).json()
    (out,) = meta["outputs"]
    assert out["parameters"]["binary_data_size"] == 2 * 10 * 4
    assert len(r.content) == length + 80
    got = np.frombuffer(r.content[length:], dtype="<f4").reshape(out["shape"])
    assert_close(got, reference["mlp"](x), 1e-5)


# ---------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("model", list(MODELS))
def test_model_metadata(http: httpx.Client, triton: tritonhttp.InferenceServerClient, model: str) -> None:
    in_name, row, out_name, _ = MODELS[model]
    want = {
        "name": model,
        "versions": ["1"],
        "platform": "onnxruntime" if model == "mlp_onnx" else "pytorch",
        "inputs": [{"name": in_name, "datatype": "FP32", "shape": [-1, *row]}],
        "outputs": [{"name": out_name, "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert http.get(f"/v2/models/{model}").json() == want
    assert http.get(f"/v2/models/{model}/versions/1").json() == want
    assert triton.get_model_metadata(model) == want
    assert triton.get_model_metadata(model, model_version="1") == want


def test_health_and_readiness(http: httpx.Client, triton: tritonhttp.InferenceServerClient) -> None:
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert triton.is_server_live()
    assert triton.is_server_ready()
    for model in MODELS:
        r = http.get(f"/v2/models/{model}/ready")
        assert r.status_code == 200, r.text
        assert r.json() == {"name": model, "ready": True}
        assert http.get(f"/v2/models/{model}/versions/1/ready").status_code == 200
        assert triton.is_model_ready(model)
    assert not triton.is_model_ready("no-such-model")
    assert http.get("/v2/models/no-such-model/ready").status_code == 404


def test_server_metadata(http: httpx.Client, triton: tritonhttp.InferenceServerClient) -> None:
    r = http.get("/v2")
    assert r.status_code == 200
    meta = r.json()
    assert meta["name"] == "smss"
    assert "binary_tensor_data" in meta["extensions"]
    assert triton.get_server_metadata() == meta


def test_openapi_lists_routes(http: httpx.Client) -> None:
    r = http.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    expected = {
        "/v2/health/live": "get",
        "/v2/health/ready": "get",
        "/v2": "get",
        "/v2/models/{name}": "get",
        "/v2/models/{name}/versions/{version}": "get",
        "/v2/models/{name}/ready": "get",
        "/v2/models/{name}/infer": "post",
        "/v2/models/{name}/versions/{version}/infer": "post",
        "/v2/repository/index": "post",
        "/v1/uploads/{sha256}": "put",
        "/v1/functions": "post",
        "/v1/functions/{name}": "delete",
        "/metrics": "get",
    }
    for path, method in expected.items():
        assert method in paths.get(path, {}), f"{method.upper()} {path} missing from /openapi.json"


Labels = tuple[tuple[str, str], ...]


def scrape(http: httpx.Client) -> tuple[set[str], dict[tuple[str, Labels], float]]:
    """Metric family names, and every sample by (sample name, sorted labels)."""
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families: set[str] = set()
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(r.text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def test_metrics(http: httpx.Client) -> None:
    _, before = scrape(http)
    x = sample("mlp", 1)
    for _ in range(3):
        output_of(http.post("/v2/models/mlp/infer", json=json_infer_body({"x": x})), "y")

    families, after = scrape(http)

    assert {
        "smss_requests",
        "smss_request_seconds",
        "smss_cold_starts",
        "smss_instances",
        "smss_queue_length",
    } <= families
    mlp = (("function", "mlp"),)
    ok = ("smss_requests_total", (("function", "mlp"), ("status", "200")))
    assert after[ok] - before.get(ok, 0.0) >= 3
    count = ("smss_request_seconds_count", mlp)
    assert after[count] - before.get(count, 0.0) >= 3
    assert after[("smss_cold_starts_total", mlp)] >= 1
    assert after[("smss_instances", (("function", "mlp"), ("state", "ready")))] >= 1
    assert ("smss_queue_length", mlp) in after
    # Each answered request's time split: waiting for a slot, and on the instance,
    # which is waiting for a batch, compute and transfer.
    parts = {}
    for part in ("queue", "instance", "batch", "compute", "transfer"):
        key = ("smss_request_part_seconds_count", (("function", "mlp"), ("part", part)))
        assert after[key] - before.get(key, 0.0) >= 3
        total = ("smss_request_part_seconds_sum", (("function", "mlp"), ("part", part)))
        parts[part] = after[total] - before.get(total, 0.0)
    assert parts["instance"] > 0
    e2e = after[("smss_request_seconds_sum", mlp)] - before.get(("smss_request_seconds_sum", mlp), 0.0)
    assert parts["queue"] + parts["instance"] <= e2e
    # measured inside the instance, within the gateway's wait for the answer
    assert parts["compute"] > 0
    assert parts["batch"] + parts["compute"] <= parts["instance"]
    assert parts["batch"] + parts["compute"] + parts["transfer"] == pytest.approx(parts["instance"], rel=1e-6)


# ---------------------------------------------------------------------------------- concurrency


def test_64_concurrent_clients(demo_server: ServerProcess, reference: dict[str, Any]) -> None:
    clients, per_client = 64, 20
    xs = np.random.default_rng(42).standard_normal((clients, per_client, 64), dtype=np.float32)
    want = reference["mlp"](xs.reshape(-1, 64)).reshape(clients, per_client, 10)
    errors: list[str] = []
    mismatches: list[str] = []
    done = [0] * clients
    start = threading.Barrier(clients)

    def run(k: int) -> None:
        try:
            with httpx.Client(base_url=demo_server.url, timeout=REQUEST_TIMEOUT_S) as client:
                start.wait(REQUEST_TIMEOUT_S)
                for j in range(per_client):
                    x = xs[k, j : j + 1]
                    r = client.post("/v2/models/mlp/infer", json=json_infer_body({"x": x}))
                    if r.status_code != 200:
                        errors.append(f"client {k} request {j}: {r.status_code} {r.text[:200]}")
                        continue
                    got = output_of(r, "y")
                    if not np.allclose(got, want[k, j : j + 1], rtol=1e-5, atol=1e-5):
                        mismatches.append(f"client {k} request {j}")
                    done[k] += 1
        except Exception as e:  # reported below; a thread's exception would be lost
            errors.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(k,), name=f"client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    # Meanwhile no instance ever holds more requests than its spec's concurrency.
    with httpx.Client(base_url=demo_server.url, timeout=REQUEST_TIMEOUT_S) as watcher:
        while any(t.is_alive() for t in threads):
            mlp = watcher.get("/v1/functions/mlp").json()
            limit = mlp["spec"]["scaling"]["concurrency"]
            assert all(i["in_flight"] <= limit for i in mlp["instances"]), mlp["instances"]
            threads[0].join(0.05)
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * 3)
    assert not [t.name for t in threads if t.is_alive()], "client threads hung"
    assert errors == []
    assert mismatches == []
    assert sum(done) == clients * per_client
