"""Run ids: UUIDv7 (RFC 9562) written as 32 hex digits, ordered by creation time.

The log indexes runs by id, and each run's events and completions by (run id, ...).
Ids that grow with time put a new run at the right-hand edge of those indexes, so
consecutive commits rewrite the same few pages; random ids (uuid4) would touch one
random leaf of each index per run, pages that a large log no longer has in cache.
Uniqueness comes from the 74 random bits; the time only orders.
"""

from __future__ import annotations

import os

_MS_BITS = 48


def new_run_id(now_s: float) -> str:
    """A UUIDv7 for a run created at ``now_s`` (seconds since the epoch)."""
    ms = int(now_s * 1000) & ((1 << _MS_BITS) - 1)
    rand = int.from_bytes(os.urandom(10), "big")  # 12 bits for rand_a, 62 for rand_b
    value = (
        (ms << 80)
        | (0x7 << 76)  # version 7
        | (((rand >> 62) & 0xFFF) << 64)
        | (0b10 << 62)  # the RFC 9562 variant
        | (rand & ((1 << 62) - 1))
    )
    return f"{value:032x}"
