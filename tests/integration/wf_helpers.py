"""Helpers for the workflow integration tests: real ``smss serve`` processes that can be
killed with SIGKILL and restarted on the same data directory, run submission and
polling over HTTP, and checkers of a run's log.

A killed platform leaves its run directory (``$TMPDIR/smss-XXXX``) and the ``/dev/shm``
segments named after it behind; :meth:`Platform.kill9` finds that directory through the
unix sockets its processes listen on, so it removes exactly those and nobody else's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import numpy as np

from postgres_fixtures import pg_execute
from smss.testing.server import ServerProcess, free_port, start_server, wait_until
from smss.workflow.builder import Workflow

T = TypeVar("T")

MODELS = Path(__file__).parent / "models"
STAGES_FILE = MODELS / "wf_stages.py"
TRACE_ENV = "SMSS_TEST_TRACE_DIR"
#: What each stage model adds to its input (``STEP`` in models/wf_stages.py).
STEP = 1000
#: Settings come from flags only, never from the developer's shell.
SERVER_ENV = {"SMSS_KEEP_ALIVE_S": "", "SMSS_TOKEN": "", "SMSS_URL": ""}
#: Client-side bound on one request: a hang fails the test instead of the suite.
REQUEST_TIMEOUT_S = 60.0
#: Generous bound on anything expected to happen soon (runs completing, processes exiting).
WAIT_S = 120.0
#: Strings an error body must never contain: tracebacks, source files, server paths.
LEAKY = ("Traceback", ".py", "site-packages", "/work/", f"{tempfile.gettempdir()}/")

FRAME_SHAPE = (1, 3, 64, 64)
BEHAVIOR_STAGES = ("perceive", "track", "respond")
SHM = Path("/dev/shm")


# ------------------------------------------------------------------ polling


# ------------------------------------------------------------------ processes


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None:
            kids.setdefault(int(stat[1]), []).append(int(entry.name))
    return kids


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (state, ppid, ...); None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): a reused pid is not mistaken for the process."""
    stat = _stat(pid)
    return None if stat is None or stat[0] == "Z" else (pid, stat[19])


