"""Render devices for a person (``smss devices``, ``smss status``): what each device can
hold, what is allocated on it, what is free and what is placed there."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

from smss.inventory import Allocation, Capacity, DeviceKind, DeviceReport


def memory_text(mb: float) -> str:
    """MiB as a person reads it: ``512 MiB``, ``2 GiB``, ``22.3 GiB``."""
    if abs(mb) < 1024:
        return f"{mb:g} MiB"
    return f"{mb / 1024:.1f}".removesuffix(".0") + " GiB"


def amount_text(kind: DeviceKind, amount: Capacity) -> str:
    """A device's amount in its own resources: ``2 cores, 22.3 GiB`` / ``1 GPU, 80 GiB``."""
    if kind == "cuda":
        return f"{amount.gpu:g} GPU{'' if amount.gpu == 1 else 's'}, {memory_text(amount.gpu_memory_mb)}"
    return f"{amount.cpu:g} core{'' if amount.cpu == 1 else 's'}, {memory_text(amount.memory_mb)}"


def placed_text(placed: Iterable[Allocation]) -> str:
    """``mlp-ab12 (instance), weights:mlp``: an id that does not say its kind is followed by it."""
    return ", ".join(a.id if a.id.startswith(f"{a.kind}:") else f"{a.id} ({a.kind})" for a in placed) or "-"


def devices_table(devices: Iterable[DeviceReport], title: str | None = None) -> Table:
    table = Table("node", "device", "name", "capacity", "allocated", "free", "placed", title=title)
    for d in devices:
        table.add_row(
            d.node,
            f"{d.kind}:{d.index}",
            d.name,
            amount_text(d.kind, d.capacity),
            "-" if d.allocated.empty else amount_text(d.kind, d.allocated),
            amount_text(d.kind, d.capacity - d.allocated),
            placed_text(d.placed),
        )
    return table
