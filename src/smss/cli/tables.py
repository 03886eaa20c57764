"""Render devices for a person (``smss devices``, ``smss status``): what each device can
hold, what is allocated on it, what is free and what is placed there."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

from smss.inventory import Allocation, DeviceReport, amount_text


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
