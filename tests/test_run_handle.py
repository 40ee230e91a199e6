"""The run protocol, cancel reasons, open_executor, the shared-bus forwarding policy, the demo agent.

That both run kinds implement :class:`~trioflow.handle.RunHandle` is also
checked by mypy (``_RUN_IS_A_HANDLE`` in ``trioflow/executor.py``,
``_REPLAY_IS_A_HANDLE`` in ``trioflow/recording/_replay_run.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from trioflow import (
    Agent,
    CancelReason,
    OnDisconnect,
    Run,
    RunHandle,
    ScriptedModel,
    StreamingFlowExecutor,
    Turn,
    open_event_bus,
    open_executor,
)
from trioflow.bus import Overflow
from trioflow.demo import default_agent, default_agent_factory
from trioflow.events import EventType
from trioflow.executor import _TOKENS_PER_BATCH
from trioflow.models._base import Message, ModelEvent, TextDelta, ToolSpec, TurnEnd, Usage
from trioflow.recording import EventRecorder, start_replay
from trioflow.web import create_app
from trioflow.web._app import hub_of
from trioflow.web._errors import ApiError


def saying(words: int = 5) -> Agent:
    """An agent whose one turn says ``word`` ``words`` times (an agent, not a factory)."""
    return Agent(ScriptedModel([Turn(" ".join(["word"] * words))], pace=0))


def slow(pace: float = 20.0) -> Agent:
    return Agent(ScriptedModel([Turn(" ".join(["word"] * 200))], pace=pace))


async def record(path: Path) -> None:
    with EventRecorder(path) as recorder:
        async with open_event_bus() as bus:
            bus.add_listener(recorder, overflow=Overflow.BLOCK)
            await StreamingFlowExecutor(bus=bus).run(saying(3), "say three words")


# -- the protocol --------------------------------------------------------------------


async def test_both_run_kinds_are_run_handles(tmp_path: Path, nursery: trio.Nursery) -> None:
    await record(tmp_path / "run.jsonl")
    replay = await start_replay(tmp_path / "run.jsonl", nursery=nursery, speed=math.inf)
    async with open_executor() as executor:
        run = await executor.start(saying(), "go")
        handles: list[RunHandle] = [run, replay]
        for handle in handles:
            assert isinstance(handle, RunHandle)
            await handle.wait()
            assert handle.done and handle.status == "completed"
            assert handle.last_seq > 0 and handle.on_disconnect is OnDisconnect.CONTINUE
            async with handle.subscribe(after=0) as events:
                seen = [event.type async for event in events]
            assert seen[0] == "flow.started" and seen[-1] == "flow.completed"
            view = handle.to_dict()
            assert view["run_id"] == handle.run_id and view["on_disconnect"] == "continue"


async def test_a_replay_goes_through_the_web_hub_as_a_run(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    await record(tmp_path / "run.jsonl")
    replay = await start_replay(tmp_path / "run.jsonl", nursery=nursery, speed=0.01)
    executor = StreamingFlowExecutor()
    hub = hub_of(create_app(executor))
    hub.add_replay(replay)
    found: RunHandle = hub.get(replay.run_id)  # no cast: a ReplayRun is a RunHandle
    assert found is replay
    assert hub.replays() == [replay] and hub.runs() == [replay]
    watch = hub.attach(found)
    assert hub.watchers(replay.run_id) == 1
    watch.release(disconnected=True)  # on_disconnect: continue, so the replay goes on
    assert not replay.done
    hub.cancel(found)
    with trio.fail_after(5):
        await replay.wait()
    assert replay.to_dict()["metadata"]["cancelled"] == CancelReason.CLIENT == "cancelled by client"
    with pytest.raises(ApiError) as raised:
        hub.cancel(found)
    assert raised.value.status == 409


async def test_the_last_watcher_leaving_cancels_a_run_that_asks_for_it() -> None:
    async with open_executor() as executor:
        run = await executor.start(slow(), "go", on_disconnect=OnDisconnect.CANCEL)
        hub = hub_of(create_app(executor))
        first, second = hub.attach(run), hub.attach(run)
        first.release(disconnected=True)
        assert not run.done
        second.release(disconnected=True)
        result = await run.wait()
    assert result.reason is CancelReason.CLIENT_DISCONNECTED


# -- cancel reasons --------------------------------------------------------------------


async def test_cancel_reasons_are_the_enum_and_the_wire_keeps_the_strings() -> None:
    async with open_executor() as executor:
        plain = await executor.start(slow(), "go")
        own = await executor.start(slow(), "go")
        timed = await executor.start(slow(), "go", timeout=0.05)
        assert plain.cancel()
        assert own.cancel("user pressed stop")
        assert own.cancel() is False  # once
        results = [await plain.wait(), await own.wait(), await timed.wait()]
    assert [r.reason for r in results] == ["cancelled", "user pressed stop", "timeout"]
    assert results[0].reason is CancelReason.CANCELLED
    assert results[2].reason is CancelReason.TIMEOUT
    assert type(results[1].reason) is str
    async with plain.subscribe(after=0) as events:
        last = [event async for event in events][-1]
    assert last.type == EventType.FLOW_CANCELLED and type(last.data["reason"]) is str
    assert plain.to_dict()["result"]["reason"] == "cancelled"


async def test_leaving_open_executor_cancels_with_executor_closed() -> None:
    async with open_executor() as executor:
        run = await executor.start(slow(), "go")
    assert run.done and run.result is not None
    assert run.result.reason is CancelReason.EXECUTOR_CLOSED


async def test_leaving_a_stream_early_cancels_with_consumer_left() -> None:
    executor = StreamingFlowExecutor()
    async with executor.stream(slow(), "go") as events:
        await events.receive()
    (run,) = executor.runs.values()
    assert run.result is not None and run.result.reason is CancelReason.CONSUMER_LEFT


# -- open_executor ---------------------------------------------------------------------


async def test_open_executor_gives_start_a_nursery_and_closes_it() -> None:
    async with open_executor(history=64, timeout=10) as executor:
        assert executor.history == 64 and executor.timeout == 10
        run = await executor.start(saying(), "go")
        assert (await run.wait()).ok
    with pytest.raises(RuntimeError, match="needs a nursery"):
        await executor.start(saying(), "go")


async def test_async_with_the_executor_still_works_and_refuses_a_second_entry() -> None:
    executor = StreamingFlowExecutor()
    async with executor:
        run = await executor.start(saying(), "go")
        with pytest.raises(RuntimeError, match="open already"):
            async with executor:
                pass  # pragma: no cover
        assert (await run.wait()).ok
    async with executor:  # open again after closing
        assert (await (await executor.start(saying(), "go")).wait()).ok


async def test_open_executor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="forward_limit"):
        async with open_executor(forward_limit=-1):
            pass  # pragma: no cover


# -- forwarding to a shared bus ----------------------------------------------------------


async def test_a_full_shared_subscriber_stalls_no_run_and_gets_every_event_later() -> None:
    async with open_event_bus() as shared:
        async with shared.subscribe(buffer=1, overflow=Overflow.BLOCK) as stalled:
            async with open_executor(bus=shared) as executor:
                with trio.fail_after(5):  # before: every run waited for the stalled subscriber
                    runs = [await executor.start(saying(20), "go") for _ in range(3)]
                    results = [await run.wait() for run in runs]
                assert all(r.ok for r in results)
                with trio.fail_after(5):  # the backlogs follow as the subscriber reads
                    got = [await stalled.receive() for _ in range(sum(r.last_seq for r in runs))]
            assert all(run.forward_dropped == 0 for run in runs)
    for run in runs:  # lossless, in each run's order
        mine = [event for event in got if event.run_id == run.run_id]
        assert len(mine) == run.last_seq
        assert [e.type for e in mine][-1] == EventType.FLOW_COMPLETED
    assert [event.seq for event in got] == list(range(1, len(got) + 1))


async def test_forwarding_drops_past_the_limit_counts_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trioflow.executor")
    async with open_event_bus() as shared:
        async with shared.subscribe(buffer=1, overflow=Overflow.BLOCK) as stalled:
            async with open_executor(bus=shared, forward_limit=4) as executor:
                run = await executor.start(saying(50), "go")
                with trio.fail_after(5):
                    result = await run.wait()
                    received = [await stalled.receive() for _ in range(5)]
            assert result.ok
            assert [e.seq for e in received] == [1, 2, 3, 4, 5]
            assert run.forward_dropped + 5 == run.last_seq  # 1 went in at once, 4 waited
    warnings = [r for r in caplog.records if "not keeping up" in r.getMessage()]
    assert len(warnings) == 1 and run.run_id in warnings[0].getMessage()


async def test_a_stalled_shared_subscriber_lets_the_run_end_after_a_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_event_bus() as shared:
        async with shared.subscribe(buffer=1, overflow=Overflow.BLOCK):
            async with open_executor(bus=shared) as executor:
                run = await executor.start(saying(5), "go")
                await run.wait()
            # The executor closed: the backlog had its grace, then was dropped.
            assert run.forward_dropped > 0


# -- overhead: no checkpoint of the executor's per token, but fairness kept -------------


class Burst:
    """A model that yields its deltas without ever passing a checkpoint."""

    name = "burst"

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    @asynccontextmanager
    async def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
    ) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        async def events() -> AsyncIterator[ModelEvent]:
            for _ in range(self.tokens):
                yield TextDelta("x")
            yield TurnEnd("end_turn", Usage())

        yield events()


async def test_a_model_that_never_yields_still_lets_other_tasks_run() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        before = ticks
        result = await StreamingFlowExecutor().run(Agent(Burst(640)), "go")
        nursery.cancel_scope.cancel()
    assert result.ok and result.output == "x" * 640
    # at least one checkpoint per full batch of staged tokens
    assert ticks - before >= 640 // _TOKENS_PER_BATCH


async def test_a_full_subscriber_still_applies_backpressure() -> None:
    executor = StreamingFlowExecutor()
    async with executor.stream(saying(100), "go", buffer=2) as events:
        seen = [event async for event in events]
    assert sum(1 for e in seen if e.type == EventType.TOKEN_RECEIVED) == 100
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))


# -- the demo agent ----------------------------------------------------------------------


def test_the_web_layer_does_not_name_the_calculator() -> None:
    import trioflow.web._runs

    assert "calculator" not in Path(trioflow.web._runs.__file__).read_text()
    agent = default_agent()
    assert [t.name for t in agent.tools] == ["calculator"]
    make = default_agent_factory(max_iterations=3)
    first, second = make(None), make(None)
    assert first.model is not second.model  # a fresh scripted model per run
    assert first.max_iterations == 3


async def test_create_app_without_agent_runs_the_demo_agent() -> None:
    async with open_executor() as executor:
        hub = hub_of(create_app(executor))
        from trioflow.web import RunRequest

        hub._nursery = None
        run = await executor.start(hub._factory(RunRequest("What is 25 * 4?")), "What is 25 * 4?")
        assert isinstance(run, Run)
        assert (await run.wait()).output == "25 * 4 = 100."


# -- typed payloads ----------------------------------------------------------------------


@pytest.mark.parametrize("task", ["What is 25 * 4?", "What is 1 / 0?", "hello"])
async def test_every_event_matches_the_schema_of_its_type(task: str) -> None:
    from typing import NotRequired, get_origin, get_type_hints

    from trioflow.events import EVENT_SCHEMAS

    executor = StreamingFlowExecutor()
    async with executor.stream(default_agent(), task) as events:
        seen = [event async for event in events]
    checked = set()
    for event in seen:
        schema = EVENT_SCHEMAS.get(event.type)
        if schema is None:
            continue
        hints = get_type_hints(schema, include_extras=True)
        keys = set(hints)
        required = {k for k, hint in hints.items() if get_origin(hint) is not NotRequired}
        assert required <= set(event.data) <= keys, (event.type, dict(event.data))
        assert list(event.data) == [k for k in get_type_hints(schema) if k in event.data]
        checked.add(event.type)
    assert {"flow.started", "token.received", "add_message", "step.completed"} <= checked
    assert checked & {"flow.completed", "flow.failed"}
