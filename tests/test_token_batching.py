"""The executor's token path: batches to the bus, prompt delivery, the agent's token fast path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from trioflow import (
    TERMINAL_TYPES,
    Agent,
    EventType,
    FlowEvent,
    ScriptedModel,
    StreamingFlowExecutor,
    Turn,
    open_event_bus,
    open_executor,
)
from trioflow._frozen import FrozenDict
from trioflow.bus import Overflow, SubscriberEvicted
from trioflow.executor import _TOKEN_GRACE, _pause
from trioflow.models import Message, StopReason, TextDelta, TurnEnd, Usage

TOKEN = EventType.TOKEN_RECEIVED


def token(text: str) -> FrozenDict:
    return FrozenDict(token=text, iteration=1)


# -- delivery ------------------------------------------------------------------------------


async def test_a_slow_models_token_is_delivered_before_the_next_delta(mock_clock):
    """Batching coalesces only what is there: a token does not wait for the next delta."""
    model = ScriptedModel([Turn(text=["a ", "b ", "c "])], pace=1)  # one delta per second
    async with open_executor() as executor:
        run = await executor.start(Agent(model), "go")
        async with run.subscribe(types=TOKEN) as tokens:
            for text in ["a ", "b ", "c "]:
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.WouldBlock):
                    tokens.receive_nowait()  # the model sleeps: nothing yet
                mock_clock.jump(1)  # the next delta arrives
                await trio.testing.wait_all_tasks_blocked()
                # Delivered while the model sleeps towards its next delta.
                assert tokens.receive_nowait().data["token"] == text
            result = await run.wait()
    assert result.output == "a b c "


async def test_a_fast_models_tokens_arrive_in_batches_each_with_its_seq():
    model = ScriptedModel([Turn(text=["x "] * 500)])
    executor = StreamingFlowExecutor(history=1024)
    batches: list[list[FlowEvent]] = []
    async with executor.stream(Agent(model), "go") as events:
        while True:
            try:
                batches.append(await events.receive_batch())
            except trio.EndOfChannel:
                break
    seen = [event for batch in batches for event in batch]
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert sum(e.type == TOKEN for e in seen) == 500
    assert [e.type in TERMINAL_TYPES for e in seen].count(True) == 1
    assert seen[-1].type == EventType.FLOW_COMPLETED
    assert len(batches) < 250  # a subscriber is woken per batch, not per token


class BurstThenStall:
    """A model that streams ``burst`` deltas, one per scheduling round, then stalls for an hour."""

    name = "burst"

    def __init__(self, burst: int) -> None:
        self.burst = burst

    def stream(
        self, messages: Sequence[Message], *, tools: Sequence[Any] = (), system: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Any]]:
        return self._stream()

    @asynccontextmanager
    async def _stream(self) -> AsyncIterator[AsyncIterator[Any]]:
        async def events() -> AsyncIterator[Any]:
            for _ in range(self.burst):
                await trio.lowlevel.checkpoint()
                yield TextDelta("x ")
            await trio.sleep(3600)
            yield TurnEnd(StopReason.END_TURN, Usage(1, self.burst))

        yield events()


async def test_a_fast_burst_is_delivered_within_the_grace_period_when_the_model_stalls(
    autojump_clock,
):
    """Tokens staged while the model streams fast do not wait for its next delta either."""
    async with open_executor() as executor:
        run = await executor.start(Agent(BurstThenStall(10)), "go")
        async with run.subscribe(types=TOKEN) as tokens:
            start = trio.current_time()
            got = 0
            while got < 10:
                got += len(await tokens.receive_batch())
            assert trio.current_time() - start <= 2 * _TOKEN_GRACE  # not the model's hour
            run.cancel()
        assert (await run.wait()).output == "x " * 10


# -- the bus's batch path ------------------------------------------------------------------


async def test_emit_batch_nowait_stamps_each_event_and_wakes_a_subscriber_once():
    async with open_event_bus() as bus, bus.subscribe() as sub:
        first = await bus.emit("flow.started", {"task": "t"})
        plain = {"token": "b", "iteration": 1}
        events = bus._emit_batch_nowait(TOKEN, [token("a"), plain], "run-1")
        assert [e.seq for e in events] == [first.seq + 1, first.seq + 2]
        assert events[0].data is not None and type(events[1].data) is FrozenDict
        assert events[1].data == plain and events[1].data is not plain
        assert all(e.run_id == "run-1" and e.type == TOKEN for e in events)
        assert list(bus.history.snapshot(0)) == [first, *events]
        assert await sub.receive() == first
        assert await sub.receive_batch() == events


async def test_emit_batch_nowait_stops_where_a_blocking_subscriber_is_full():
    async with open_event_bus() as bus, bus.subscribe(buffer=3) as sub:
        events = bus._emit_batch_nowait(TOKEN, [token(str(i)) for i in range(5)], None)
        assert [e.data["token"] for e in events] == ["0", "1", "2"]
        assert bus.last_seq == 3
        assert bus._emit_batch_nowait(TOKEN, [token("3")], None) == []
        assert len(await sub.receive_batch()) == 3


async def test_emit_batch_nowait_applies_drop_and_evict_policies_event_by_event():
    async with (
        open_event_bus() as bus,
        bus.subscribe(buffer=2, overflow=Overflow.DROP_OLDEST) as dropping,
        bus.subscribe(buffer=2, overflow=Overflow.EVICT) as evicted,
        bus.subscribe(types="flow.started") as other,
        bus.subscribe(types=lambda e: e.data.get("token") == "3") as picky,
    ):
        bus._emit_batch_nowait(TOKEN, [token(str(i)) for i in range(5)], None)
        assert [e.data["token"] for e in await dropping.receive_batch()] == ["3", "4"]
        assert dropping.statistics().dropped == 3
        assert [e.seq for e in await evicted.receive_batch()] == [1, 2]
        with pytest.raises(SubscriberEvicted):
            await evicted.receive()
        assert [e.seq for e in await picky.receive_batch()] == [4]
        with pytest.raises(trio.WouldBlock):
            other.receive_nowait()


async def test_emit_batch_nowait_validates_unknown_types_and_refuses_a_closed_bus():
    async with open_event_bus() as bus:
        with pytest.raises(ValueError):
            bus._emit_batch_nowait("not a type!", [{}], None)
        assert bus._emit_batch_nowait(TOKEN, [], None) == []
        bus.close()
        with pytest.raises(trio.ClosedResourceError):
            bus._emit_batch_nowait(TOKEN, [token("a")], None)


# -- the agent's token fast path -----------------------------------------------------------


class Recorder:
    """An emit with a ``token_nowait`` that takes the tokens it is told to."""

    def __init__(self, take: bool) -> None:
        self.take = take
        self.awaited: list[str] = []
        self.taken: list[Mapping[str, Any]] = []

    async def __call__(self, type: str, data: Mapping[str, Any], /) -> None:
        self.awaited.append(type)

    def token_nowait(self, data: Mapping[str, Any]) -> bool:
        if self.take:
            self.taken.append(data)
        return self.take


@pytest.mark.parametrize("take", [True, False])
async def test_the_agent_offers_tokens_to_token_nowait_first(take):
    emit = Recorder(take)
    result = await Agent(ScriptedModel([Turn(text=["a ", "b "])])).run("go", emit)
    assert result.output == "a b "
    if take:
        assert [d["token"] for d in emit.taken] == ["a ", "b "]
        assert TOKEN not in emit.awaited
    else:
        assert emit.awaited.count(TOKEN) == 2


# -- the batching task's pause -------------------------------------------------------------


async def test_pause_returns_at_its_deadline_without_raising(autojump_clock):
    start = trio.current_time()
    await _pause(0.25)
    assert trio.current_time() - start == pytest.approx(0.25)


async def test_pause_is_cancelled_from_outside_as_usual(autojump_clock):
    with trio.move_on_after(0.1) as scope:
        await _pause(10)
    assert scope.cancelled_caught
    assert trio.current_time() == pytest.approx(0.1)
