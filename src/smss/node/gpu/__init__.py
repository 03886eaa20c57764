"""Two-layer GPU sharing on a node: many models per GPU, one copy of each model per GPU.

*Inter-model*: placement (:mod:`smss.control.placement`) packs instances of different
functions onto a GPU by their declared share (``gpu_memory_mb``, ``gpu``), counting
each model's weights once per GPU; each instance runs in a process of its own, capped
to its share (:mod:`~smss.node.gpu.shares`), so one that exceeds it fails alone.

*Intra-model*: a GPU's **owner** process holds one copy of each model's weights there
(:mod:`~smss.node.gpu.owner`); every instance on that GPU opens that copy by CUDA IPC
instead of loading its own (:mod:`~smss.node.gpu.standby`).

Why processes that are started, not forked: a process that has initialised CUDA
cannot fork a child that uses CUDA, and a new process pays an interpreter, ``import
torch``, a CUDA context and cuDNN / cuBLAS initialisation (seconds) before its first
kernel. So instances start from **standbys**, processes that paid all of that ahead of
demand, and a start binds one to the model (cap, open the weights, build, warm); a
**spare** is a standby bound and rehearsed ahead, for the model's next start. Zygotes
and templates (CPU instances) never touch CUDA.

Tiers of a GPU function (``phases`` of :class:`~smss.node.gpu.node.GpuStart` say
which a start came from): *standby* (its spare), *resident* (its weights on the GPU),
host (its weights in the node's shared-memory store: copied to the GPU), cold (its
file), no runtime (no owner or standby yet). Weights stay on a GPU after scale to zero
and step down least recently used, within a budget (:mod:`~smss.node.gpu.store`).

Modules: :mod:`~smss.node.gpu.node` (the agent's side, :class:`GpuNode`),
:mod:`~smss.node.gpu.procs` (process clients), :mod:`~smss.node.gpu.proto` (messages),
:mod:`~smss.node.gpu.store`, :mod:`~smss.node.gpu.shares`, :mod:`~smss.node.gpu.layout`,
:mod:`~smss.node.gpu.device` (the device interface and its host implementation, the
CPU path that runs all of this without a GPU) and :mod:`~smss.node.gpu.cuda` (the only
module that calls ``torch.cuda``).
"""
