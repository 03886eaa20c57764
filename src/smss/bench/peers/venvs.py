"""``smss bench peers --setup``: one virtual environment per framework peer.

The peers pin what SMSS's own environment cannot hold at once (KServe 0.21 pins
``psutil<6``; MLServer 1.7.1 pins ``fastapi<0.116`` and needs ``uvloop<0.22``:
with 0.23 its worker dies with "There is no current event loop" and every
request gets 400), so each gets its own environment under the peers directory
(default ``~/.cache/smss/peers/<name>``), with ``torch==2.13.0`` installed first
(the wheel SMSS runs; any other version would be a download of gigabytes) and
the few packages the peers' servers import of SMSS. The peers run the bench's
own ``smss`` package (put on their ``PYTHONPATH``), so a peer set up once
serves every later version of the bench.

A peer is set up when its environment holds a marker (``smss-peer.json``,
written last, after an import check of its server) naming the same pins as
:data:`PINS`; ``smss bench peers --json`` installs nothing and reports a peer
without one as not set up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TORCH = "torch==2.13.0"
#: name -> what pip installs beside torch (and :data:`SMSS_DEPS`).
PINS: dict[str, tuple[str, ...]] = {
    "ray_serve": ("ray[serve]>=2.60,<2.61",),
    "kserve": ("kserve==0.21.*",),
    "mlserver": ("mlserver==1.7.1", "uvloop<0.22"),
}
#: What the peers' servers import of SMSS (its package itself comes on PYTHONPATH).
SMSS_DEPS = (
    "numpy>=1.26",
    "msgspec>=0.18",
    "safetensors>=0.4",
    "httpx>=0.27",
    "rich>=13",
    "typer>=0.12",
    "pyyaml>=6",
)
#: name -> (the module whose import shows its server can start, the distributions recorded).
CHECKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ray_serve": ("smss.bench.peers.ray_serve_server", ("ray", "torch", "starlette")),
    "kserve": ("smss.bench.peers.kserve_server", ("kserve", "torch", "fastapi", "psutil")),
    "mlserver": ("smss.bench.peers.mlserver_runtime", ("mlserver", "torch", "fastapi", "uvloop")),
}
MARKER = "smss-peer.json"
NOT_SET_UP = "not set up: run smss bench peers --setup"


def default_dir() -> Path:
    return Path.home() / ".cache" / "smss" / "peers"


def python_of(peers_dir: Path, name: str) -> Path:
    return peers_dir / name / "bin" / "python"


def pins_of(name: str) -> list[str]:
    return [TORCH, *PINS[name], *SMSS_DEPS]


def marker(peers_dir: Path, name: str) -> dict[str, object] | None:
    """The peer's marker when it is set up for today's pins, else None."""
    try:
        data: dict[str, object] = json.loads((peers_dir / name / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if data.get("pins") != pins_of(name) or not python_of(peers_dir, name).exists():
        return None
    return data


def smss_path(work: Path) -> str:
    """A directory holding only this ``smss`` package (a link to it), for a peer's
    PYTHONPATH: the package's parent may be a site-packages full of other things."""
    import smss

    root = work / "pythonpath"
    root.mkdir(parents=True, exist_ok=True)
    link = root / "smss"
    if not link.exists():
        link.symlink_to(Path(smss.__file__).resolve().parent, target_is_directory=True)
    return str(root)


def setup(peers_dir: Path, names: list[str], log: Callable[[str], None]) -> dict[str, dict[str, object]]:
    """Create (or update) the environments of ``names``; per peer, what it holds or its error."""
    out: dict[str, dict[str, object]] = {}
    for name in names:
        t0 = time.monotonic()
        try:
            out[name] = _setup_one(peers_dir, name, log)
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        out[name]["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _setup_one(peers_dir: Path, name: str, log: Callable[[str], None]) -> dict[str, object]:
    env_dir = peers_dir / name
    python = python_of(peers_dir, name)
    (env_dir / MARKER).unlink(missing_ok=True)
    if not python.exists():
        log(f"{name}: creating {env_dir}")
        _run([sys.executable, "-m", "venv", str(env_dir)], env_dir.parent / f"{name}-venv.log")
    setup_log = env_dir / "setup.log"
    log(f"{name}: pip install {TORCH} (log: {setup_log})")
    _run([str(python), "-m", "pip", "install", TORCH], setup_log)
    log(f"{name}: pip install {' '.join(PINS[name])}")
    # torch pinned again: nothing the peer brings may move it.
    _run([str(python), "-m", "pip", "install", *pins_of(name)], setup_log)
    module, dists = CHECKS[name]
    code = (
        f"import importlib, importlib.metadata as m, json; importlib.import_module({module!r}); "
        f"print(json.dumps({{d: m.version(d) for d in {list(dists)!r}}}))"
    )
    log(f"{name}: checking that {module} imports")
    peers_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="check-", dir=peers_dir) as tmp:
        env = {**os.environ, "PYTHONPATH": smss_path(Path(tmp))}
        done = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp
        )
    if done.returncode:
        raise RuntimeError(f"{module} does not import in {env_dir}: {done.stderr.strip()[-2000:]}")
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    data = {"pins": pins_of(name), "versions": versions, "python": str(python), "created": time.time()}
    (env_dir / MARKER).write_text(json.dumps(data, indent=1))
    return {"python": str(python), "versions": versions}


def _run(cmd: list[str], log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=3600)
    if done.returncode:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {done.returncode}:\n{tail}")
