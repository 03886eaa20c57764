"""Several versions of one model on a real ``smss serve``: versioned routes, the default,
a canary split, and a new version deployed while requests queue on the old one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_helpers import REQUEST_TIMEOUT_S, assert_error, json_infer_body, smss_cli, start, stop_checked

from smss.client import Client
from smss.packaging import package
from smss.testing.server import ServerProcess, wait_until

MODEL = """
import time
import numpy as np
import smss


@smss.model(
    name="ver",
    inputs={"x": ("FP32", [1])},
    outputs={"y": ("FP32", [1])},
    concurrency=4,
    max_instances=1,
    cpu=0.5,
    memory=128,
)
class Ver:
    def load(self, weights):
        pass

    def predict(self, inputs):
        time.sleep(min(float(inputs["x"][0]), 10.0))  # x: seconds to take
        return {"y": np.array([ANSWER], dtype=np.float32)}
"""


def model_file(tmp_path: Path, answer: float) -> Path:
    """The ``ver`` model answering ``answer`` (each version answers differently)."""
    path = tmp_path / f"ver_{int(answer)}.py"
    path.write_text(MODEL.replace("ANSWER", repr(answer)))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start(tmp_path_factory.mktemp("versions-server"), ["--keep-alive", "300"])
    yield server
    stop_checked(server)


def infer(url: str, route: str, seconds: float = 0.0) -> httpx.Response:
    body = json_infer_body({"x": np.array([seconds], dtype=np.float32)})
    return httpx.post(f"{url}{route}", json=body, timeout=REQUEST_TIMEOUT_S)


def answer(response: httpx.Response) -> float:
    assert response.status_code == 200, (response.status_code, response.text[:500])
    return float(response.json()["outputs"][0]["data"][0])


def versions_listed(url: str) -> list[tuple[str, str]]:
    with Client(url) as client:
        return sorted((f["name"], f["version"]) for f in client.functions() if f["name"] == "ver")


def waiting_on_v1(url: str) -> bool:
    with Client(url) as client:
        (v1,) = [f for f in client.functions() if (f["name"], f["version"]) == ("ver", "1")]
    return bool(v1["queued"] or any(i["in_flight"] for i in v1["instances"]))


def test_versions_routes_canary_and_delete(server: ServerProcess, tmp_path: Path) -> None:
    url = server.url
    with Client(url) as client:
        client.deploy_package(package(f"{model_file(tmp_path, 1.0)}:Ver", None))

    # requests queue on version 1 (its instance is still starting) while version 2 deploys
    with ThreadPoolExecutor(6) as pool:
        queued = [pool.submit(infer, url, "/v2/models/ver/infer", 1.0) for _ in range(6)]
        wait_until(lambda: waiting_on_v1(url), REQUEST_TIMEOUT_S, "requests waiting on version 1")
        deployed = smss_cli("deploy", f"{model_file(tmp_path, 2.0)}:Ver", "--version", "2", "--url", url)
        assert deployed.returncode == 0, deployed.stderr
        assert "version 2" in deployed.stdout, deployed.stdout
        assert [answer(f.result()) for f in queued] == [1.0] * 6

    assert versions_listed(url) == [("ver", "1"), ("ver", "2")]
    assert answer(infer(url, "/v2/models/ver/versions/1/infer")) == 1.0
    assert answer(infer(url, "/v2/models/ver/versions/2/infer")) == 2.0
    assert answer(infer(url, "/v2/models/ver/infer")) == 1.0  # the default: the first deployed

    meta = httpx.get(f"{url}/v2/models/ver/versions/2", timeout=REQUEST_TIMEOUT_S)
    assert meta.status_code == 200, meta.text
    assert (meta.json()["name"], meta.json()["versions"]) == ("ver", ["2"])
    ready = httpx.get(f"{url}/v2/models/ver/versions/2/ready", timeout=REQUEST_TIMEOUT_S)
    assert ready.status_code == 200, ready.text
    for route in ("/v2/models/ver/versions/3", "/v2/models/ver/versions/3/ready"):
        assert_error(httpx.get(f"{url}{route}", timeout=REQUEST_TIMEOUT_S), 404)
    assert_error(infer(url, "/v2/models/ver/versions/3/infer"), 404)
    assert_error(infer(url, "/v2/models/ver~2/infer"), 404)  # internal names cannot be typed
    assert_error(httpx.delete(f"{url}/v1/functions/ver~2", timeout=REQUEST_TIMEOUT_S), 404)
    assert_error(httpx.get(f"{url}/v1/functions/ver~2", timeout=REQUEST_TIMEOUT_S), 404)

    if server.grpc_address is not None:
        assert_grpc_versions(server.grpc_address)

    # a 90/10 canary split over many unversioned requests
    with Client(url) as client:
        traffic = client.post("/v1/functions/ver/traffic", {"split": {"2": 0.1}})
        assert traffic == {"name": "ver", "default": "1", "split": {"2": 0.1}}
        bad = httpx.post(f"{url}/v1/functions/ver/traffic", json={"split": {"3": 0.5}}, timeout=30)
        assert_error(bad, 404)
        bad = httpx.post(f"{url}/v1/functions/ver/traffic", json={"split": {"2": 1.5}}, timeout=30)
        assert_error(bad, 400)
    responses = [infer(url, "/v2/models/ver/infer") for _ in range(200)]
    answers = [answer(r) for r in responses]
    assert set(answers) == {1.0, 2.0}
    # each response names the version that answered it
    assert all(r.json()["model_version"] == str(int(a)) for r, a in zip(responses, answers, strict=True))
    assert 5 <= answers.count(2.0) <= 45, answers.count(2.0)  # expect 20; generous bounds

    # promote version 2: the default, the split ended
    promoted = smss_cli(
        "deploy", f"{model_file(tmp_path, 2.0)}:Ver", "--version", "2", "--default", "--url", url
    )
    assert promoted.returncode == 0, promoted.stderr
    assert {answer(infer(url, "/v2/models/ver/infer")) for _ in range(20)} == {2.0}
    assert answer(infer(url, "/v2/models/ver/versions/1/infer")) == 1.0
    v1 = f"{model_file(tmp_path, 1.0)}:Ver"
    canary = smss_cli("deploy", v1, "--version", "1", "--canary", "50", "--json", "--url", url)
    assert canary.returncode == 0, canary.stderr
    traffic = json.loads(canary.stdout)["traffic"]
    assert traffic == {"name": "ver", "default": "2", "split": {"1": 0.5}}

    # deleting the name deletes every version
    with Client(url) as client:
        client.delete("ver")
    assert versions_listed(url) == []
    assert_error(infer(url, "/v2/models/ver/versions/2/infer"), 404)
    assert_error(infer(url, "/v2/models/ver/infer"), 404)


def assert_grpc_versions(address: str) -> None:
    """ModelInfer with and without ``model_version`` (when the grpc extra is installed)."""
    import tritonclient.grpc as tritongrpc
    from tritonclient.utils import InferenceServerException

    client = tritongrpc.InferenceServerClient(address)
    try:
        tensor = tritongrpc.InferInput("x", [1], "FP32")
        tensor.set_data_from_numpy(np.array([0.0], dtype=np.float32))
        for version, expected in (("", 1.0), ("1", 1.0), ("2", 2.0)):
            result = client.infer("ver", [tensor], model_version=version, client_timeout=REQUEST_TIMEOUT_S)
            assert float(result.as_numpy("y")[0]) == expected, version
            assert result.get_response().model_version == (version or "1")
        with pytest.raises(InferenceServerException) as error:
            client.infer("ver", [tensor], model_version="3", client_timeout=REQUEST_TIMEOUT_S)
        assert "NOT_FOUND" in str(error.value.status()), error.value
    finally:
        client.close()


def test_internal_names_refused(server: ServerProcess) -> None:
    spec = {
        "name": "ver~9",
        "entrypoint": "m.py:M",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
    }
    r = httpx.post(f"{server.url}/v1/functions", json={"spec": spec, "source": ""}, timeout=30)
    assert_error(r, 400)


def test_every_version_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start(data, ["--keep-alive", "300"])
    try:
        with Client(first.url) as client:
            client.deploy_package(package(f"{model_file(tmp_path, 1.0)}:Ver", None))
        deployed = smss_cli(
            "deploy", f"{model_file(tmp_path, 2.0)}:Ver", "--version", "2", "--url", first.url
        )
        assert deployed.returncode == 0, deployed.stderr
    finally:
        stop_checked(first)
    second = start(data, ["--keep-alive", "300"])
    try:
        assert versions_listed(second.url) == [("ver", "1"), ("ver", "2")]
        assert answer(infer(second.url, "/v2/models/ver/versions/2/infer")) == 2.0
        assert answer(infer(second.url, "/v2/models/ver/infer")) == 1.0
    finally:
        stop_checked(second)
