"""Run ids are RFC 9562 UUIDv7: unique, and ordered by the time they were made."""

from __future__ import annotations

import re
import uuid

from smss.workflow.ids import new_run_id


def test_a_run_id_is_a_version_7_uuid_in_32_hex_digits() -> None:
    run_id = new_run_id(1_796_169_600.123)
    assert re.fullmatch("[0-9a-f]{32}", run_id)
    parsed = uuid.UUID(hex=run_id)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert int(run_id[:12], 16) == 1_796_169_600_123  # the creation time, in ms


def test_ids_sort_by_creation_time_and_never_repeat() -> None:
    ids = [new_run_id(1_000_000.0004 + i / 1000) for i in range(2000)]  # one a millisecond
    assert ids == sorted(ids)
    same_ms = {new_run_id(1_000_000.0) for _ in range(10_000)}
    assert len(same_ms) == 10_000
