"""The workflow engine against the in-memory log and a fake function caller: no processes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from smss.config import WorkflowLimits
from smss.errors import Conflict, InvalidInput, ModelError, Overloaded, SmssError
from smss.ports import CallResult, Tensors
from smss.spec import FunctionSpec, TensorSpec
from smss.testing.clock import FakeClock
from smss.testing.memlog import MemoryEventLog
from smss.workflow.blobs import to_blobs
from smss.workflow.builder import Workflow
from smss.workflow.engine import Engine
from smss.workflow.events import RunFailed, RunParked, SessionState, StageCompleted, StageFailed, StageStarted
from smss.workflow.spec import WorkflowSpec, validate_workflow


def fn(name: str, inputs: dict[str, list[int]], outputs: dict[str, list[int]]) -> FunctionSpec:
    return FunctionSpec(
        name=name,
        inputs=tuple(TensorSpec(k, "FP32", tuple(v)) for k, v in inputs.items()),
        outputs=tuple(TensorSpec(k, "FP32", tuple(v)) for k, v in outputs.items()),
        entrypoint="m.py:M",
    )


FUNCTIONS = {
    "double": fn("double", {"x": [1, 4]}, {"y": [1, 4]}),
    "inc": fn("inc", {"x": [1, 4]}, {"y": [1, 4]}),
    "acc": fn("acc", {"x": [1, 4], "h": [1, 4]}, {"h": [1, 4]}),
}

BEHAVIOUR: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "double": lambda i: {"y": i["x"] * 2},
    "inc": lambda i: {"y": i["x"] + 1},
    "acc": lambda i: {"h": i["h"] + i["x"]},
}


class FakeCaller:
    """Calls functions in-process; counts calls; can fail or block a function."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failures: dict[str, int] = {}
        self.refusals: dict[str, int] = {}  # admission refusals (queue full) to answer first
        self.gate: dict[str, asyncio.Event] = {}
        self.prewarmed: list[str] = []

    def spec_of(self, function: str) -> FunctionSpec:
        return FUNCTIONS[function]

    async def call(
        self, function: str, inputs: Tensors, outputs: tuple[str, ...], timeout_s: float
    ) -> CallResult:
        self.calls[function] += 1
        await asyncio.sleep(0)
        if function in self.gate:
            await self.gate[function].wait()
        if self.refusals.get(function, 0) > 0:
            self.refusals[function] -= 1
            raise Overloaded(f"model {function!r} is overloaded: queue full", retry_after_s=1.0)
        if self.failures.get(function, 0) > 0:
            self.failures[function] -= 1
            err = ModelError(f"{function} exploded")
            err.instance = f"{function}-1"  # type: ignore[attr-defined]
            raise err
        return CallResult(BEHAVIOUR[function](dict(inputs)), f"{function}-1", "local")

    def prewarm(self, function: str) -> None:
        self.prewarmed.append(function)


def chain() -> WorkflowSpec:
    wf = (
        Workflow("chain")
        .stage("a", "double", inputs={"x": "request.x"}, retries=1)
        .stage("b", "inc", inputs={"x": "a.y"})
        .stage("c", "acc", inputs={"x": "b.y"}, state=True)
        .output("out", "c.h")
    )
    return validate_workflow(wf.spec(), FUNCTIONS)


X = np.ones((1, 4), np.float32)


def engine(log: MemoryEventLog, caller: FakeCaller, spec: WorkflowSpec | None = None) -> Engine:
    specs = {"chain": spec or chain()}
    return Engine(log, caller, lambda name: specs[name], FakeClock())