def descendants(root: int) -> set[tuple[int, str]]:
    kids = _children()
    found: set[tuple[int, str]] = set()
    todo = [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            ident = _identity(child)
            if ident is not None and ident not in found:
                found.add(ident)
                todo.append(child)
    return found


def still_alive(processes: Iterable[tuple[int, str]]) -> list[int]:
    return [pid for pid, start in processes if _identity(pid) == (pid, start)]


def run_dirs(processes: Iterable[tuple[int, str]]) -> set[Path]:
    """The platform run directories (``$TMPDIR/smss-XXXX``) holding the unix sockets
    that ``processes`` (a platform's zygotes and instances) listen on."""
    inodes: set[str] = set()
    for pid, _ in processes:
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    tmp = Path(tempfile.gettempdir())
    found: set[Path] = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes:
            path = Path(fields[7])
            if path.parent.parent == tmp and path.parent.name.startswith("smss-"):
                found.add(path.parent)
    return found


# ------------------------------------------------------------------ a platform


@dataclass
class Platform:
    """One data directory served by successive ``smss serve`` processes."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    server: ServerProcess | None = None
    #: What killed platforms left behind (removed by :meth:`kill9`).
    leftovers: list[str] = field(default_factory=list)
    #: The log file of the latest ``smss serve`` started, whether or not it came up.
    last_log: Path | None = None

    @property
    def url(self) -> str:
        assert self.server is not None, "not running"
        return self.server.url

    @property
    def log_db(self) -> Path:
        return self.data_dir / "log.db"

    def start(self, *args: str) -> ServerProcess:
        """``smss serve ARGS``, returned once startup (and with ``--demo`` the demo deploy)
        is complete: it prints ``smss serving on URL`` then."""
        assert self.server is None or self.server.process.poll() is not None
        env = {**SERVER_ENV, **self.env}
        port = free_port()
        self.last_log = self.data_dir / f"server-{port}.log"
        # --adopt-window 0: a killed platform's processes die with it (these tests check
        # that; adoption by the next platform is tests/fault/test_restart.py's subject).
        server = start_server(self.data_dir, ["--adopt-window", "0", *args], env=env, port=port)
        self.server = server
        try:
            wait_until(lambda: self._started(server), WAIT_S, "smss serve to finish starting")
        except BaseException:
            self.stop(check=False)
            raise
        return server

    def start_refused(self, *args: str) -> str:
        """``smss serve ARGS`` must exit during startup (non-zero): its output."""
        try:
            server = self.start(*args)
        except RuntimeError as e:
            failure = str(e)
        else:
            self.stop(check=False)
            raise AssertionError(f"smss serve started:\n{server.log()[-3000:]}")
        assert "smss serve exited with 1" in failure, failure[-3000:]
        assert self.last_log is not None
        return self.last_log.read_text(errors="replace")

    def _started(self, server: ServerProcess) -> bool:
        if server.process.poll() is not None:
            raise AssertionError(f"smss serve exited:\n{server.log()[-4000:]}")
        return "smss serving on" in server.log()

    def log(self) -> str:
        return "" if self.server is None else self.server.log()

    def kill9(self) -> None:
        """SIGKILL the platform process; every process it started must die with it. Its
        run directory and ``/dev/shm`` segments stay behind (nothing is left to remove
        them, and a restarted platform does not): noted in ``leftovers``, then removed."""
        assert self.server is not None
        process = self.server.process
        family = descendants(process.pid)
        dirs = run_dirs(family)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        wait_until(lambda: not still_alive(family), 30, "the killed platform's processes to exit")
        for run_dir in dirs:
            for segment in SHM.glob(f"{run_dir.name}-*"):
                self.leftovers.append(str(segment))
                segment.unlink(missing_ok=True)
            if run_dir.exists():
                self.leftovers.append(str(run_dir))
                shutil.rmtree(run_dir, ignore_errors=True)

    def stop(self, *, check: bool = True) -> None:
        """SIGTERM: the platform exits cleanly and takes its processes with it."""
        server, self.server = self.server, None
        if server is None:
            return
        family = descendants(server.process.pid) if server.process.poll() is None else set()
        dirs = run_dirs(family)
        code = server.stop()
        if check:
            # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
            assert code in (0, -signal.SIGTERM), f"smss serve exited with {code}:\n{server.log()[-4000:]}"
            wait_until(lambda: not still_alive(family), 30, "the platform's processes to exit")
            left = [str(d) for d in dirs if d.exists()]
            left += [str(seg) for d in dirs for seg in SHM.glob(f"{d.name}-*")]
            assert left == [], f"a cleanly stopped platform left behind {left}"

    def close(self) -> None:
        if self.server is not None and self.server.process.poll() is None:
            self.stop(check=False)


@contextlib.contextmanager
def platform(data_dir: Path, env: dict[str, str] | None = None) -> Iterator[Platform]:
    p = Platform(data_dir, dict(env or {}))
    try:
        yield p
    finally:
        p.close()


def recovered_count(log: str) -> int:
    """How many unfinished runs a platform said it resumed at startup."""
    marker = "recovered "
    for line in log.splitlines():
        if "smss.workflow.engine" in line and marker in line and "unfinished runs" in line:
            return int(line.split(marker, 1)[1].split()[0])
    return 0


# ------------------------------------------------------------------ the log on disk


@dataclass(frozen=True)
class LogSnapshot:
    """What a killed platform's log held: read through a read-only connection."""

    statuses: dict[str, str]
    max_seq: int
    #: run -> stages with a StageCompleted in the log
    completed_stages: dict[str, set[str]]


def read_log(path: Path | str) -> LogSnapshot:
    """From an SQLite file, or from the schema of a ``--store postgresql://`` URL."""
    if isinstance(path, str):
        statuses = {str(r): str(s) for r, s in pg_execute(path, "SELECT run_id, status FROM runs")}
        ((top,),) = pg_execute(path, "SELECT coalesce(max(seq), 0) FROM events")
        done: dict[str, set[str]] = {}
        for run_id, stage in pg_execute(
            path, "SELECT run_id, stage FROM events WHERE type = 'StageCompleted'"
        ):
            done.setdefault(str(run_id), set()).add(str(stage))
        return LogSnapshot(statuses, int(top), done)  # type: ignore[call-overload]
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        statuses = dict(db.execute("SELECT run_id, status FROM runs").fetchall())
        max_seq = db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        completed: dict[str, set[str]] = {}
        for run_id, stage in db.execute("SELECT run_id, stage FROM events WHERE type = 'StageCompleted'"):
            completed.setdefault(run_id, set()).add(stage)
    finally:
        db.close()
    return LogSnapshot(statuses, int(max_seq), completed)


# ------------------------------------------------------------------ HTTP


def tensor_json(name: str, array: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": list(array.shape), "data": array.ravel().tolist()}


def frame(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(FRAME_SHAPE, dtype=np.float32)


def run_body(inputs: dict[str, np.ndarray], session: str | None = None, wait: bool = True) -> dict[str, Any]:
    return {"session": session, "wait": wait, "inputs": [tensor_json(k, v) for k, v in inputs.items()]}


def submit(
    client: httpx.Client,
    workflow: str,
    inputs: dict[str, np.ndarray],
    session: str | None = None,
    *,
    wait: bool = True,
) -> dict[str, Any]:
    r = client.post(f"/v1/workflows/{workflow}/runs", json=run_body(inputs, session, wait))
    assert r.status_code in (200, 202), (r.status_code, r.text[:500])
    body: dict[str, Any] = r.json()
    return body


def get_run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/runs/{run_id}")
    assert r.status_code == 200, (r.status_code, r.text[:500])
    body: dict[str, Any] = r.json()
    return body


def wait_terminal(
    client: httpx.Client, run_ids: Sequence[str], timeout_s: float = WAIT_S
) -> dict[str, dict[str, Any]]:
    """Poll until every run is no longer ``running``; their final documents."""
    runs: dict[str, dict[str, Any]] = {}

    def settled() -> bool:
        for run_id in run_ids:
            if run_id not in runs:
                run = get_run(client, run_id)
                if run["status"] != "running":
                    runs[run_id] = run
        return len(runs) == len(run_ids)

    wait_until(settled, timeout_s, f"{len(run_ids)} runs to finish", interval_s=0.2)
    return runs


def output(run: dict[str, Any], name: str) -> np.ndarray:
    out = run["outputs"][name]
    assert out["datatype"] == "FP32", out
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def runs_started(client: httpx.Client) -> int:
    r = client.get("/v1/log/stats")
    assert r.status_code == 200, r.text
    return int(r.json()["runs_started"])


def run_count(client: httpx.Client) -> int:
    r = client.get("/v1/runs", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return len(r.json()["runs"])


def assert_error(response: httpx.Response, status: int, *, echoes: Sequence[str] = ()) -> str:
    """``status`` with an ``{"error": ...}`` JSON body free of tracebacks and paths; the message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str), body
    assert body["error"], body
    for leak in LEAKY:
        if not any(leak in echoed for echoed in echoes):
            assert leak not in response.text, f"error body leaks {leak!r}: {response.text[:500]}"
    return str(body["error"])


# ------------------------------------------------------------------ checking a run's log


def events_of(run: dict[str, Any], kind: str, stage: str | None = None) -> list[dict[str, Any]]:
    return [e for e in run["events"] if e["type"] == kind and (stage is None or e.get("stage") == stage)]


def assert_once_per_stage(run: dict[str, Any], stages: Sequence[str]) -> None:
    """Exactly one StageCompleted per stage, seqs strictly increasing, one RunCompleted last."""
    seqs = [e["seq"] for e in run["events"]]
    assert seqs == sorted(set(seqs)), f"run {run['run_id']}: seqs not strictly increasing: {seqs}"
    done = Counter(e["stage"] for e in events_of(run, "StageCompleted"))
    assert done == Counter(stages), f"run {run['run_id']}: StageCompleted per stage {dict(done)}"
    assert [e["type"] for e in run["events"]].count("RunCompleted") == 1, run["events"]
    assert run["events"][-1]["type"] == "RunCompleted", run["events"][-1]


def assert_not_rerun(run: dict[str, Any], after_seq: int) -> None:
    """No stage that had completed by ``after_seq`` (a crash) was started again later."""
    done_before = {e["stage"] for e in events_of(run, "StageCompleted") if e["seq"] <= after_seq}
    again = [
        (e["stage"], e["attempt"])
        for e in events_of(run, "StageStarted")
        if e["seq"] > after_seq and e["stage"] in done_before
    ]
    assert again == [], f"run {run['run_id']}: completed stages started again after the crash: {again}"


# ------------------------------------------------------------------ the python stage models


def deploy_stage_models(url: str, classes: Iterable[str]) -> None:
    from smss.client import Client

    with Client(url) as admin:
        for cls in classes:
            admin.deploy(f"{STAGES_FILE}:{cls}")


def deploy_workflow(client: httpx.Client, wf: Workflow) -> None:
    r = client.post(
        "/v1/workflows", content=msgspec.json.encode(wf.spec()), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 201, (r.status_code, r.text[:500])


def tagged(tag: int) -> np.ndarray:
    """The input of run ``tag`` of a stage-model workflow: its first value is the tag."""
    x = np.zeros((1, 4), np.float32)
    x[0, 0] = tag
    x[0, 1] = 0.5
    return x


def trace(trace_dir: Path, function: str) -> Counter[int]:
    """How many times ``function`` ran on each run tag (the first input value mod STEP)."""
    path = trace_dir / f"{function}.trace"
    if not path.exists():
        return Counter()
    counts: Counter[int] = Counter()
    for line in path.read_text().splitlines():
        _pid, value = line.split()
        counts[round(float(value)) % STEP] += 1
    return counts


# ------------------------------------------------------------------ CLI


def smss_cli(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The ``smss`` command line in a subprocess, as a user runs it (wide, so rich does not wrap)."""
    return subprocess.run(
        [sys.executable, "-m", "smss.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **SERVER_ENV, "COLUMNS": "400", "NO_COLOR": "1"},
        stdin=subprocess.DEVNULL,
        check=False,
    )


# ------------------------------------------------------------------ submitting from threads


def submit_concurrently(
    url: str, jobs: dict[str, list[np.ndarray]], workflow: str = "behavior"
) -> list[tuple[str, str, np.ndarray]]:
    """One thread per session submits its frames in order with ``wait=false``; returns
    (run id, session, frame) for every acknowledged submission."""
    acked: list[tuple[str, str, np.ndarray]] = []
    errors: list[str] = []
    lock = threading.Lock()

    # Encoded up front: the client's JSON encoding must not be what paces the submissions.
    bodies = {
        session: [msgspec.json.encode(run_body({"frame": f}, session, wait=False)) for f in frames]
        for session, frames in jobs.items()
    }
    headers = {"Content-Type": "application/json"}

    def worker(session: str, frames: list[np.ndarray]) -> None:
        try:
            with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
                for f, body in zip(frames, bodies[session], strict=True):
                    r = client.post(f"/v1/workflows/{workflow}/runs", content=body, headers=headers)
                    if r.status_code != 202:
                        raise AssertionError(f"{r.status_code} {r.text[:300]}")
                    with lock:
                        acked.append((r.json()["run_id"], session, f))
        except Exception as e:
            with lock:
                errors.append(f"{session}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "a submitting thread hung"
    assert errors == [], errors
    return acked


# ------------------------------------------------------------------ the behavior pipeline in-process


class BehaviorReference:
    """The demo pipeline's three models loaded in this process from a platform's own
    weights: what a failure-free, one-run-at-a-time execution computes."""

    def __init__(self, demo_dir: Path) -> None:
        import torch

        import smss
        from smss.demo import models
        from smss.demo.generate import ensure_artifact

        torch.set_num_threads(1)  # the platform's workers share this machine's cores
        self.models: dict[str, Any] = {}
        for name, cls in (
            ("behavior_perceive", models.Perceive),
            ("behavior_track", models.Track),
            ("behavior_respond", models.Respond),
        ):
            artifact = ensure_artifact(demo_dir, name)
            model = cls()
            model.load(smss.Weights(artifact.weights, artifact.weights_format))
            self.models[name] = model
        self.hidden = models.HIDDEN

    def session(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The action of each turn of one session, from zero state."""
        h = np.zeros((1, self.hidden), np.float32)
        actions = []
        for f in frames:
            features = self.models["behavior_perceive"].predict({"frame": f})["features"]
            h = self.models["behavior_track"].predict({"features": features, "h": h})["h"]
            actions.append(np.asarray(self.models["behavior_respond"].predict({"h": h})["action"]))
        return actions


def assert_probabilities(action: np.ndarray) -> None:
    assert action.shape == (1, 8), action.shape
    assert np.all(np.isfinite(action)), action
    assert np.all(action >= 0), action
    assert abs(float(action.sum()) - 1.0) < 1e-4, action
