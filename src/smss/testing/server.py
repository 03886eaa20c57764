"""Run ``smss serve`` as a real subprocess on free ports, HTTP and gRPC (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail after a generous bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path
    #: ``127.0.0.1:PORT`` of its gRPC service (None when started with ``--grpc-port 0``).
    grpc_address: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_model(self, name: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"smss serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/models/{name}", timeout=5).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"model {name} not deployed within {timeout_s} s:\n{self.log()[-4000:]}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    data_dir: Path,
    args: Sequence[str] = (),
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 120.0,
    wrapper: Sequence[str] = (),
) -> ServerProcess:
    """``smss serve`` on ``data_dir``, ready. ``wrapper``: words the server's command line
    is appended to (e.g. ``unshare`` and a shell that mounts a small ``/dev/shm`` first).
    With ``SMSS_FAULT`` in ``env`` it is given ``--allow-faults``: the fault points are
    switched on."""
    port = port or free_port()
    if (env or {}).get("SMSS_FAULT"):
        args = [*args, "--allow-faults"]  # the test kit's servers may run fault points
    grpc_args: list[str] = []
    grpc_port: int | None = None
    if "--grpc-port" in args:
        grpc_port = int(args[list(args).index("--grpc-port") + 1]) or None
    elif _grpc_installed():
        grpc_port = free_port()
        while grpc_port == port:  # the kernel may hand out a just-closed port again
            grpc_port = free_port()
        grpc_args = ["--grpc-port", str(grpc_port)]
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [
                *wrapper,
                sys.executable,
                "-m",
                "smss.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                *grpc_args,
                *args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    server = ServerProcess(
        process,
        f"http://127.0.0.1:{port}",
        data_dir,
        log_path,
        f"127.0.0.1:{grpc_port}" if grpc_port else None,
    )
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"smss serve exited with {process.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200:
                return server
        time.sleep(0.05)
    server.stop()
    raise TimeoutError(f"smss serve not ready within {ready_timeout_s} s:\n{server.log()[-4000:]}")


def _grpc_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("grpc", "tritonclient"))


@contextlib.contextmanager
def running_server(data_dir: Path, args: Sequence[str] = (), **kwargs: object) -> Iterator[ServerProcess]:
    server = start_server(data_dir, args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
