"""What every route module needs, built once by the app factory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from smss.api import wire
from smss.api.auth import TokenAuth
from smss.api.metrics import PrometheusMetrics
from smss.app.platform import Platform
from smss.config import Settings
from smss.control.cost import PriceTable


@dataclass
class AppContext:
    platform: Platform
    settings: Settings
    metrics: PrometheusMetrics
    auth: TokenAuth
    prices: PriceTable = field(default_factory=PriceTable)
    previous_period_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    #: Run after the platform stopped, in order (persist usage, close stores).
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)
    #: The nodes and their distances, on a cluster (None: this machine alone).
    cluster: Callable[[], wire.ClusterJson] | None = None

    def metered_period_s(self) -> float:
        """Seconds of metering behind the cost report: earlier runs of the platform and this one."""
        return self.previous_period_s + time.monotonic() - self.started
