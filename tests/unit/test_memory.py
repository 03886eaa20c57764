"""What a node keeps resident, read from a /proc laid out in a temporary directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

from smss.node.memory import Reading, ResidentReadings, children, pss_bytes, read_templates


def fake_proc(root: Path, pss_kb: dict[int, int], kids: dict[int, list[int]]) -> Path:
    for pid, kb in pss_kb.items():
        d = root / str(pid)
        (d / "task" / str(pid)).mkdir(parents=True)
        (d / "smaps_rollup").write_text(f"00400000-ffff [rollup]\nRss: {2 * kb} kB\nPss: {kb} kB\n")
        (d / "task" / str(pid) / "children").write_text(" ".join(map(str, kids.get(pid, []))))
    return root


def test_pss_and_children_are_read_from_proc(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {10: 100, 11: 7, 12: 3}, {10: [11, 12]})
    assert pss_bytes(10, proc) == 100 * 1024
    assert pss_bytes(99, proc) is None  # gone
    assert sorted(children(10, proc)) == [11, 12]
    assert children(99, proc) == []


def test_a_template_reading_leaves_its_instances_out_of_its_spares(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {10: 100, 11: 7, 12: 3}, {10: [11, 12]})
    assert read_templates([10], instances={12}, proc=proc) == {10: Reading(100 * 1024, ((11, 7 * 1024),))}


def test_readings_are_refreshed_off_the_loop_at_most_every_refresh_s(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {10: 100}, {})
    now = [0.0]
    readings = ResidentReadings(refresh_s=2.0, proc=proc, clock=lambda: now[0])

    async def main() -> None:
        assert readings.latest([10], ()) == {}  # the first ask starts a read, answers at once
        await asyncio.sleep(0.05)
        for _ in range(100):
            if readings.readings:
                break
            await asyncio.sleep(0.01)
        assert readings.latest([10], ()) == {10: Reading(100 * 1024)}
        (proc / "10" / "smaps_rollup").write_text("Pss: 200 kB\n")
        now[0] = 1.0  # younger than refresh_s: the last readings, no new read
        assert readings.latest([10], ()) == {10: Reading(100 * 1024)}
        now[0] = 2.5
        readings.latest([10], ())
        for _ in range(100):
            if readings.readings[10].pss == 200 * 1024:
                break
            await asyncio.sleep(0.01)
        assert readings.latest([10], ())[10].pss == 200 * 1024
        await readings.close()

    asyncio.run(main())


def test_outside_a_loop_the_readings_are_taken_at_once(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {10: 100}, {})
    assert ResidentReadings(proc=proc).latest([10], ()) == {10: Reading(100 * 1024)}
