"""``smss bench cold-start``: container-style start vs SMSS's fork-and-attach, per model size.

For ``cnn`` (11M parameters) and ``cnn_large`` (~100M), in one run:

* ``naive_ms``: spawn of a fresh interpreter that imports torch, builds the
  model, loads the safetensors file and answers one request over a Unix
  socket, until that answer arrives (median of 5);
* ``cold_ms``: one binary-tensor HTTP request to the running platform for the
  function at zero instances, weights resident in the store (median of 5,
  scaled to zero between tries);
* ``cold_uncached_ms``: the same after evicting the weights (and so the model's
  template) from the store;
* ``warm_ms``: the same request to a warm instance (median of 20);
* ``speedup`` = (naive - warm) / (cold - warm);
* ``start_phases_ms``: where the platform spent a cached cold start (from /metrics);
* ``ray_serve_cold_ms``: Ray Serve's first request after scale-to-zero where
  ``ray[serve]`` is installed, else null with the reason.

For ``cnn`` it also starts four instances of one function and reports their
proportional set sizes (PSS), showing one shared copy of the weights.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss.testing.server import running_server

TRIES = 5


def _binary_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = msgspec.json.encode(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    )
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + x.tobytes(), headers


def naive_ms(source: Path, class_name: str, weights: Path, x: np.ndarray, tmp: Path) -> float:
    import asyncio

    from smss.node import ipc

    async def once(i: int) -> float:
        sock = tmp / f"naive-{i}.sock"
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "smss.bench.naive",
            str(source),
            class_name,
            str(weights),
            str(sock),
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        await proc.stdout.readline()
        reader, writer = await asyncio.open_unix_connection(str(sock))
        metas, buffers = ipc.tensor_metas({"image": x})
        ipc.write_frame(writer, ipc.Infer(1, metas, ("logits",)), buffers)
        await ipc.read_frame(reader)
        elapsed = (time.perf_counter() - t0) * 1000
        writer.close()
        await proc.wait()
        return elapsed

    return statistics.median(asyncio.run(once(i)) for i in range(TRIES))


class _Platform:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {token}"})

    def infer_ms(self, name: str, body: bytes, headers: dict[str, str]) -> float:
        t0 = time.perf_counter()
        r = self.http.post(f"/v2/models/{name}/infer", content=body, headers=headers)
        elapsed = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        return elapsed

    def instances(self, name: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.http.get(f"/v1/functions/{name}").json()["instances"]
        return result

    def to_zero(self, name: str) -> None:
        self.http.post(f"/v2/repository/models/{name}/unload").raise_for_status()
        deadline = time.monotonic() + 60
        while self.instances(name) and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_instances(self, name: str, n: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 120
        while len(found := self.instances(name)) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        return found

    def phases(self, name: str) -> dict[str, float]:
        text = self.http.get("/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("smss_start_phase_seconds_sum{") and f'function="{name}"' in line:
                phase = line.split('phase="')[1].split('"')[0]
                out[phase] = round(float(line.rsplit(" ", 1)[1]) * 1000, 2)
        return out


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def vma_of(pid: int, address: int) -> dict[str, int]:
    """The smaps fields (kB) of the mapping of ``pid`` that contains ``address``."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.split()[-1] == "kB":
            fields[head.rstrip(":")] = int(line.split()[1])
    return fields


def measure_platform(p: _Platform, name: str, x: np.ndarray) -> dict[str, Any]:
    body, headers = _binary_request(x)
    p.infer_ms(name, body, headers)  # first start: zygote + weights + template
    warm = statistics.median(p.infer_ms(name, body, headers) for _ in range(20))
    cold = []
    for _ in range(TRIES):
        p.to_zero(name)
        cold.append(p.infer_ms(name, body, headers))
    phases_before = p.phases(name)
    uncached = []
    for _ in range(TRIES):
        p.to_zero(name)
        p.http.delete(f"/v1/weights/{name}").raise_for_status()
        uncached.append(p.infer_ms(name, body, headers))
    return {
        "warm_ms": round(warm, 2),
        "cold_ms": round(statistics.median(cold), 2),
        "cold_uncached_ms": round(statistics.median(uncached), 2),
        "cold_samples_ms": [round(c, 1) for c in cold],
        "start_phases_ms_total": phases_before,
    }


