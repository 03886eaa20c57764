"""A standby: a process with its CUDA context made, waiting to become an instance.

``python -m smss.node.gpu.standby CONFIG_JSON``, started by the node agent ahead of
demand (:mod:`smss.node.gpu.procs`). Why a standby and not a fork: a process that
has initialised CUDA cannot fork a child that uses CUDA, and a new process pays an
interpreter, ``import torch``, a CUDA context and cuDNN / cuBLAS initialisation
(together seconds) before its first kernel. A standby pays all of that before it is
needed, then waits on stdin. Its life:

1. **up**: import torch, create the context on its GPU (its only visible device),
   run a few small kernels so the math libraries are initialised, measure its own
   footprint, and report :class:`~smss.node.gpu.proto.StandbyReady`;
2. **bind** (:class:`~smss.node.gpu.proto.Bind`): cap its allocator to the function's
   share (:func:`smss.node.gpu.shares.allocator_cap`), open the model's weights
   from the GPU's owner by CUDA IPC (no copy), import the user's class, ``load()``
   it on those tensors, warm it with one call on zeros (and, for a spare, one
   request through the whole serving path);
3. **serve** (:class:`~smss.node.gpu.proto.Serve`): listen on the instance's socket
   and serve as an ordinary instance (:func:`smss.node.worker.run_loop`): SIGTERM
   drains it; it dies with the agent.

A start from a GPU-resident copy is steps 2 and 3; from a spare (a standby bound
ahead), step 3 alone. An allocation beyond the cap raises in that instance alone;
the request fails with :class:`~smss.node.gpu.device.GpuShareExceeded` naming the
share, and the instance keeps serving.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from smss import faults, heap
from smss.config import env_faults
from smss.errors import CorruptWeights
from smss.node.gpu import proto
from smss.node.gpu.device import DeviceMemory, GpuShareExceeded, memory_for
from smss.node.gpu.owner import import_runtime
from smss.node.gpu.shares import AllocatorCap, GpuShare, allocator_cap
from smss.node.weights import DeviceTensors
from smss.node.worker import (
    listen,
    load_model,
    public_reason,
    rehearse,
    run_loop,
    set_threads,
    start_child_process,
    warm_up,
)

log = logging.getLogger(__name__)


class CappedModel:
    """The user's model, with an allocation refused by the cap turned into a clear
    error of this instance (and the allocator's cache emptied, so it serves on)."""

    def __init__(self, model: Any, memory: DeviceMemory, instance: str, cap: AllocatorCap | None) -> None:
        self.model = model
        #: The instance it serves as (a spare learns it when it is handed a start).
        self.instance = instance
        self._memory = memory
        self._cap = cap

    def predict(self, inputs: dict[str, Any]) -> Any:
        try:
            return self.model.predict(inputs)
        except Exception as e:
            if not self._memory.out_of_memory(e):
                raise
            raise GpuShareExceeded(self.describe(e)) from None

    def describe(self, error: BaseException) -> str:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self._cap is None:
            return f"instance {self.instance} ran out of GPU memory: {first[:300]}"
        return (
            f"instance {self.instance} exceeded its GPU memory share: torch may allocate "
            f"{self._cap.cap_mb} MiB here (its share less {self._cap.context_mb} MiB of CUDA "
            f"context; set_per_process_memory_fraction({self._cap.fraction:.4f})); declare "
            f"more gpu_memory for this model. ({first[:300]})"
        )


def bind(
    request: proto.Bind, memory: DeviceMemory, total_mb: int, context_mb: int | None
) -> tuple[CappedModel, proto.Bound]:
    """Step 2 of the module docstring: the model, capped, loaded on the shared weights and warm."""
    config = request.config
    spec = config.spec
    cap = None
    if request.share_mb > 0:
        cap = allocator_cap(GpuShare(request.share_mb), total_mb, context_mb)
        memory.cap(cap.fraction)
    t0 = time.perf_counter()
    on_device = None
    if request.weights is not None:
        tensors = memory.open(request.weights.handle, request.weights.layout)
        on_device = DeviceTensors(tensors, memory.device())
    t1 = time.perf_counter()
    set_threads(config)
    try:
        user_model = load_model(spec, Path(config.artifact_dir), on_device=on_device)
    except Exception as e:
        if memory.out_of_memory(e):
            raise GpuShareExceeded(CappedModel(None, memory, config.instance_id, cap).describe(e)) from None
        raise
    model = CappedModel(user_model, memory, config.instance_id, cap)
    t2 = time.perf_counter()
    warm_up(spec, model)
    if request.rehearse:
        rehearse(config, model)
    heap.settle()
    t3 = time.perf_counter()
    bound = proto.Bound(
        (t1 - t0) * 1000,
        (t2 - t1) * 1000,
        (t3 - t2) * 1000,
        cap.cap_mb if cap else 0,
        cap.fraction if cap else 0.0,
    )
    return model, bound


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    config = msgspec.json.decode(args[0], type=proto.StandbyConfig)
    faults.install(env_faults())
    reply_fd = start_child_process(f"gpu{config.gpu}-standby")
    try:
        import_ms = import_runtime(config.backend)
        t0 = time.perf_counter()
        memory = memory_for(config.backend, config.memory_mb, "", config.gpu)
        total_mb = memory.init()
        t1 = time.perf_counter()
        memory.warm()
        context_mb = memory.context_mb()
        t2 = time.perf_counter()
    except Exception as e:
        log.exception("the standby could not start")
        proto.send(reply_fd, proto.Failed(public_reason(e)[:2000]))
        sys.exit(3)
    proto.send(
        reply_fd,
        proto.StandbyReady(os.getpid(), total_mb, context_mb, import_ms, (t1 - t0) * 1000, (t2 - t1) * 1000),
    )
    request = proto.recv(0)
    if not isinstance(request, proto.Bind):
        sys.exit(0)  # let go, or a request it does not take
    try:
        model, bound = bind(request, memory, total_mb, context_mb)
    except Exception as e:
        log.exception("binding %s failed", request.config.spec.name)
        proto.send(reply_fd, proto.Failed(public_reason(e)[:2000], isinstance(e, CorruptWeights)))
        sys.exit(3)
    proto.send(reply_fd, bound)
    serve = proto.recv(0)
    if not isinstance(serve, proto.Serve):
        sys.exit(0)  # a spare let go
    model.instance = serve.config.instance_id
    listener = listen(serve.config.socket_path)
    proto.send(reply_fd, proto.Serving(os.getpid()))
    os.close(reply_fd)
    log.info("serving as %s", serve.config.instance_id)
    run_loop(serve.config, model, listener, lambda: None)


if __name__ == "__main__":
    main()