async def eventually(predicate: Callable[[], bool], steps: int = 100_000) -> None:
    """Let the engine's tasks run until ``predicate`` holds (bounded, no wall-clock sleeps)."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def completions(log: MemoryEventLog, run_id: str) -> Counter[str]:
    return Counter(r.event.stage for r in log.read_run(run_id) if isinstance(r.event, StageCompleted))


def test_a_run_completes_with_each_stage_recorded_once() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        async with engine(log, caller).running() as e:
            outcome = await e.submit("chain", {"x": X}, session="s1")
        assert outcome.status == "completed"
        assert outcome.outputs is not None
        np.testing.assert_array_equal(outcome.outputs["out"], X * 2 + 1)
        assert completions(log, outcome.run_id) == {"a": 1, "b": 1, "c": 1}
        assert log.get_state("chain", "s1").version == 1
        assert "inc" in caller.prewarmed  # a's start pre-warms b's function

    asyncio.run(main())


def test_session_state_carries_and_no_update_is_lost_under_concurrency() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        async with engine(log, caller).running() as e:
            outcomes = await asyncio.gather(*(e.submit("chain", {"x": X}, session="s") for _ in range(20)))
        assert all(o.status == "completed" for o in outcomes)
        state = log.get_state("chain", "s")
        assert state.version == 20
        final = np.frombuffer(log.blobs[state.tensors["h"]][-16:], np.float32)
        np.testing.assert_array_equal(final, np.full(4, 20 * 3.0, np.float32))

    asyncio.run(main())


def test_a_failing_stage_is_retried_then_the_run_fails_with_its_location() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.failures["double"] = 5
        async with engine(log, caller).running() as e:
            outcome = await e.submit("chain", {"x": X})
        assert outcome.status == "failed"
        events = [r.event for r in log.read_run(outcome.run_id)]
        failed = [ev for ev in events if isinstance(ev, StageFailed)]
        assert [(f.stage, f.attempt, f.instance, f.error_type) for f in failed] == [
            ("a", 1, "double-1", "ModelError"),
            ("a", 2, "double-1", "ModelError"),
        ]
        assert isinstance(events[-1], RunFailed)
        assert events[-1].stage == "a"
        assert caller.calls["inc"] == 0

    asyncio.run(main())


def test_a_crashed_engine_resumes_without_rerunning_completed_stages() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.gate["inc"] = asyncio.Event()  # b hangs: the "crash" happens while it is in flight
        async with engine(log, caller).running() as e:
            outcome = await e.submit("chain", {"x": X}, session="s", wait=False)
            await eventually(lambda: caller.calls["inc"] > 0)
        # The engine is gone (its tasks cancelled) with stage b in flight.
        assert completions(log, outcome.run_id) == {"a": 1}
        caller.gate.clear()
        async with engine(log, caller).running() as e2:
            result = await e2.submit("chain", {"x": X}, session="other")  # the engine is live
            await eventually(lambda: log.run_summary(outcome.run_id).status != "running")  # type: ignore[union-attr]
        assert result.status == "completed"
        assert log.run_summary(outcome.run_id).status == "completed"  # type: ignore[union-attr]
        assert completions(log, outcome.run_id) == {"a": 1, "b": 1, "c": 1}
        assert caller.calls["double"] == 2  # once per run: never re-run for the recovered one
        assert log.get_state("chain", "s").version == 1

    asyncio.run(main())


def started_c(log: MemoryEventLog, attempt: int) -> bool:
    """Whether stage c's start of ``attempt`` is recorded."""
    return any(
        isinstance(r.event, StageStarted) and (r.event.stage, r.event.attempt) == ("c", attempt)
        for r in log.records
    )


@pytest.mark.parametrize("late", ["after_the_new_attempt_completed", "before_it_completed"])
def test_a_late_completion_of_a_reassigned_attempt_is_fenced_off(late: str) -> None:
    """Engine A stalls in stage c (stateful) of a run; engine B, on the same log,
    recovers the run and starts c again (attempt 2). A's late result of attempt 1 is
    rejected by the log (fenced), whether B's attempt finished first or not; the
    stage's effect is recorded once, by B; A then reports the outcome the log holds."""

    async def main() -> None:
        log = MemoryEventLog()
        stalled, second = FakeCaller(), FakeCaller()
        stalled.gate["acc"] = asyncio.Event()
        second.gate["acc"] = asyncio.Event()
        if late == "after_the_new_attempt_completed":
            second.gate["acc"].set()
        async with engine(log, stalled).running() as a:
            waiting = asyncio.ensure_future(a.submit("chain", {"x": X}, session="s"))
            await eventually(lambda: stalled.calls["acc"] > 0 and started_c(log, 1))
            (run_id,) = log.runs
            async with engine(log, second).running():
                await eventually(lambda: second.calls["acc"] > 0 and started_c(log, 2))
                if late == "after_the_new_attempt_completed":
                    await eventually(lambda: completions(log, run_id)["c"] == 1)
                stalled.gate["acc"].set()  # A's attempt 1 comes back late
                await eventually(lambda: log.counters["fenced"] == 1)
                second.gate["acc"].set()
                await eventually(lambda: log.run_summary(run_id).status == "completed")  # type: ignore[union-attr]
            outcome = await waiting
        assert outcome is not None
        assert outcome.status == "completed"
        events = [r.event for r in log.read_run(run_id)]
        c_results = [
            (type(e).__name__, e.attempt)
            for e in events
            if isinstance(e, StageCompleted | StageFailed) and e.stage == "c"
        ]
        assert c_results == [("StageCompleted", 2)]
        assert log.get_state("chain", "s").version == 1  # the state was written once
        assert outcome.outputs is not None
        np.testing.assert_array_equal(outcome.outputs["out"], X * 2 + 1)

    asyncio.run(main())


