"""Device discovery for the node agent (placeholder: CPU only, no reserve)."""

from __future__ import annotations

import os

from smss.inventory import Capacity, Device, NodeInventory


def discover(
    node: str = "local", *, cpus: float | None = None, memory_mb: int | None = None
) -> NodeInventory:
    cores = float(len(os.sched_getaffinity(0)))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    total = Capacity(cpu=cpus or cores, memory_mb=memory_mb or mem)
    return NodeInventory(node, (Device("cpu", 0, "cpu", total, total),))
