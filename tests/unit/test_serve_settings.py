"""Settings of ``smss serve`` for restarts, drains and failed starts: refused when
they make no sense, before anything is built."""

from __future__ import annotations

import math

import pytest

from smss.config import ServingSettings, Settings
from smss.errors import InvalidSpec


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(adopt_window_s=-1.0), "--adopt-window must be 0 or more seconds"),
        (Settings(adopt_window_s=math.inf), "--adopt-window must be 0 or more seconds"),
        (Settings(serving=ServingSettings(drain_grace_s=-0.5)), "--drain-timeout must be 0 or more"),
        (Settings(serving=ServingSettings(drain_grace_s=math.nan)), "--drain-timeout must be 0 or more"),
        (Settings(serving=ServingSettings(max_start_failures=0)), "--max-start-failures must be at least 1"),
        (Settings(serving=ServingSettings(queue_limit=0)), "--queue-limit must be at least 1"),
        (Settings(serving=ServingSettings(max_connections=0)), "--max-connections must be at least 1"),
    ],
)
def test_nonsense_is_refused(settings: Settings, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        settings.check()


def test_the_defaults_adopt_for_30_s_drain_for_10_s_and_give_up_after_6_failures() -> None:
    settings = Settings().check()
    assert settings.adopt_window_s == 30.0
    assert settings.serving.drain_grace_s == 10.0
    assert settings.serving.max_start_failures == 6
    assert Settings(adopt_window_s=0.0).check().adopt_window_s == 0.0  # 0: die with the server
