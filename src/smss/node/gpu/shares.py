"""How much of a GPU an instance gets, and the caps that hold it to that. Pure, no CUDA.

An instance on a GPU declares ``gpu_memory_mb`` (what it uses besides the model's
shared weights) and / or ``gpu`` (a fraction of the GPU). Its :class:`GpuShare` is:

* **memory**: ``gpu_memory_mb`` when declared, else ``gpu`` x the device's memory;
* **compute**: ``gpu`` when declared, else uncapped.

Two caps enforce the share inside the instance's process, both set before it loads
its model (:mod:`smss.node.gpu.standby`):

* torch's caching allocator is capped with
  ``torch.cuda.set_per_process_memory_fraction(fraction)``, where the fraction is
  the share less the process's own CUDA context (which the driver allocates outside
  the allocator, so the cap does not see it) over the device's total memory
  (:func:`allocator_cap`). The weights opened by CUDA IPC are the owner's memory,
  outside this allocator too, so they do not count against the share; an allocation
  beyond the cap raises ``torch.OutOfMemoryError`` in that instance alone;
* where a CUDA MPS control daemon runs (:func:`mps_running`), the instance's
  process is started with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` from its compute
  share (:func:`mps_thread_percentage`): MPS reads it when the process creates its
  context, so a standby process is made for one percentage (:func:`process_env`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from smss.errors import StartFailed
from smss.spec import Resources

#: What torch's allocator gets at least: less cannot hold a model's activations.
MIN_ALLOCATOR_MB = 32
#: A CUDA context's size where the process could not measure its own (torch with
#: lazy module loading on a recent GPU: roughly 300-500 MiB).
DEFAULT_CONTEXT_MB = 512
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"


@dataclass(frozen=True, slots=True)
class GpuShare:
    """An instance's share of one GPU: ``memory_mb`` it may use besides the shared
    weights, and ``compute``, the fraction of the GPU's threads (None: uncapped)."""

    memory_mb: int
    compute: float | None = None


def share_of(resources: Resources, device_memory_mb: int) -> GpuShare:
    """The share ``resources`` declares on a GPU with ``device_memory_mb`` of memory."""
    if resources.gpu_memory_mb > 0:
        memory_mb = resources.gpu_memory_mb
    else:
        memory_mb = int(resources.gpu * device_memory_mb)
    return GpuShare(memory_mb, resources.gpu if resources.gpu > 0 else None)


@dataclass(frozen=True, slots=True)
class AllocatorCap:
    """What ``set_per_process_memory_fraction`` gets: ``fraction`` of the device's
    memory, i.e. ``cap_mb`` for torch's allocator once ``context_mb`` is set aside."""

    fraction: float
    cap_mb: int
    context_mb: int


def allocator_cap(share: GpuShare, total_mb: int, context_mb: int | None) -> AllocatorCap:
    """The allocator cap that keeps a process within ``share`` on a device of
    ``total_mb``, given its own CUDA context of ``context_mb`` (None: not measured,
    :data:`DEFAULT_CONTEXT_MB` assumed). A share too small for the context and
    :data:`MIN_ALLOCATOR_MB` is a :class:`StartFailed` saying what to declare."""
    if total_mb <= 0:
        raise StartFailed(f"the GPU reports {total_mb} MiB of memory")
    context = DEFAULT_CONTEXT_MB if context_mb is None else max(0, context_mb)
    cap_mb = share.memory_mb - context
    if cap_mb < MIN_ALLOCATOR_MB:
        raise StartFailed(
            f"a GPU share of {share.memory_mb} MiB leaves no room beside the process's CUDA "
            f"context ({context} MiB on this GPU): declare gpu_memory of at least "
            f"{context + MIN_ALLOCATOR_MB} MiB"
        )
    fraction = min(1.0, cap_mb / total_mb)
    return AllocatorCap(fraction, cap_mb, context)


def mps_thread_percentage(share: GpuShare) -> int | None:
    """``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` for ``share`` (1-100), None when uncapped."""
    if share.compute is None:
        return None
    return max(1, min(100, math.ceil(share.compute * 100 - 1e-9)))


def mps_running(
    environ: Mapping[str, str] | None = None, exists: Callable[[Path], bool] = Path.exists
) -> bool:
    """Whether a CUDA MPS control daemon serves this machine: its ``control`` pipe is
    in ``CUDA_MPS_PIPE_DIRECTORY`` (default ``/tmp/nvidia-mps``)."""
    env = os.environ if environ is None else environ
    pipe_dir = Path(env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_MPS_PIPE_DIRECTORY)
    return exists(pipe_dir / "control")


def process_env(gpu_index: int, thread_percentage: int | None) -> dict[str, str]:
    """The environment of a process that uses GPU ``gpu_index`` (the index NVML and
    ``nvidia-smi`` give it, in PCI bus order): it sees that GPU alone, as its device 0,
    whatever CUDA's own device order; with MPS, at ``thread_percentage``."""
    env = {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": str(gpu_index),
        # Kernels load when first used: a smaller context, a faster start.
        "CUDA_MODULE_LOADING": "LAZY",
    }
    if thread_percentage is not None:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(thread_percentage)
    return env