def test_a_wait_that_times_out_answers_running_and_the_run_goes_on() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.gate["inc"] = asyncio.Event()  # b holds until released
        async with engine(log, caller).running() as e:
            outcome = await e.submit("chain", {"x": X}, timeout_s=0.01)
            assert outcome.status == "running"
            caller.gate["inc"].set()
            await eventually(lambda: log.run_summary(outcome.run_id).status == "completed")  # type: ignore[union-attr]
        assert completions(log, outcome.run_id) == {"a": 1, "b": 1, "c": 1}

    asyncio.run(main())


def test_a_caller_that_goes_away_leaves_the_run_and_its_other_callers_alone() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.gate["inc"] = asyncio.Event()
        async with engine(log, caller).running() as e:
            leaving = asyncio.ensure_future(e.submit("chain", {"x": X}, idempotency_key="k"))
            await eventually(lambda: caller.calls["inc"] == 1)
            staying = asyncio.ensure_future(e.submit("chain", {"x": X}, idempotency_key="k"))
            for _ in range(10):  # the second caller now waits for the same run
                await asyncio.sleep(0)
            leaving.cancel()
            caller.gate["inc"].set()
            outcome = await staying
        assert leaving.cancelled()
        assert outcome.status == "completed"
        assert outcome.outputs is not None
        np.testing.assert_array_equal(outcome.outputs["out"], X * 2 + 1)
        assert completions(log, outcome.run_id) == {"a": 1, "b": 1, "c": 1}

    asyncio.run(main())


def test_a_second_completion_of_a_stage_is_dropped() -> None:
    async def main() -> None:
        log = MemoryEventLog()
        async with engine(log, FakeCaller()).running() as e:
            outcome = await e.submit("chain", {"x": X})
        result = await log.append(outcome.run_id, [StageCompleted("a", 9, {})])
        assert result.seqs == (0,)
        assert completions(log, outcome.run_id)["a"] == 1

    asyncio.run(main())


def test_idempotency_key_gives_one_run_and_a_conflict_for_a_different_payload() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        async with engine(log, caller).running() as e:
            runs = await asyncio.gather(
                *(e.submit("chain", {"x": X}, idempotency_key="k") for _ in range(10))
            )
            assert len({r.run_id for r in runs}) == 1
            with pytest.raises(Conflict):
                await e.submit("chain", {"x": X * 3}, idempotency_key="k")
        assert caller.calls["double"] == 1

    asyncio.run(main())


def test_a_changed_definition_parks_unfinished_runs_at_recovery() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.gate["inc"] = asyncio.Event()
        async with engine(log, caller).running() as e:
            outcome = await e.submit("chain", {"x": X}, wait=False)
            await eventually(lambda: caller.calls["inc"] > 0)
        changed = validate_workflow(
            Workflow("chain").stage("a", "double", inputs={"x": "request.x"}).output("out", "a.y").spec(),
            FUNCTIONS,
        )
        async with engine(log, caller, changed).running():
            pass
        assert log.run_summary(outcome.run_id).status == "parked"  # type: ignore[union-attr]
        assert isinstance(log.read_run(outcome.run_id)[-1].event, RunParked)

    asyncio.run(main())


