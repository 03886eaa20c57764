"""``smss bench peers``: each system in turn, serving each model, driven by the same load generator.

For every system and model: a fresh server (its processes under the placement's
taskset, one thread each), ready when it answers the JSON request; its answer
checked against the model run in this process; then, from the load generator
(:mod:`smss.bench.loadgen`, its own process, alone on the load generator's core):

1. the bursty phase, after ``warmup_s`` at one client: one client, then 32, then
   one again, ``duration_s`` each, one p99 over the three (and one per phase);
2. each concurrency level: ``warmup_s`` not recorded, then ``duration_s``
   recorded, with the V2 JSON body and, where the system takes the binary tensor
   extension, with the binary body too.

Then the server is stopped (SIGTERM, then SIGKILL to what is left of its process
group). A system that is not set up, or fails, is reported with its error; the
others still run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from smss.bench.loadgen import Phase
from smss.bench.peers import container, kserve, mlserver, ray_serve, report, smss_serve, venvs
from smss.bench.peers.common import ModelInfo, binary_body, demo_model, json_body, load_model, output_of
from smss.bench.peers.common import sample_input as sample
from smss.bench.peers.launch import Launch, Placement
from smss.testing.server import free_port

Launcher = Callable[[ModelInfo, Placement, int, Path, Path], Launch]
#: system -> (how it is started, the peer environment it runs in; None: this interpreter).
SYSTEMS: dict[str, tuple[Launcher, str | None]] = {
    "smss": (smss_serve.launch, None),
    "ray_serve": (ray_serve.launch, "ray_serve"),
    "kserve": (kserve.launch, "kserve"),
    "mlserver": (mlserver.launch, "mlserver"),
    "container": (container.launch_one, None),
    "container_per_core": (container.launch_per_core, None),
}
BURST_CLIENTS = 32
#: An answer this far from the in-process model's fails the output check.
OUTPUT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Options:
    systems: tuple[str, ...] = report.SYSTEMS
    models: tuple[str, ...] = ("mlp", "cnn")
    concurrency: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 10.0
    warmup_s: float = 3.0
    bursty: bool = True
    binary: bool = True
    peers_dir: Path = field(default_factory=venvs.default_dir)


Progress = Callable[[str], None]


def run(options: Options, progress: Progress = lambda _: None) -> dict[str, Any]:
    placement = Placement.of(sorted(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory(prefix="smss-peers-") as tmp:
        work = Path(tmp)
        infos = {name: demo_model(work / "demo", name) for name in options.models}
        bench = _Bench(options, placement, work, venvs.smss_path(work), progress)
        systems = {name: bench.system(name, infos) for name in options.systems}
    settings = {
        "duration_s": options.duration_s,
        "warmup_s": options.warmup_s,
        "concurrency": list(options.concurrency),
        "models": list(options.models),
        "bursty_clients": [1, BURST_CLIENTS, 1] if options.bursty else None,
        "placement": placement.describe(),
        "load_generator": "smss.bench.loadgen: closed loop, one keep-alive connection per client, "
        "one process (uvloop) alone on the load generator's core",
        "bodies": "V2 JSON for every system; V2 binary tensor extension too where a system takes it",
        "machine": _machine(),
        "note": "figures from a shared or virtual machine are noisy; compare systems within one run",
    }
    return report.assemble(systems, list(options.models), list(options.concurrency), settings)


Body = tuple[Path, list[tuple[str, str]]]


@dataclass
class _Bench:
    """One run: what every system is measured with."""

    options: Options
    placement: Placement
    work: Path
    #: The PYTHONPATH that gives every process (peers in their environments too) this smss.
    pythonpath: str
    progress: Progress
    references: dict[str, np.ndarray] = field(default_factory=dict)

    def system(self, name: str, infos: dict[str, ModelInfo]) -> dict[str, Any]:
        launcher, environment = SYSTEMS[name]
        version: object
        if environment is None:
            python, version = Path(sys.executable), _local_version(name)
        else:
            found = venvs.marker(self.options.peers_dir, environment)
            if found is None:
                self.progress(f"{name}: {venvs.NOT_SET_UP}")
                return {"error": venvs.NOT_SET_UP}
            python, version = venvs.python_of(self.options.peers_dir, environment), found.get("versions")
        models = {}
        for model, info in infos.items():
            work = self.work / name / model
            work.mkdir(parents=True)
            launch = launcher(info, self.placement, free_port(), python, work)
            models[model] = self.measure(f"{name} {model}", info, launch, work)
        return {"version": version, "models": models}

    def measure(self, label: str, info: ModelInfo, launch: Launch, work: Path) -> dict[str, Any]:
        options = self.options
        out: dict[str, Any] = {"settings": launch.settings}
        body = json_body(info)
        (work / "body.json").write_bytes(body)
        bodies: dict[str, Body] = {"json": (work / "body.json", [])}
        if launch.binary and options.binary:
            raw, headers = binary_body(info)
            (work / "body.bin").write_bytes(raw)
            bodies["binary"] = (work / "body.bin", headers)
        if info.name not in self.references:
            self.references[info.name] = _reference(info)
        self.progress(f"{label}: starting")
        t0 = time.monotonic()
        server = _start(launch, self.placement, work, self.pythonpath)
        try:
            answer = _wait_ready(launch, body, server)
            out["startup_s"] = round(time.monotonic() - t0, 1)
            out["output_check"] = _check(answer, info, self.references[info.name])
            if options.bursty:
                self.progress(f"{label}: bursty 1 -> {BURST_CLIENTS} -> 1 clients")
                d = options.duration_s
                phases = [*self._warmup(1), Phase(1, d), Phase(BURST_CLIENTS, d), Phase(1, d)]
                out["bursty"] = self.drive(launch, bodies["json"], phases)
            points: dict[str, dict[str, Any]] = {}
            for kind, body_file in bodies.items():
                for c in options.concurrency:
                    self.progress(f"{label}: {kind} bodies, {c} clients")
                    phases = [*self._warmup(c), Phase(c, options.duration_s)]
                    points.setdefault(kind, {})[str(c)] = self.drive(launch, body_file, phases)["total"]
            out["points"] = points
        except Exception as e:  # one system's failure is its entry, not the bench's end
            out["error"] = f"{type(e).__name__}: {e}"
            out["log_tail"] = _tail(work / "server.log")
            self.progress(f"{label}: {out['error']}")
        finally:
            _stop(server)
        return out

    def _warmup(self, clients: int) -> list[Phase]:
        return [Phase(clients, self.options.warmup_s, record=False)] if self.options.warmup_s > 0 else []

    def drive(self, launch: Launch, body: Body, phases: list[Phase]) -> dict[str, Any]:
        """The load generator's result for ``phases``, run in its own process on its own core."""
        body_file, headers = body
        spec = ",".join(f"{p.clients}:{p.seconds:g}{'' if p.record else ':warmup'}" for p in phases)
        cmd = [
            *self.placement.loadgen_taskset(),
            sys.executable,
            "-m",
            "smss.bench.loadgen",
            "--phases",
            spec,
            *(f"--header={k}:{v}" for k, v in headers),
            launch.url,
            launch.infer_path,
            str(body_file),
        ]
        limit = sum(p.seconds for p in phases) + 120
        env = _env(self.placement, self.pythonpath, {})
        done = subprocess.run(cmd, capture_output=True, timeout=limit, env=env)
        if done.returncode:
            raise RuntimeError(f"the load generator failed: {done.stderr.decode(errors='replace')[-2000:]}")
        result: dict[str, Any] = msgspec.json.decode(done.stdout)
        return result


