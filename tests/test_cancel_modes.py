"""Cancel modes: ``immediate`` (at once) and ``after_turn`` (the current model turn and its
tool calls finish, then ``flow.cancelled``), from Python and over HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from conftest import http_client, start_run

from trioflow import (
    TERMINAL_TYPES,
    Agent,
    FlowEvent,
    ScriptedModel,
    StreamingFlowExecutor,
    Turn,
    tool,
)
from trioflow.agent import RunControl, StoppedAfterTurn
from trioflow.handle import CancelMode

if TYPE_CHECKING:
    from conftest import OpenSSE, StartWebServer


def gated_agent(gate: trio.Event, turns: int = 3) -> Agent:
    """An agent whose every turn calls the ``wait`` tool, which returns once ``gate`` is set."""

    @tool
    async def wait() -> str:
        """Wait for the gate."""
        await gate.wait()
        return "opened"

    script = [Turn(text=f"turn {n}", tool_calls=[("wait", {})]) for n in range(turns)]
    return Agent(ScriptedModel([*script, Turn(text="answer")]), tools=[wait])


async def test_after_turn_lets_the_tool_call_finish_then_cancels() -> None:
    gate = trio.Event()
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(gated_agent(gate), "go")
        async with run.subscribe(after=0) as events:
            seen: list[FlowEvent] = []
            async for event in events:
                seen.append(event)
                if event.type == "tool.started":
                    assert run.cancel("enough", mode="after_turn")
                    assert not run.cancel("again", mode=CancelMode.AFTER_TURN)
                    await trio.testing.wait_all_tasks_blocked()
                    assert not run.done  # the tool call is still going
                    gate.set()
    types = [e.type for e in seen]
    assert types.count("iteration.started") == 1  # no second turn
    assert types.index("tool.completed") < types.index("flow.cancelled")
    assert [e.type for e in seen if e.type in TERMINAL_TYPES] == ["flow.cancelled"]
    assert seen[-1].data["reason"] == "enough"
    assert seen[-1].data["iterations"] == 1
    assert run.result is not None and run.result.reason == "enough"


async def test_after_turn_on_the_answering_turn_completes_the_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    agent = Agent(ScriptedModel([Turn(text="the answer", delay=1.0)]))
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(agent, "go")
        assert run.cancel(mode="after_turn")
        await run.wait()
    assert run.result is not None and run.result.output == "the answer"
    assert str(run.status) == "completed"


async def test_an_immediate_cancel_still_cuts_an_after_turn_one_short() -> None:
    gate = trio.Event()  # never set: only an immediate cancel ends the tool call
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(gated_agent(gate), "go")
        async with run.subscribe(after=0) as events:
            seen: list[FlowEvent] = []
            async for event in events:
                seen.append(event)
                if event.type == "tool.started":
                    assert run.cancel(mode="after_turn")
                    await trio.testing.wait_all_tasks_blocked()
                    assert run.cancel("now")
                    assert not run.cancel("later")
    assert "tool.completed" not in [e.type for e in seen]
    assert seen[-1].type == "flow.cancelled" and seen[-1].data["reason"] == "now"


async def test_cancel_modes_are_checked_and_a_finished_run_refuses_both() -> None:
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(Agent(), "What is 2 + 2?")
        with pytest.raises(ValueError, match="is not a valid CancelMode"):
            run.cancel(mode="politely")
        await run.wait()
        assert not run.cancel(mode="after_turn")
        assert not run.cancel()


async def test_an_agent_alone_stops_after_a_turn_with_stopped_after_turn() -> None:
    gate = trio.Event()
    gate.set()
    control = RunControl()
    assert control.stop_after_turn("done for today")
    assert not control.stop_after_turn("twice")
    emitted: list[str] = []

    async def emit(type: str, data: object) -> None:
        emitted.append(type)

    with pytest.raises(StoppedAfterTurn) as info:
        await gated_agent(gate).run("go", emit, control=control)  # type: ignore[arg-type]
    assert (info.value.reason, info.value.iterations) == ("done for today", 1)
    assert emitted.count("tool.completed") == 1 and emitted.count("iteration.started") == 1


# -- over HTTP ----------------------------------------------------------------------------


async def test_post_cancel_after_turn_over_http(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    gate = trio.Event()
    server = await start_web_server(agent=lambda request: gated_agent(gate))
    run_id = await start_run(server, "go")
    with trio.fail_after(10):
        async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
            names: list[str | None] = []
            while (frame := await stream.next()) is not None:
                names.append(frame.event)
                if frame.event == "tool.started":
                    async with http_client(server) as http:
                        answer = await http.post(
                            f"/runs/{run_id}/cancel", json={"mode": "after_turn"}
                        )
                    assert answer.status_code == 202
                    assert answer.json()["mode"] == "after_turn"
                    gate.set()
                if frame.event == "flow.cancelled":
                    assert frame.json()["data"]["reason"] == "cancelled by client"
    assert names.index("tool.completed") < names.index("flow.cancelled")
    assert names.count("iteration.started") == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"mode": "politely"}, "'mode' must be"),
        ({"mode": "after_turn", "reason": "x"}, "may only be"),
        (["after_turn"], "may only be"),
    ],
)
async def test_a_bad_cancel_body_is_a_400_and_the_run_goes_on(
    start_web_server: StartWebServer, body: object, message: str
) -> None:
    gate = trio.Event()
    server = await start_web_server(agent=lambda request: gated_agent(gate))
    run_id = await start_run(server, "go")
    async with http_client(server) as http:
        answer = await http.post(f"/runs/{run_id}/cancel", json=body)
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_request"
        assert message in answer.json()["error"]["message"]
        assert not server.executor.get_run(run_id).done
        immediate = await http.post(f"/runs/{run_id}/cancel")  # no body: at once
    assert immediate.status_code == 202 and immediate.json()["mode"] == "immediate"
    with trio.fail_after(5):
        await server.executor.get_run(run_id).wait()
    assert str(server.executor.get_run(run_id).status) == "cancelled"
