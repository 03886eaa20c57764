"""Which instances a restarted platform adopts: a pure decision.

A platform killed with instances running may find them still running when it
starts again (see ``ClusterBackend.recover``). Each is adopted into routing when
its function is still deployed *from the same artifacts* (the same generation),
up to the function's ``max_instances``; every other one (a function deleted or
redeployed meanwhile, or one instance too many) is stopped, so a restart neither
kills what can serve nor runs duplicates beside it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from smss.ports import FunctionRecord, RunningInstance


@dataclass(frozen=True)
class Adoption:
    adopt: tuple[RunningInstance, ...]
    #: With the reason each is stopped, for the log.
    stop: tuple[tuple[RunningInstance, str], ...]


def choose(found: Sequence[RunningInstance], deployed: Mapping[str, FunctionRecord]) -> Adoption:
    """Adopt, per function, the oldest instances of its current generation up to its
    ``max_instances``; stop the rest."""
    adopt: list[RunningInstance] = []
    stop: list[tuple[RunningInstance, str]] = []
    kept: dict[str, int] = {}
    for r in sorted(found, key=lambda r: (r.info.started_at, r.info.id)):
        record = deployed.get(r.info.function)
        if record is None:
            stop.append((r, "its function is not deployed"))
        elif record.artifact_dir != r.artifact_dir:
            stop.append((r, "its function was redeployed"))
        elif kept.get(r.info.function, 0) >= record.spec.scaling.max_instances:
            stop.append((r, f"its function runs at most {record.spec.scaling.max_instances} instances"))
        else:
            kept[r.info.function] = kept.get(r.info.function, 0) + 1
            adopt.append(r)
    return Adoption(tuple(adopt), tuple(stop))
