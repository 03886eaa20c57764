"""Tiers of readiness on a live platform: one real ``smss serve`` (``fixed`` keep-alive,
so that nothing but the test moves a function between tiers).

* Stepping up from each tier (standby, resident, cold, no runtime) starts an instance
  that answers bit-exactly what the model computes in this process, and each step
  down leaves the function holding its tier's resources and nothing above them
  (``/v1/weights``: its segment and template; ``/v1/functions``: its tier).
* Metering: a function scaled to zero shows standby memory (its template and spare)
  until its template is released, then none; the runtime's zygote and the platform's
  own process are metered as overhead.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smss.client import Client
from smss.demo import models
from smss.demo.generate import ensure_artifact
from smss.node.weights import Weights
from smss.packaging import Package, package_class
from smss.testing.server import ServerProcess, running_server, wait_until

pytestmark = pytest.mark.slow

TOKEN = "tiers-test-token-" + "x" * 24


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    args = ["--token", TOKEN, "--keep-alive-policy", "fixed:0.5", "--log-level", "warning"]
    with running_server(tmp_path / "data", args) as s:
        yield s


def _mlp(tmp_path: Path) -> tuple[Package, Any]:
    art = ensure_artifact(tmp_path / "demo", "mlp")
    cls = getattr(models, art.class_name)
    return package_class(art.source, cls, art.weights), (cls, art.weights)


def _reference(cls: Any, weights: Path, x: np.ndarray) -> np.ndarray:
    """What the model answers, computed in this process from the same file."""
    model = cls()
    model.load(Weights(weights, "safetensors"))
    return np.asarray(model.predict({"x": x})["y"])


def _state(client: Client, name: str) -> tuple[str | None, bool, bool]:
    """(tier, weights in the store, a template) of ``name``."""
    (fn,) = [f for f in client.functions() if f["name"] == name]
    store = client.get("/v1/weights")["local"]
    key = re.compile(rf"^{name}@")
    return (
        fn["tier"],
        any(key.match(m) for m in store["models"]),
        any(key.match(k) for k in store["templates"]),
    )


def _to_zero(client: Client, name: str) -> None:
    client.post(f"/v2/repository/models/{name}/unload", {})
    wait_until(
        lambda: (
            not [f for f in client.functions() if f["name"] == name and (f["instances"] or f["starting"])]
        ),
        30.0,
        f"{name} scaled to zero",
    )


def _starts(server: ServerProcess, name: str) -> dict[str, int]:
    import httpx

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pattern = rf'^smss_start_seconds_count\{{function="{name}",tier="([a-z_]+)"\}} ([0-9.]+)$'
    return {t: int(float(v)) for t, v in re.findall(pattern, text, flags=re.MULTILINE)}


# What each tier holds of the function's own: (weights in the store, a template).
HOLDS = {
    "standby": (True, True),
    "resident": (True, False),
    "cold": (False, False),
    "no_runtime": (False, False),
}


def test_a_start_from_each_tier_answers_bit_exactly(server: ServerProcess, tmp_path: Path) -> None:
    pkg, (cls, weights) = _mlp(tmp_path)
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    reference = _reference(cls, weights, x)
    answers: dict[str, np.ndarray] = {}
    with Client(server.url, token=TOKEN) as client:
        client.deploy_package(pkg)
        server.wait_for_model("mlp")
        name = pkg.spec.name
        for tier in ("standby", "resident", "cold", "no_runtime", "standby"):
            _to_zero(client, name)
            stepped = client.post(f"/v1/functions/{name}/tier", {"tier": tier})
            assert stepped == {"name": name, "tier": tier}
            # It holds its tier's resources and nothing of the tiers above.
            assert _state(client, name) == (tier, *HOLDS[tier])
            time.sleep(0.5)  # a template forks its spare once idle (0.2 s)
            before = _starts(server, name)
            out = client.infer(name, {"x": x})
            answers[tier] = out["y"]
            after = _starts(server, name)
            assert after.get(tier, 0) == before.get(tier, 0) + 1, (tier, before, after)
            assert _state(client, name)[0] == "warm"
    first = answers["standby"]
    np.testing.assert_allclose(first, reference, rtol=1e-5, atol=1e-6)  # what the model computes
    for tier, y in answers.items():  # and every start, from whatever tier, the same bits
        assert y.dtype == first.dtype
        assert y.tobytes() == first.tobytes(), f"a start from {tier} answered differently"


def test_standby_memory_is_metered_until_the_template_is_released(
    server: ServerProcess, tmp_path: Path
) -> None:
    pkg, _ = _mlp(tmp_path)
    name = pkg.spec.name
    with Client(server.url, token=TOKEN) as client:
        client.deploy_package(pkg)
        server.wait_for_model(name)
        client.infer(name, {"x": np.zeros((1, 64), np.float32)})
        _to_zero(client, name)
        assert _state(client, name) == ("standby", True, True)

        def standby() -> float:
            return float(client.get("/v1/cost")["functions"][name]["standby_gb_s"])

        # Scaled to zero, it holds its template, spare and weights: standby grows (the
        # node reads what processes hold every 5 s).
        first = wait_until(lambda: standby() or None, 30.0, "standby memory metered")
        wait_until(lambda: standby() > first, 30.0, "standby memory to grow while scaled to zero")
        alive = client.get("/v1/cost")["functions"][name]["alive_s"]
        cost = client.get("/v1/cost")
        assert cost["total"]["overhead_gb_s"] > 0  # the zygote and the platform's own process
        assert cost["functions"][name]["standby_usd"] > 0

        # Its template (and weights) released: nothing more is metered for it.
        client.post(f"/v1/functions/{name}/tier", {"tier": "cold"})
        assert _state(client, name) == ("cold", False, False)
        released = standby()
        time.sleep(1.5)
        assert standby() == pytest.approx(released, abs=1e-6)
        assert client.get("/v1/cost")["functions"][name]["alive_s"] == pytest.approx(alive, abs=1e-6)
