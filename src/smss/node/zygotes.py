"""The agent's side of zygotes and templates: start, restart, prepare, spawn, watch.

One zygote per runtime kind, started on first use and restarted when it dies.
One template per resident model (keyed like its weight-store segment). Each
control connection carries one request at a time (a lock per connection).
Instances are not the agent's children (they are forked by templates), so
their exits are watched through pidfds; so are zygotes, which may be adopted from
an agent that was killed (``linger_s``, :mod:`smss.node.roster`): each one and each
template is written to the run directory's roster while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import msgspec

from smss.errors import CorruptWeights, StartFailed
from smss.node import zygote_proto as proto
from smss.node.roster import Roster, TemplateEntry, ZygoteEntry, alive, start_time
from smss.node.worker import WorkerConfig, process_alive
from smss.node.zygote import ZygoteConfig

log = logging.getLogger(__name__)


@dataclass
class _Control:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def call(self, request: proto.Request) -> proto.Reply:
        async with self.lock:
            try:
                return await proto.call(self.reader, self.writer, request)
            except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError) as e:
                raise StartFailed(f"lost the control connection: {e}") from None

    def close(self) -> None:
        self.writer.close()


@dataclass
class Template:
    key: str
    pid: int
    control: _Control
    prepared: proto.Prepared
    control_path: Path


@dataclass
class _Zygote:
    entry: ZygoteEntry
    control: _Control
    exited: asyncio.Event
    #: Set when this agent started it (its child, reaped by asyncio); None when adopted.
    process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        return self.entry.pid

    def alive(self) -> bool:
        return not self.exited.is_set() and alive(self.entry.pid, self.entry.started)


class ZygotePool:
    def __init__(
        self,
        run_dir: Path,
        log_dir: Path,
        *,
        prepare_timeout_s: float = 120.0,
        spares: bool = True,
        linger_s: float | None = None,
    ) -> None:
        self._run_dir = run_dir
        self._roster = Roster(run_dir)
        self._spares = spares
        self._log_dir = log_dir
        self._prepare_timeout_s = prepare_timeout_s
        self._linger_s = linger_s
        self._zygotes: dict[str, _Zygote] = {}
        self._templates: dict[str, Template] = {}
        self._starting: dict[str, asyncio.Lock] = {}
        #: One template build at a time per key: concurrent first starts of a model
        #: wait for the one template instead of each building (and leaking) another.
        self._preparing: dict[str, asyncio.Lock] = {}
        #: Adopted templates of a key already held (from before one template per key).
        self._extra: list[Template] = []
        #: Spares each function's template keeps (by function; 1 unless told otherwise).
        self._spare_counts: dict[str, int] = {}
        self.zygote_starts = 0

    def zygote_pid(self, runtime: str) -> int | None:
        z = self._zygotes.get(runtime)
        return z.pid if z is not None and z.alive() else None

    async def adopt(self) -> None:
        """Take over the zygotes and templates in the roster that still run (a killed
        agent's): reconnect to their control sockets. Entries of dead ones are dropped."""
        for entry in self._roster.entries():
            if isinstance(entry, ZygoteEntry | TemplateEntry):
                await self._adopt(entry)

    async def _adopt(self, entry: ZygoteEntry | TemplateEntry) -> None:
        if not alive(entry.pid, entry.started):
            self._roster.drop(entry)
            return
        try:
            reader, writer = await asyncio.open_unix_connection(entry.control_path)
        except OSError as e:
            log.warning("could not adopt pid %d (%s): stopping it", entry.pid, e)
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry.pid, signal.SIGKILL)
            self._roster.drop(entry)
            return
        control = _Control(reader, writer)
        if isinstance(entry, ZygoteEntry):
            self._zygotes[entry.runtime] = _Zygote(entry, control, _watch(entry.pid))
            log.info("adopted the %s zygote (pid %d)", entry.runtime, entry.pid)
        else:
            path = Path(entry.control_path)
            template = Template(entry.key, entry.pid, control, entry.prepared, path)
            if entry.key in self._templates:  # its instances live while it does: kept, untracked
                self._extra.append(template)
            else:
                self._templates[entry.key] = template
            log.info("adopted the template of %s (pid %d)", entry.key, entry.pid)

    def template(self, key: str) -> Template | None:
        return self._templates.get(key)

    def templates(self) -> list[Template]:
        return list(self._templates.values())

    async def _zygote(self, runtime: str) -> _Zygote:
        lock = self._starting.setdefault(runtime, asyncio.Lock())
        async with lock:
            z = self._zygotes.get(runtime)
            if z is not None and z.alive():
                return z
            if z is not None:
                log.warning("zygote for %s (pid %d) died; restarting", runtime, z.pid)
                z.control.close()
                self._roster.drop(z.entry)
                self._forget_templates_of_dead_zygote()
            z = await self._start_zygote(runtime)
            self._zygotes[runtime] = z
            return z

    async def _start_zygote(self, runtime: str) -> _Zygote:
        path = self._run_dir / f"zygote-{runtime}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        config = ZygoteConfig(
            runtime=runtime,
            control_path=str(path),
            prepare_timeout_s=self._prepare_timeout_s,
            linger_s=self._linger_s,
        )
        with (self._log_dir / f"zygote-{runtime}.log").open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smss.node.zygote",
                msgspec.json.encode(config).decode(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, **_SINGLE_THREADED},
                # One that may outlive this agent is kept out of its terminal's signals.
                start_new_session=self._linger_s is not None,
            )
        if process.stdout is None:
            raise StartFailed("zygote has no stdout")
        try:
            line = await asyncio.wait_for(process.stdout.readline(), self._prepare_timeout_s)
        except TimeoutError:
            line = b""
        if not line:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise StartFailed(f"the {runtime} zygote failed to start (see zygote-{runtime}.log)")
        reader, writer = await asyncio.open_unix_connection(str(path))
        self.zygote_starts += 1
        log.info("zygote for %s ready (pid %d)", runtime, process.pid)
        entry = ZygoteEntry(runtime, process.pid, start_time(process.pid) or 0, str(path))
        self._roster.put(entry)
        return _Zygote(entry, _Control(reader, writer), _watch(process.pid), process)

    def _forget_templates_of_dead_zygote(self) -> None:
        # Templates die with their zygote (PDEATHSIG); drop the ones whose process is gone.
        for key, t in list(self._templates.items()):
            if not process_alive(t.pid):
                t.control.close()
                del self._templates[key]
                self._roster.drop(_template_entry(t))

    async def prepare(self, key: str, config: WorkerConfig, segment: Path | None) -> tuple[Template, bool]:
        """The template for ``key``, forked from the runtime's zygote if missing.
        Returns (template, already_prepared). Concurrent cold starts of one model wait
        for one template, rather than each forking its own (all but one untracked)."""
        existing = self._templates.get(key)
        if existing is not None and process_alive(existing.pid):
            return existing, True
        async with self._preparing.setdefault(key, asyncio.Lock()):
            existing = self._templates.get(key)
            if existing is not None and process_alive(existing.pid):
                return existing, True
            if existing is not None:
                self.discard(key)
            return await self._prepare_new(key, config, segment), False

    async def _prepare_new(self, key: str, config: WorkerConfig, segment: Path | None) -> Template:
        # Unique across agents: an adopted template keeps the path it listens on.
        control_path = self._run_dir / f"tpl-{uuid4().hex[:12]}.sock"
        spares = self._spare_counts.get(key.partition("@")[0], 1)
        request = proto.Prepare(
            config, str(segment) if segment else None, str(control_path), self._spares, spares
        )
        zygote = await self._zygote(config.spec.runtime)
        try:
            reply = await zygote.control.call(request)
        except StartFailed:
            # The zygote died and asyncio has not reported it yet: replace it, once.
            await self._kill_zygote(config.spec.runtime, zygote)
            zygote = await self._zygote(config.spec.runtime)
            reply = await zygote.control.call(request)
        if isinstance(reply, proto.Failed):
            raise (CorruptWeights if reply.corrupt_weights else StartFailed)(reply.message)
        if not isinstance(reply, proto.Prepared):
            raise StartFailed("unexpected reply from the zygote")
        reader, writer = await asyncio.open_unix_connection(str(control_path))
        template = Template(key, reply.pid, _Control(reader, writer), reply, control_path)
        self._templates[key] = template
        self._roster.put(_template_entry(template))
        return template

    def runtimes(self) -> list[str]:
        """The runtimes whose zygote runs."""
        return [runtime for runtime, z in self._zygotes.items() if z.alive()]

    async def set_spares(self, function: str, spares: int) -> None:
        """The templates of ``function`` keep ``spares`` spares from now on (and a
        template built for it later starts with as many)."""
        self._spare_counts[function] = spares
        if not self._spares:
            return
        for key, template in list(self._templates.items()):
            if key.partition("@")[0] == function:
                reply = await template.control.call(proto.SetSpares(spares))
                if not isinstance(reply, proto.Done):
                    raise StartFailed("unexpected reply from the template")

    async def stop_runtime(self, runtime: str) -> bool:
        """Stop the runtime's zygote (and so any template forked from it); True if one ran."""
        zygote = self._zygotes.get(runtime)
        if zygote is None:
            return False
        async with self._starting.setdefault(runtime, asyncio.Lock()):
            if self._zygotes.get(runtime) is not zygote:
                return False
            await self._kill_zygote(runtime, zygote)
        log.info("stopped the %s zygote: no function uses its runtime", runtime)
        return True

    async def spawn(self, template: Template, config: WorkerConfig) -> proto.Spawned:
        reply = await template.control.call(proto.Spawn(config))
        if isinstance(reply, proto.Failed):
            raise StartFailed(reply.message)
        if not isinstance(reply, proto.Spawned):
            raise StartFailed("unexpected reply from the template")
        return reply

    async def _kill_zygote(self, runtime: str, zygote: _Zygote) -> None:
        await _kill(zygote)
        self._roster.drop(zygote.entry)
        if self._zygotes.get(runtime) is zygote:
            del self._zygotes[runtime]
        self._forget_templates_of_dead_zygote()

    def discard(self, key: str) -> None:
        """Stop a template (its weights are being evicted, or its function steps down)."""
        template = self._templates.pop(key, None)
        lock = self._preparing.get(key)
        if lock is not None and not lock.locked():
            del self._preparing[key]
        if template is not None:
            template.control.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(template.pid, signal.SIGKILL)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(template.control_path)
            self._roster.drop(_template_entry(template))

    async def close(self) -> None:
        for key in list(self._templates):
            self.discard(key)
        for template in self._extra:
            self._templates[template.key] = template
            self.discard(template.key)
        self._extra.clear()
        for z in self._zygotes.values():
            await _kill(z)
            self._roster.drop(z.entry)
        self._zygotes.clear()


def _template_entry(t: Template) -> TemplateEntry:
    return TemplateEntry(t.key, t.pid, start_time(t.pid) or 0, str(t.control_path), t.prepared)


def _watch(pid: int) -> asyncio.Event:
    """An event set when ``pid`` exits (the watch ends with it)."""
    exited = asyncio.Event()
    watch_exit(pid, exited.set)
    return exited


async def _kill(zygote: _Zygote) -> None:
    zygote.control.close()
    if zygote.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(zygote.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):  # a pid that is no longer its own never fires
        async with asyncio.timeout(10.0):
            if zygote.process is not None:
                await zygote.process.wait()
            else:
                await zygote.exited.wait()


_SINGLE_THREADED = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


def watch_exit(pid: int, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` once when process ``pid`` exits (pidfd); returns a cancel function."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        loop.call_soon(callback)
        return lambda: None
    done = False

    def fire() -> None:
        nonlocal done
        if not done:
            done = True
            loop.remove_reader(fd)
            os.close(fd)
            callback()

    def cancel() -> None:
        nonlocal done
        if not done:
            done = True
            loop.remove_reader(fd)
            os.close(fd)

    loop.add_reader(fd, fire)
    return cancel
