"""heap.settle: what is alive when a process has started is skipped by later collections."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_settled_objects_leave_the_collected_generations_and_later_garbage_is_still_freed() -> None:
    # In a child: freezing is process-wide and would change this test process's heap.
    script = textwrap.dedent(
        """
        import gc, weakref
        from smss import heap

        class Node:
            pass

        kept = [Node() for _ in range(1000)]
        heap.settle()
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in tracked for o in kept), "settled objects are still collected"
        assert gc.get_freeze_count() >= 1000

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after settling
        alive = weakref.ref(a)
        del a, b
        gc.collect()
        assert alive() is None, "a cycle made after settle was not freed"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
