"""The fault-point primitive: its grammar, its actions, and that it is off by default."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from smss import faults
from smss.config import Settings
from smss.errors import InvalidSpec


@pytest.fixture(autouse=True)
def _off() -> Iterator[None]:
    yield
    faults.install(None)


def test_no_point_does_anything_when_nothing_is_installed() -> None:
    for point in faults.POINTS:
        faults.hit(point)
        assert faults.point(point) is None


def test_eio_enospc_and_the_nth_pass() -> None:
    faults.install("log.before_commit:eio, stage.after_effect:enospc@2")
    with pytest.raises(OSError, match="Input/output"):
        faults.hit("log.before_commit")
    faults.hit("stage.after_effect")  # the first pass: nothing
    with pytest.raises(OSError, match="No space"):
        faults.hit("stage.after_effect")
    faults.hit("stage.after_effect")  # only the second
    faults.hit("stage.before_call")  # not named: nothing


def test_delay_blocks_the_caller() -> None:
    faults.install("request.before_dispatch:delay:50")
    t0 = time.monotonic()
    faults.hit("request.before_dispatch")
    assert time.monotonic() - t0 >= 0.05


def test_install_replaces_and_clears() -> None:
    faults.install("log.after_commit:eio")
    faults.install("")
    faults.hit("log.after_commit")
    assert faults.active() == {}


@pytest.mark.parametrize(
    "bad",
    [
        "log.nowhere:eio",
        "stage.after_effect:explode",
        "stage.after_effect:kill@x",
        "stage.after_effect:kill@0",
        "stage.after_effect:delay",
        "stage.after_effect:delay:-1",
        "stage.after_effect:kill:9",
        "stage.after_effect",
    ],
)
def test_a_bad_spec_is_refused_and_names_the_entry(bad: str) -> None:
    with pytest.raises(InvalidSpec, match="bad fault"):
        faults.parse(bad)
    faults.install("log.after_commit:eio")
    with pytest.raises(InvalidSpec):
        faults.install(bad)


def test_settings_refuse_faults_without_the_test_flag() -> None:
    with pytest.raises(InvalidSpec, match="SMSS_FAULT"):
        Settings(faults="stage.after_effect:kill").check()
    Settings(faults="stage.after_effect:kill", allow_faults=True).check()
    Settings().check()
