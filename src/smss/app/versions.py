"""Several versions of one model name: the internal names siblings live under, and the
per-name traffic table (a default version, an optional canary split).

The first version deployed under a name keeps the plain name; another version lives
beside it as a sibling function named ``name~version`` (``~`` is refused in names users
give, so no user can type one). Everything keyed by name (registry, controller, meter,
weight store) sees a sibling as one more function.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from smss.errors import InvalidSpec
from smss.spec import check_name, internal_name, public_name

__all__ = ["Traffic", "VersionTable", "internal_name", "public_name"]


@dataclass
class Traffic:
    """Where unversioned requests for one name go: ``split`` maps versions to the share of
    requests they take (summing to at most 1); the rest go to ``default`` (None: the
    version deployed under the plain name)."""

    default: str | None = None
    split: dict[str, float] = field(default_factory=dict)

    def validate(self) -> Traffic:
        if self.default is not None:
            check_name("version", self.default)
        for version, share in self.split.items():
            check_name("version", version)
            if not 0.0 <= share <= 1.0:
                raise InvalidSpec(f"the share of version {version!r} must lie in [0, 1], not {share}")
        if sum(self.split.values()) > 1.0 + 1e-9:
            raise InvalidSpec(f"the split's shares sum to more than 1: {self.split}")
        return self


class VersionTable:
    """Each name's :class:`Traffic`; picks a version per request with a seeded RNG."""

    def __init__(self, seed: int = 0) -> None:
        self._traffic: dict[str, Traffic] = {}
        self._rng = random.Random(seed)

    def get(self, name: str) -> Traffic:
        return self._traffic.get(name, Traffic())

    def set(self, name: str, traffic: Traffic) -> None:
        self._traffic[name] = traffic.validate()

    def forget(self, name: str) -> None:
        self._traffic.pop(name, None)

    def pick(self, name: str) -> str | None:
        """The version one unversioned request goes to (None: the plain name's)."""
        t = self._traffic.get(name)
        if t is None:
            return None
        if t.split:
            draw = self._rng.random()
            for version, share in sorted(t.split.items()):
                if draw < share:
                    return version
                draw -= share
        return t.default
