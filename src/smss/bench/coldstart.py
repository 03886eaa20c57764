"""``smss bench cold-start``: container-style start vs SMSS's fork-and-attach, per model size.

For ``cnn`` (11M parameters) and ``cnn_large`` (~100M), in one run:

* ``naive_ms``: spawn of a fresh interpreter that imports torch, builds the
  model, loads the safetensors file and answers one request over a Unix
  socket, until that answer arrives (median of 5);
* ``cold_ms``: one binary-tensor HTTP request to the running platform for the
  function at zero instances, weights resident in the store (median of 5,
  scaled to zero between tries, each try after ``AT_ZERO_S`` at zero);
* ``cold_uncached_ms``: the same after evicting the weights (and so the model's
  template) from the store;
* ``warm_ms``: the same request to a warm instance, under the same conditions as
  a cold try: after ``AT_ZERO_S`` without requests (median of 5, interleaved with
  the cold tries). An idle virtual CPU answers an isolated request slower than a
  stream of them (here about 13 ms against 10 ms for ``cnn``), and that is not
  start-up time. ``warm_back_to_back_ms`` is the median of 20 requests in a row;
  ``speedup_vs_back_to_back`` uses it instead (the stricter figure);
* ``speedup`` = (naive - warm) / (cold - warm), with ``cold - warm`` taken as at
  least ``MIN_START_MS`` (a cold median at or below the warm one means a start
  these medians cannot resolve, not an infinite speedup);
* ``start_phases_ms``: where the platform spent a cached cold start (from /metrics);
* ``tiers``: per tier of readiness (``standby``, ``resident``, ``cold``, ``no_runtime``),
  ``start_ms`` (a start from it less the warm median) and ``resident_mb`` (what the tier
  keeps: its processes' PSS without the segments they map, plus the segments; ``own_mb``
  without the runtime's zygote), see :mod:`smss.bench.tiers`; ``standby_mb`` is
  standby's, and ``standby_within_2ms_of_warm`` says whether a start from standby added
  at most 2 ms;
* ``ray_serve_cold_ms``: where the ``bench`` extra (``ray[serve]``) is
  installed, the first request to a Ray Serve deployment of the same model
  that has scaled to zero (median of 5), with ``ray_serve_warm_ms``,
  ``ray_serve_samples_ms`` and ``ray_serve_config`` (the autoscaling settings,
  tuned for scale-to-zero: see :mod:`smss.bench.peers.rayserve`, which runs in
  its own process after the platform has stopped); else null, with the reason
  in ``ray_serve_note``.

For ``cnn`` it also starts four instances of one function and reports their
proportional set sizes (PSS), showing one shared copy of the weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss.bench.tiers import measure_tiers
from smss.node.worker import child_pids
from smss.testing.server import running_server

TRIES = 5
#: How long a function stays at zero before each cold try. A function scales to zero
#: after a keep-alive of seconds or more without requests, so the next request finds
#: the platform settled (on this platform: the model's template with its spare).
AT_ZERO_S = 1.0
#: The least start-up time a speedup is computed with (see the module docstring).
MIN_START_MS = 0.1


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

    def get(self, path: str) -> Any:
        r = self.http.get(path)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: object) -> Any:
        r = self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()

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
    back_to_back = statistics.median(p.infer_ms(name, body, headers) for _ in range(20))
    warm, cold = [], []
    for _ in range(TRIES):
        # A warm instance and a cold start meet the same machine: each request comes
        # after AT_ZERO_S without one (an idle vCPU answers slower than a busy one).
        time.sleep(AT_ZERO_S)
        warm.append(p.infer_ms(name, body, headers))
        p.to_zero(name)
        time.sleep(AT_ZERO_S)
        cold.append(p.infer_ms(name, body, headers))
    phases_before = p.phases(name)
    uncached = []
    for _ in range(TRIES):
        p.to_zero(name)
        p.http.delete(f"/v1/weights/{name}").raise_for_status()
        uncached.append(p.infer_ms(name, body, headers))
    return {
        "warm_ms": round(statistics.median(warm), 2),
        "warm_back_to_back_ms": round(back_to_back, 2),
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
        args = ["--token", token, "--log-level", "warning", "--keep-alive-policy", "fixed:300"]
        with running_server(tmp / "platform", args) as server:
            p = _Platform(server.url, token)
            for name, art in arts.items():
                cls = getattr(models, art.class_name)
                pkg = package_class(art.source, cls, art.weights)
                _deploy(p, pkg)
                r = measure_platform(p, name, x)
                r["tiers"] = measure_tiers(
                    p, name, "torch", _binary_request(x), r["warm_ms"], TRIES, AT_ZERO_S
                )
                r["standby_mb"] = r["tiers"]["standby"]["resident_mb"]
                r["standby_within_2ms_of_warm"] = r["tiers"]["standby"]["start_ms"] <= 2.0
                speedup = (naive[name] - r["warm_ms"]) / max(r["cold_ms"] - r["warm_ms"], MIN_START_MS)
                b2b = r["warm_back_to_back_ms"]
                speedup_b2b = (naive[name] - b2b) / max(r["cold_ms"] - b2b, MIN_START_MS)
                results.append(
                    {
                        "model": name,
                        "naive_ms": round(naive[name], 1),
                        **r,
                        "speedup": round(speedup, 1),
                        # The same against the back-to-back warm latency: a cold start
                        # then also pays for the idle machine (the stricter figure).
                        "speedup_vs_back_to_back": round(speedup_b2b, 1),
                        "start_ms": round(r["cold_ms"] - r["warm_ms"], 2),
                    }
                )
                p.to_zero(name)
            results[0]["pss_4_instances"] = measure_pss(p, arts["cnn"], x)
        # After the platform has stopped, so that the two never share the CPUs.
        peer = ray_serve(arts)
        for row in results:
            row.update(peer[row["model"]])
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
    time.sleep(AT_ZERO_S)  # the template forks its spare once idle
    spares = child_pids(template["pid"]) - set(pids)
    return {
        # What the template's spare (the next instance, forked and rehearsed) costs.
        "template_pss_mb": round(pss_kb(template["pid"]) / 1024, 1),
        "spare_pss_mb": round(pss_kb(next(iter(spares))) / 1024, 1) if spares else None,
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


#: Wall-clock limit of the whole Ray Serve peer (start, both models, shutdown).
RAY_SERVE_TIMEOUT_S = 900.0


def ray_serve(arts: dict[str, Any], timeout: float = RAY_SERVE_TIMEOUT_S) -> dict[str, dict[str, Any]]:
    """The ``ray_serve_*`` fields of each model's row: measured by ``python -m
    smss.bench.peers.rayserve`` where ray is installed, else null with the reason.
    Never raises: any failure of the peer becomes ``ray_serve_note``."""
    if importlib.util.find_spec("ray") is None:
        return _ray_serve_failed(
            arts, "ray[serve] is not installed (pip install 'smss[bench]'); not measured"
        )
    cmd = [sys.executable, "-m", "smss.bench.peers.rayserve", "--tries", str(TRIES)]
    for name, art in arts.items():
        cmd += ["--model", name, str(art.source), art.class_name, str(art.weights)]
    return peer_fields(list(arts), cmd, timeout)


def peer_fields(models: list[str], cmd: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Run the peer command ``cmd`` and map its JSON line to each model's ``ray_serve_*`` fields."""
    t0 = time.monotonic()
    try:
        out = _run_peer(cmd, timeout)
    except Exception as e:
        return _ray_serve_failed(models, f"the Ray Serve peer failed: {e}")
    sys.stderr.write(f"smss bench: the Ray Serve peer took {time.monotonic() - t0:.0f} s\n")
    if "error" in out:
        return _ray_serve_failed(models, f"Ray Serve did not run: {out['error']}")
    config = f"Ray {out.get('ray_version', '?')}: {out.get('config', '?')}"
    fields = {}
    for name in models:
        m = out.get("models", {}).get(name) or {"error": "no result"}
        row: dict[str, Any] = {
            "ray_serve_cold_ms": m.get("cold_ms"),
            "ray_serve_warm_ms": m.get("warm_ms"),
            "ray_serve_samples_ms": m.get("samples_ms"),
            "ray_serve_config": config,
        }
        note = "; ".join(str(m[k]) for k in ("error", "note") if m.get(k))
        if row["ray_serve_cold_ms"] is None:
            note = note or "no cold sample"
        row["ray_serve_note"] = note or None
        fields[name] = row
    return fields


def _run_peer(cmd: list[str], timeout: float) -> dict[str, Any]:
    """The peer's JSON line (the last stdout line that is a JSON object), or raise."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGINT first: the peer's finally shuts Serve and Ray down; then the whole group.
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"no result within {timeout:.0f} s") from None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                result = json.loads(line)
                if isinstance(result, dict):
                    return result
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    raise RuntimeError(f"exit status {proc.returncode}, no JSON result: {tail[-500:]}")


def _ray_serve_failed(models: Iterable[str], note: str) -> dict[str, dict[str, Any]]:
    return {name: {"ray_serve_cold_ms": None, "ray_serve_note": note} for name in models}


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        for row in run():
            sys.stdout.write(msgspec.json.encode(row).decode() + "\n")
    os._exit(0)