def test_resume_of_a_failed_run_keeps_completed_stages() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.failures["inc"] = 10
        async with engine(log, caller).running() as e:
            failed = await e.submit("chain", {"x": X})
            assert failed.status == "failed"
            caller.failures.clear()
            await e.resume(failed.run_id)
            await eventually(lambda: log.run_summary(failed.run_id).status == "completed")  # type: ignore[union-attr]
        assert caller.calls["double"] == 1
        assert completions(log, failed.run_id) == {"a": 1, "b": 1, "c": 1}

    asyncio.run(main())


def test_replay_from_a_stage_reruns_it_and_what_follows_only() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        async with engine(log, caller).running() as e:
            first = await e.submit("chain", {"x": X}, session="s")
            again = await e.replay_from(first.run_id, "b")
        assert again.status == "completed"
        assert again.outputs is not None
        assert first.outputs is not None
        np.testing.assert_array_equal(again.outputs["out"], first.outputs["out"])
        assert caller.calls == {"double": 1, "inc": 2, "acc": 2}
        assert log.get_state("chain", "s").version == 1  # a replay leaves the session alone

    asyncio.run(main())


def test_bad_inputs_are_rejected_before_anything_is_logged() -> None:
    async def main() -> None:
        log = MemoryEventLog()
        async with engine(log, FakeCaller()).running() as e:
            for bad in ({"x": np.ones((1, 5), np.float32)}, {"y": X}, {"x": X.astype(np.float64)}, {}):
                with pytest.raises(InvalidInput):
                    await e.submit("chain", bad)
        assert log.records == []

    asyncio.run(main())


def test_a_log_that_cannot_write_refuses_the_run() -> None:
    async def main() -> None:
        log = MemoryEventLog()
        log.fail_appends = True
        async with engine(log, FakeCaller()).running() as e:
            with pytest.raises(SmssError):
                await e.submit("chain", {"x": X})
        assert log.records == []

    asyncio.run(main())


def _external_state(log: MemoryEventLog, value: float) -> np.ndarray:
    """Another writer (another process) moves session ``s`` of ``chain`` on to version 1."""
    h = np.full((1, 4), value, np.float32)
    refs, blobs = to_blobs({"h": h})
    log.blobs.update(blobs)
    log.states[("chain", "s")] = SessionState(1, refs)
    return h


def test_a_state_write_refused_by_the_log_reruns_the_stage_on_the_state_it_holds() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.gate["acc"] = asyncio.Event()
        async with engine(log, caller).running() as e:
            pending = asyncio.ensure_future(e.submit("chain", {"x": X}, session="s"))
            await eventually(lambda: caller.calls["acc"] == 1)  # c read version 0 and is running
            h = _external_state(log, 100.0)
            caller.gate["acc"].set()
            outcome = await pending
        assert outcome.status == "completed"
        assert outcome.outputs is not None
        np.testing.assert_array_equal(outcome.outputs["out"], h + X * 2 + 1)  # on the log's state
        assert caller.calls["acc"] == 2
        assert log.get_state("chain", "s").version == 2
        assert completions(log, outcome.run_id) == {"a": 1, "b": 1, "c": 1}
        assert log.counters["state_conflicts"] == 1

    asyncio.run(main())


def test_a_turn_that_read_a_refused_write_is_refused_too() -> None:
    """Run B reads run A's state before it is durable; A's write is refused, so B's
    (computed from it) must be refused as well, even though the version matches."""

    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.gate["acc"] = asyncio.Event()
        async with engine(log, caller).running() as e:
            a = asyncio.ensure_future(e.submit("chain", {"x": X}, session="s"))
            await eventually(lambda: caller.calls["acc"] == 1)
            b = asyncio.ensure_future(e.submit("chain", {"x": X}, session="s"))
            await eventually(lambda: caller.calls["inc"] == 2)  # B waits for the session
            log.gate = asyncio.Event()  # writes stay on their way
            caller.gate["acc"].set()
            await eventually(lambda: caller.calls["acc"] == 2)  # B's turn runs on A's queued state
            h = _external_state(log, 100.0)
            log.gate.set()
            outcomes = await asyncio.gather(a, b)
        assert [o.status for o in outcomes] == ["completed", "completed"]
        state = log.get_state("chain", "s")
        assert state.version == 3  # the other writer's turn and one per run: none lost
        final = np.frombuffer(log.blobs[state.tensors["h"]][-16:], np.float32)
        np.testing.assert_array_equal(final, (h + 2 * (X * 2 + 1)).ravel())
        for o in outcomes:
            assert completions(log, o.run_id) == {"a": 1, "b": 1, "c": 1}
        assert log.counters["state_conflicts"] >= 2

    asyncio.run(main())