def run() -> list[dict[str, Any]]:
    from smss.demo import models
    from smss.demo.generate import ensure_artifact
    from smss.packaging import package_class

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 64, 64), dtype=np.float32)
    results = []
    with tempfile.TemporaryDirectory(prefix="smss-bench-") as tmp_name:
        tmp = Path(tmp_name)
        arts = {n: ensure_artifact(tmp / "demo", n) for n in ("cnn", "cnn_large")}
        naive = {n: naive_ms(a.source, a.class_name, a.weights, x, tmp) for n, a in arts.items()}
        token = "bench-token"
        with running_server(tmp / "platform", ["--token", token, "--log-level", "warning"]) as server:
            p = _Platform(server.url, token)
            for name, art in arts.items():
                cls = getattr(models, art.class_name)
                pkg = package_class(art.source, cls, art.weights)
                _deploy(p, pkg)
                r = measure_platform(p, name, x)
                speedup = (naive[name] - r["warm_ms"]) / max(r["cold_ms"] - r["warm_ms"], 1e-3)
                results.append(
                    {
                        "model": name,
                        "naive_ms": round(naive[name], 1),
                        **r,
                        "speedup": round(speedup, 1),
                        "start_ms": round(r["cold_ms"] - r["warm_ms"], 2),
                        "ray_serve_cold_ms": None,
                        "ray_serve_note": ray_serve_note(),
                    }
                )
                p.to_zero(name)
            results[0]["pss_4_instances"] = measure_pss(p, arts["cnn"], x)
    return results


def _deploy(p: _Platform, pkg: Any, **scaling: int) -> None:
    spec = pkg.spec
    if scaling:
        spec = msgspec.structs.replace(spec, scaling=msgspec.structs.replace(spec.scaling, **scaling))
        spec = msgspec.structs.replace(spec, name=f"{spec.name}_x4")
    with pkg.weights.open("rb") as f:
        p.http.put(f"/v1/uploads/{pkg.weights_sha256}", content=f).raise_for_status()
    body = {"spec": msgspec.to_builtins(spec), "source": pkg.source, "weights_sha256": pkg.weights_sha256}
    p.http.post("/v1/functions", json=body).raise_for_status()


def measure_pss(p: _Platform, art: Any, x: np.ndarray) -> dict[str, Any]:
    from smss.demo import models
    from smss.packaging import package_class

    pkg = package_class(art.source, getattr(models, art.class_name), art.weights)
    _deploy(p, pkg, min_instances=4, max_instances=4)
    name = f"{pkg.spec.name}_x4"
    instances = p.wait_instances(name, 4)
    body, headers = _binary_request(x)
    for _ in range(8):
        p.infer_ms(name, body, headers)
    pids = [i["pid"] for i in instances]
    templates = p.http.get("/v1/weights").json()["local"]["templates"]
    template = next(t for key, t in templates.items() if key.startswith(f"{name}@"))
    weights = [vma_of(pid, template["weights_address"]) for pid in pids]
    pss = [pss_kb(pid) for pid in pids]
    weights_mb = art.weights.stat().st_size / 2**20
    return {
        "instances": len(pids),
        "weights_mb": round(weights_mb, 1),
        "pss_mb": [round(k / 1024, 1) for k in pss],
        "pss_total_mb": round(sum(pss) / 1024, 1),
        # The weights' mapping in each instance: PSS is its fair share of the one copy
        # that the template and every instance map (5 sharers -> about weights_mb / 5).
        "weights_pss_mb": [round(w.get("Pss", 0) / 1024, 1) for w in weights],
        "weights_private_mb": [
            round((w.get("Private_Clean", 0) + w.get("Private_Dirty", 0)) / 1024, 1) for w in weights
        ],
        "one_shared_copy": all(w.get("Private_Clean", 0) + w.get("Private_Dirty", 0) == 0 for w in weights),
    }


def ray_serve_note() -> str:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return "ray[serve] is not installed (pip install 'smss[bench]'); not measured"
    return "ray[serve] installed but the Ray Serve comparison is not implemented yet"


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        for row in run():
            sys.stdout.write(msgspec.json.encode(row).decode() + "\n")
    os._exit(0)
