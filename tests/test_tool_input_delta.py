"""``tool.input_delta``: a tool call's input streamed by the agent as the model produces it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from trioflow import Agent, FlowEvent, ScriptedModel, StreamingFlowExecutor, Turn, tool
from trioflow.models import (
    Message,
    ModelEvent,
    RetryNotice,
    StopReason,
    TextDelta,
    ToolCall,
    ToolInputDelta,
    TurnEnd,
)


@tool
def echo(text: str) -> str:
    """Say ``text`` back."""
    return text


async def run(agent: Agent, deny: bool = False) -> list[FlowEvent]:
    async with StreamingFlowExecutor() as executor:
        handle = await executor.start(agent, "go")
        events: list[FlowEvent] = []
        async with handle.subscribe(after=0) as sub:
            async for event in sub:
                events.append(event)
                if event.type == "tool.approval_required":
                    if deny:
                        handle.deny(event.data["call_id"], "no")
                    else:
                        handle.approve(event.data["call_id"])
        return events


def of(events: list[FlowEvent], type: str) -> list[FlowEvent]:
    return [e for e in events if e.type == type]


def test_deltas_concatenate_to_the_input_all_before_the_calls_start() -> None:
    inputs = [{"text": "héllo, wörld"}, {"text": "x" * 40}]
    script = [Turn("Calling.", tool_calls=[("echo", i) for i in inputs]), Turn("done.")]
    events = trio.run(run, Agent(ScriptedModel(script, pace=1e6), tools=[echo]))
    assert events[-1].type == "flow.completed"
    deltas = of(events, "tool.input_delta")
    started = sorted(of(events, "tool.started"), key=lambda e: e.data["call_id"])  # concurrent
    assert [s.data["input"] for s in started] == inputs
    model_done = next(e for e in events if e.type == "step.completed" and e.data["step"] == "model")
    for call in started:
        mine = [d for d in deltas if d.data["call_id"] == call.data["call_id"]]
        assert mine[0].data == {
            "tool": "echo",
            "call_id": call.data["call_id"],
            "iteration": 1,
            "delta": "",
            "first": True,
        }
        assert all("first" not in d.data and d.data["delta"] for d in mine[1:])
        assert json.loads("".join(d.data["delta"] for d in mine)) == call.data["input"]
        assert max(d.seq for d in mine) < model_done.seq < call.seq
        assert call.data["streamed"] is True
    # the text's tokens come first, then the calls' deltas, in the model's order
    tokens = [t for t in of(events, "token.received") if t.data["iteration"] == 1]
    assert max(t.seq for t in tokens) < min(d.seq for d in deltas)
    assert [d.data["call_id"] for d in deltas] == sorted(
        (d.data["call_id"] for d in deltas), key=[s.data["call_id"] for s in started].index
    )


def test_an_unpaced_model_streams_no_input_and_tool_started_says_nothing() -> None:
    script = [Turn("Calling.", tool_calls=[("echo", {"text": "a"})]), Turn("done.")]
    events = trio.run(run, Agent(ScriptedModel(script), tools=[echo]))
    assert not of(events, "tool.input_delta")
    assert "streamed" not in of(events, "tool.started")[0].data


def test_approval_and_denial_of_a_streamed_call_say_it_streamed() -> None:
    script = [Turn(tool_calls=[("echo", {"text": "a"})]), Turn("done.")]
    agent = Agent(ScriptedModel(script, pace=1e6), tools=[echo], approval=lambda call: True)
    events = trio.run(run, agent, True)
    assert of(events, "tool.approval_required")[0].data["streamed"] is True
    assert of(events, "tool.denied")[0].data["streamed"] is True
    assert not of(events, "tool.started")


class _Replayed:
    """A model that plays the same events for every turn (the last turn: just text)."""

    name = "replayed"

    def __init__(self, *turns: Sequence[ModelEvent]) -> None:
        self._turns = list(turns)

    @asynccontextmanager
    async def _stream(self) -> AsyncIterator[AsyncIterator[ModelEvent]]:
        events = self._turns.pop(0)

        async def gen() -> AsyncIterator[ModelEvent]:
            for event in events:
                await trio.lowlevel.checkpoint()
                yield event

        yield gen()

    def stream(self, messages: Sequence[Message], **kwargs: Any) -> Any:
        return self._stream()


def test_a_retry_voids_the_streamed_calls_and_the_deltas_need_no_first() -> None:
    call = ToolCall("c2", "echo", {"text": "b"})
    model = _Replayed(
        [
            TextDelta("Let"),
            ToolInputDelta("c1", "echo", "", 0, first=True),
            ToolInputDelta("c1", "echo", '{"te', 0),
            RetryNotice(1, 0.0, "overloaded", kind="overloaded", restarted=True),
            TextDelta("Let me."),
            # a model that never sends the empty first delta: the agent makes one
            ToolInputDelta("c2", "echo", '{"text": ', 0),
            ToolInputDelta("c2", "echo", '"b"}', 0),
            call,
            TurnEnd(StopReason.TOOL_USE),
        ],
        [TextDelta("done."), TurnEnd(StopReason.END_TURN)],
    )
    events = trio.run(run, Agent(model, tools=[echo]))
    assert events[-1].type == "flow.completed", events[-1]
    (warning,) = of(events, "warning")
    assert warning.data["discarded_tokens"] == 1
    assert warning.data["discarded_tool_calls"] == [{"call_id": "c1", "tool": "echo"}]
    after = [d.data for d in of(events, "tool.input_delta") if d.seq > warning.seq]
    assert after == [
        {"tool": "echo", "call_id": "c2", "iteration": 1, "delta": "", "first": True},
        {"tool": "echo", "call_id": "c2", "iteration": 1, "delta": '{"text": '},
        {"tool": "echo", "call_id": "c2", "iteration": 1, "delta": '"b"}'},
    ]
    (started,) = of(events, "tool.started")
    assert started.data["call_id"] == "c2" and started.data["streamed"] is True