def test_a_runs_records_share_one_commit_with_its_end() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        async with engine(log, caller).running() as e:
            await e.submit("chain", {"x": X}, session="s")
        assert log.eager == 1  # only the run's end was waited for

    asyncio.run(main())


# ---------------------------------------------------------------- bounds


def test_runs_past_the_limit_are_refused_with_429_until_one_ends() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.gate["double"] = asyncio.Event()  # every run holds at its first stage
        specs = {"chain": chain()}
        e = Engine(log, caller, lambda name: specs[name], FakeClock(), WorkflowLimits(max_runs=2))
        async with e.running():
            first = await e.submit("chain", {"x": X}, wait=False)
            await e.submit("chain", {"x": X}, wait=False)
            with pytest.raises(Overloaded, match="limit") as refused:
                await e.submit("chain", {"x": X}, wait=False)
            assert refused.value.retry_after_s is not None
            with pytest.raises(Overloaded):
                await e.submit("chain", {"x": X}, timeout_s=0.01)  # waited for or not
            assert len(log.runs) == 2  # nothing of the refused runs was logged
            caller.gate["double"].set()
            await eventually(lambda: log.run_summary(first.run_id).status == "completed")  # type: ignore[union-attr]
            await eventually(lambda: not log.unfinished_runs())
            assert (await e.submit("chain", {"x": X})).status == "completed"

    asyncio.run(main())


def test_non_durable_session_state_is_bounded_by_count_and_age() -> None:
    """``durable: false`` keeps state in memory, for a client-chosen session key: the
    least recently used sessions and those unused for the TTL are dropped (they start
    again from zeros), so the map cannot grow without bound."""

    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        clock = FakeClock()
        specs = {"chain": chain()}
        limits = WorkflowLimits(max_direct_sessions=2, direct_state_ttl_s=60.0)
        e = Engine(log, caller, lambda name: specs[name], clock, limits)

        async def turn(session: str) -> float:
            outcome = await e.run_direct("chain", {"x": X}, session)
            assert outcome.outputs is not None
            return float(outcome.outputs["out"][0, 0])

        async with e.running():
            assert [await turn("s1"), await turn("s1")] == [3.0, 6.0]  # state carries
            assert await turn("s2") == 3.0
            assert await turn("s1") == 9.0  # s1 used last: s2 is the oldest now
            assert await turn("s3") == 3.0  # a third session: s2 is dropped
            assert await turn("s2") == 3.0  # from zeros (and s1 is dropped in turn)
            assert await turn("s3") == 6.0
            clock.advance(60.0)
            assert await turn("s3") == 3.0  # unused for the TTL: dropped
        assert log.records == []  # never logged

    asyncio.run(main())


def test_a_stage_refused_at_admission_is_tried_again_without_spending_its_retries() -> None:
    """Queue full (nothing ran): the call is tried again after a back-off, within the
    stage's timeout, and the run completes with no failure recorded."""

    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.refusals["inc"] = 5  # more than b's retries (2)
        specs = {"chain": chain()}
        async with Engine(log, caller, lambda name: specs[name], FakeClock(autojump=True)).running() as e:
            outcome = await e.submit("chain", {"x": X}, session="s1")
        assert outcome.status == "completed", outcome.error
        assert caller.calls["inc"] == 6
        assert not any(isinstance(r.event, StageFailed) for r in log.read_run(outcome.run_id))

    asyncio.run(main())


def test_refusals_past_the_stage_timeout_fail_the_attempt_as_overloaded() -> None:
    async def main() -> None:
        log, caller = MemoryEventLog(), FakeCaller()
        caller.refusals["inc"] = 10_000  # never admitted
        specs = {"chain": chain()}
        async with Engine(log, caller, lambda name: specs[name], FakeClock(autojump=True)).running() as e:
            outcome = await e.submit("chain", {"x": X}, session="s1")
        assert outcome.status == "failed"
        failed = [r.event for r in log.read_run(outcome.run_id) if isinstance(r.event, StageFailed)]
        assert [f.error_type for f in failed] == ["Overloaded"] * 3  # its attempt and 2 retries

    asyncio.run(main())
