"""A GPU's owner: the resident process holding one copy of each model's weights on it.

``python -m smss.node.gpu.owner CONFIG_JSON``, one per GPU in use, started by the
node agent (:mod:`smss.node.gpu.procs`). It creates its CUDA context once and keeps
it; each model's weights are one buffer on the GPU (:mod:`smss.node.gpu.layout`),
loaded from the model's segment in the node's host weight store (so a model that
stepped down from the GPU comes back without reading its file), and every instance
on the GPU opens that buffer by CUDA IPC (:meth:`Share`): N instances, one copy.

It runs no model code and starts no thread: a blocking loop over one request at a
time on stdin, replies on its original stdout. It dies with the agent
(``PR_SET_PDEATHSIG``); the agent stops the GPU's instances when it dies, since
their weights were its memory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import msgspec

from smss.errors import CorruptWeights
from smss.node.attach import Attached, verify
from smss.node.gpu import proto
from smss.node.gpu.device import DeviceMemory, memory_for
from smss.node.gpu.layout import Layout, plan
from smss.node.worker import public_reason, start_child_process
from smss.safetensors_header import parse_image

log = logging.getLogger(__name__)


class Owner:
    """The owner's state: the device and what each model's buffer looks like."""

    def __init__(self, memory: DeviceMemory) -> None:
        self._memory = memory
        self._layouts: dict[str, Layout] = {}

    def handle(self, request: proto.Request) -> proto.Reply:
        try:
            return self._handle(request)
        except CorruptWeights as e:
            return proto.Failed(e.message, corrupt_weights=True)
        except Exception as e:
            log.exception("request %s failed", type(request).__name__)
            return proto.Failed(public_reason(e))

    def _handle(self, request: proto.Request) -> proto.Reply:
        if isinstance(request, proto.Load):
            return self._load(request)
        if isinstance(request, proto.Share):
            layout = self._layouts.get(request.key)
            if layout is None:
                return proto.Failed(f"the weights of {request.key!r} are not on this GPU")
            return proto.Shared(proto.SharedWeights(self._memory.share(request.key), layout))
        if isinstance(request, proto.Evict):
            self._layouts.pop(request.key, None)
            self._memory.free(request.key)
            return proto.Done()
        return proto.Failed(f"an owner does not take {type(request).__name__}")

    def _load(self, request: proto.Load) -> proto.Reply:
        started = time.perf_counter()
        segment = Attached(Path(request.segment))
        try:
            # Checked where it is copied from: damage in the host copy fails this load
            # (the agent drops the segment), never serves wrong weights from the GPU.
            verify(segment.data, segment.checksum, segment.path.name)
            layout = plan(parse_image(segment.data))
            self._memory.upload(request.key, segment.data, layout)
        finally:
            segment.close()
        self._layouts[request.key] = layout
        load_ms = (time.perf_counter() - started) * 1000
        log.info("loaded %s (%d bytes) in %.1f ms", request.key, layout.nbytes, load_ms)
        return proto.Loaded(layout.nbytes, load_ms)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    config = msgspec.json.decode(args[0], type=proto.OwnerConfig)
    reply_fd = start_child_process(f"gpu{config.gpu}-owner")
    try:
        import_ms = import_runtime(config.backend)
        started = time.perf_counter()
        memory = memory_for(config.backend, config.memory_mb, config.prefix, config.gpu)
        total_mb = memory.init()
    except Exception as e:
        log.exception("the GPU owner could not start")
        proto.send(reply_fd, proto.Failed(public_reason(e)[:2000]))
        sys.exit(3)
    init_ms = (time.perf_counter() - started) * 1000
    owner = Owner(memory)
    proto.send(reply_fd, proto.OwnerReady(os.getpid(), total_mb, import_ms, init_ms))
    try:
        while (request := proto.recv(0)) is not None:
            proto.send(reply_fd, owner.handle(request))
    finally:
        memory.close()


def import_runtime(backend: str) -> float:
    """Import torch (what a process on a GPU pays first); returns how long it took, ms."""
    started = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    return (time.perf_counter() - started) * 1000


if __name__ == "__main__":
    main()