# -- processes -------------------------------------------------------------------------------------


def _env(placement: Placement, pythonpath: str, extra: dict[str, str]) -> dict[str, str]:
    inherited = os.environ.get("PYTHONPATH")
    path = pythonpath if not inherited else f"{pythonpath}{os.pathsep}{inherited}"
    return {**os.environ, **placement.env(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def _start(launch: Launch, placement: Placement, work: Path, pythonpath: str) -> subprocess.Popen[bytes]:
    for relative, text in launch.files.items():
        target = work / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    with (work / "server.log").open("ab") as log:
        return subprocess.Popen(
            [*placement.taskset(), *launch.argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=launch.cwd or str(work),
            env=_env(placement, pythonpath, launch.env),
            start_new_session=True,  # its own process group: stopped as one
        )


def _wait_ready(launch: Launch, body: bytes, server: subprocess.Popen[bytes]) -> bytes:
    """The first 200 answer to the JSON request (models deploy and scale up on their own)."""
    deadline = time.monotonic() + launch.ready_timeout_s
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                r = client.post(
                    launch.url + launch.infer_path, content=body, headers={"Content-Type": "application/json"}
                )
                if r.status_code == 200:
                    return r.content
            time.sleep(0.25)
    raise TimeoutError(f"no answer within {launch.ready_timeout_s:.0f} s")


def _stop(server: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(grace_s)
    # What is left of its process group (the server's own session), then the server.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


# -- checks and facts ------------------------------------------------------------------------------


def _reference(info: ModelInfo) -> np.ndarray:
    model = load_model(info)
    y: np.ndarray = model.predict({info.input_name: sample(info)})[info.output_name]
    return y


def _check(answer: bytes, info: ModelInfo, reference: np.ndarray) -> dict[str, Any]:
    try:
        y = output_of(answer, info.output_name)
    except (ValueError, KeyError, TypeError) as e:
        return {"ok": False, "error": f"unreadable answer: {e}"}
    if y.shape != reference.shape:
        return {"ok": False, "error": f"shape {list(y.shape)}, expected {list(reference.shape)}"}
    diff = float(np.max(np.abs(y - reference)))
    return {"ok": diff <= OUTPUT_TOLERANCE, "max_abs_diff": diff}


def _local_version(name: str) -> dict[str, str]:
    if name == "smss":
        import smss

        return {"smss": smss.__version__, "torch": metadata.version("torch")}
    return {d: metadata.version(d) for d in ("uvicorn", "starlette", "torch")}


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
