"""What every route module needs, built once by the app factory."""

from __future__ import annotations

from dataclasses import dataclass

from smss.api.auth import TokenAuth
from smss.api.metrics import PrometheusMetrics
from smss.config import Settings
from smss.platform import Platform


@dataclass
class AppContext:
    platform: Platform
    settings: Settings
    metrics: PrometheusMetrics
    auth: TokenAuth
    ready: bool = False

    def known_functions(self) -> set[str]:
        return {rt.name for rt in self.platform.controller.functions()}
