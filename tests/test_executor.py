"""The agent loop and the streaming executor, end to end with the ScriptedModel."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

from trioflow import (
    TERMINAL_TYPES,
    Agent,
    FlowEvent,
    ModelError,
    RunStatus,
    ScriptedModel,
    StreamingFlowExecutor,
    Turn,
    open_event_bus,
    tool,
)
from trioflow.builtin import calculator
from trioflow.models import RetryNotice, ToolCall


def types_of(events: Sequence[FlowEvent]) -> list[str]:
    return [e.type for e in events]


def assert_one_terminal(events: Sequence[FlowEvent]) -> FlowEvent:
    terminal = [e for e in events if e.type in TERMINAL_TYPES]
    assert len(terminal) == 1, types_of(events)
    assert events[-1] is terminal[0]
    return terminal[0]


async def collect(
    executor: StreamingFlowExecutor, agent: Agent, task: str, **kw
) -> list[FlowEvent]:
    async with executor.stream(agent, task, **kw) as events:
        return [event async for event in events]


async def test_arithmetic_run_streams_tokens_tool_call_and_answer():
    events = await collect(StreamingFlowExecutor(), Agent(tools=[calculator]), "What is 25 * 4?")
    terminal = assert_one_terminal(events)
    assert terminal.type == "flow.completed"
    assert terminal.data["output"] == "25 * 4 = 100."
    assert events[0].type == "flow.started"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.run_id == events[0].run_id for e in events)
    tokens = [e.data["token"] for e in events if e.type == "token.received"]
    assert "".join(tokens) == "Let me calculate that." + "25 * 4 = 100."
    (started,) = [e for e in events if e.type == "tool.started"]
    (completed,) = [e for e in events if e.type == "tool.completed"]
    assert started.data["input"] == {"operation": "evaluate", "expression": "25 * 4"}
    assert completed.data["result"] == 100
    assert types_of(events).count("iteration.started") == 2
    assert types_of(events).count("progress.update") == 2
    assert "step.started" in types_of(events)
    assert "add_message" in types_of(events)


async def test_iteration_event_order():
    events = await collect(StreamingFlowExecutor(), Agent(tools=[calculator]), "What is 2 + 2?")
    first_iteration = types_of(events)[: types_of(events).index("iteration.completed") + 2]
    assert first_iteration == [
        "flow.started",
        "add_message",
        "iteration.started",
        "step.started",
        "token.received",
        "token.received",
        "token.received",
        "token.received",
        "step.completed",
        "add_message",
        "step.started",
        "tool.started",
        "tool.completed",
        "step.completed",
        "add_message",
        "iteration.completed",
        "progress.update",
    ]


async def test_tokens_arrive_live_not_after_the_turn(autojump_clock):
    model = ScriptedModel([Turn(text=["a", "b", "c", "d"])], pace=1.0)  # one token per second
    arrivals: list[float] = []
    async with StreamingFlowExecutor().stream(Agent(model), "go") as events:
        async for event in events:
            if event.type == "token.received":
                arrivals.append(trio.current_time())
    assert arrivals == pytest.approx([1.0, 2.0, 3.0, 4.0])


async def test_concurrent_tool_calls_run_together_and_results_keep_model_order(autojump_clock):
    @tool
    async def slow(seconds: float) -> str:
        """Sleep, then say how long."""
        await trio.sleep(seconds)
        return f"slept {seconds}"

    model = ScriptedModel(
        [Turn(tool_calls=[("slow", {"seconds": 3}), ("slow", {"seconds": 1})]), Turn(text="done")]
    )
    start = trio.current_time()
    events = await collect(StreamingFlowExecutor(), Agent(model, tools=[slow]), "go")
    assert trio.current_time() - start == pytest.approx(3)  # not 4: concurrent
    completed = [e.data["result"] for e in events if e.type == "tool.completed"]
    assert completed == ["slept 1", "slept 3"]  # completion order
    results = model.calls[1][-1].content
    assert [r.content for r in results] == ["slept 3", "slept 1"]  # the model's order
    assert assert_one_terminal(events).type == "flow.completed"


async def test_tool_error_is_reported_and_the_run_goes_on():
    model = ScriptedModel(
        [
            Turn(tool_calls=[("calculator", {"operation": "divide", "a": 1, "b": 0})]),
            Turn(text="Cannot divide by zero."),
        ]
    )
    events = await collect(StreamingFlowExecutor(), Agent(model, tools=[calculator]), "1/0")
    (failed,) = [e for e in events if e.type == "tool.failed"]
    assert failed.data["error"]["type"] == "CalculationError"
    assert "division by zero" in failed.data["error"]["message"]
    result = model.calls[1][-1].content[0]
    assert result.is_error
    assert "division by zero" in result.content
    assert assert_one_terminal(events).type == "flow.completed"


async def test_unknown_tool_becomes_tool_failed():
    model = ScriptedModel([Turn(tool_calls=[("nope", {})]), Turn(text="ok")])
    events = await collect(StreamingFlowExecutor(), Agent(model), "go")
    (failed,) = [e for e in events if e.type == "tool.failed"]
    assert failed.data["error"]["type"] == "UnknownToolError"


async def test_model_failure_ends_with_flow_failed_without_traceback():
    model = ScriptedModel(
        [
            Turn(
                text="partial answer",
                fail=ModelError("overloaded", kind="overloaded"),
                fail_after=1,
            )
        ]
    )
    events = await collect(StreamingFlowExecutor(), Agent(model), "go")
    terminal = assert_one_terminal(events)
    assert terminal.type == "flow.failed"
    assert terminal.data["error"] == {
        "type": "ModelError",
        "message": "overloaded",
        "kind": "overloaded",
    }
    assert "Traceback" not in terminal.to_json()
    assert "iteration.failed" in types_of(events)


async def test_unexpected_exception_in_a_model_ends_with_flow_failed():
    model = ScriptedModel([Turn(fail=RuntimeError("bug"))])
    result = await StreamingFlowExecutor().run(Agent(model), "go")
    assert result.status is RunStatus.FAILED
    assert result.error == {"type": "RuntimeError", "message": "bug"}


async def test_model_retries_become_warning_events():
    notice = RetryNotice(attempt=1, delay=0.5, error="RateLimitError: slow down", kind="rate_limit")
    model = ScriptedModel([Turn(text="ok", retries=[notice])])
    events = await collect(StreamingFlowExecutor(), Agent(model), "go")
    (warning,) = [e for e in events if e.type == "warning"]
    assert warning.data["attempt"] == 1
    assert warning.data["kind"] == "rate_limit"
    assert "retry 1" in warning.data["message"]


async def test_max_iterations_ends_with_a_clear_failed_status():
    model = ScriptedModel(
        Turn(tool_calls=[("calculator", {"operation": "add", "a": 1, "b": 1})]) for _ in range(10)
    )
    executor = StreamingFlowExecutor()
    events = await collect(executor, Agent(model, tools=[calculator], max_iterations=3), "loop")
    terminal = assert_one_terminal(events)
    assert terminal.type == "flow.failed"
    assert terminal.data["reason"] == "max_iterations"
    assert terminal.data["error"]["type"] == "MaxIterationsExceeded"
    assert types_of(events).count("iteration.started") == 3


async def test_timeout_ends_with_flow_cancelled_reason_timeout(autojump_clock):
    model = ScriptedModel([Turn(text="slow answer " * 10)], pace=1.0)
    executor = StreamingFlowExecutor()
    start = trio.current_time()
    events = await collect(executor, Agent(model), "go", timeout=3.5)
    terminal = assert_one_terminal(events)
    assert terminal.type == "flow.cancelled"
    assert terminal.data["reason"] == "timeout"
    assert trio.current_time() - start == pytest.approx(3.5)
    assert len([e for e in events if e.type == "token.received"]) == 3


async def test_leaving_the_stream_early_cancels_the_run(autojump_clock):
    model = ScriptedModel([Turn(text="many words " * 50)], pace=10)
    executor = StreamingFlowExecutor()
    async with executor.stream(Agent(model), "go") as events:
        async for event in events:
            if event.type == "token.received":
                break
    (run,) = executor.runs.values()
    assert run.status is RunStatus.CANCELLED
    async with run.subscribe(after=0) as replay:
        history = [e async for e in replay]
    assert assert_one_terminal(history).data["reason"] == "consumer left the stream"


async def test_outer_cancellation_still_emits_flow_cancelled(autojump_clock):
    seen: list[FlowEvent] = []
    async with open_event_bus() as shared:
        shared.add_listener(seen.append)
        executor = StreamingFlowExecutor(bus=shared)
        model = ScriptedModel([Turn(text="word " * 100)], pace=1)
        with trio.move_on_after(2.5):
            await executor.run(Agent(model), "go")
        await trio.testing.wait_all_tasks_blocked()
    terminal = assert_one_terminal(seen)
    assert terminal.type == "flow.cancelled"


async def test_run_returns_result_and_runs_the_agent_once():
    model = ScriptedModel()
    result = await StreamingFlowExecutor().run(Agent(model, tools=[calculator]), "What is 6 * 7?")
    assert result.ok
    assert result.output == "6 * 7 = 42."
    assert result.iterations == 2
    assert result.usage.total_tokens > 0
    assert result.duration >= 0
    assert len(model.calls) == 2  # two model turns, one run


async def test_stream_sse_yields_frames():
    async with StreamingFlowExecutor().stream_sse(Agent(), "hi") as frames:
        out = [frame async for frame in frames]
    assert out[0].startswith("id: 1\nevent: flow.started\ndata: {")
    assert out[-1].split("\n")[1] == "event: flow.completed"
    assert all(frame.endswith("\n\n") for frame in out)


async def test_empty_task_is_rejected():
    with pytest.raises(ValueError, match="task"):
        await StreamingFlowExecutor().run(Agent(), "  ")


async def test_bad_timeout_is_rejected():
    with pytest.raises(ValueError, match="timeout"):
        await StreamingFlowExecutor().run(Agent(), "go", timeout=-1)


async def test_start_needs_a_nursery():
    with pytest.raises(RuntimeError, match="nursery"):
        await StreamingFlowExecutor().start(Agent(), "go")


async def test_start_with_own_nursery_and_subscribe_from_any_point():
    executor = StreamingFlowExecutor()
    async with executor:
        run = await executor.start(Agent(tools=[calculator]), "What is 3 + 4?")
        result = await run.wait()
        assert result.output == "3 + 4 = 7."
        async with run.subscribe(after=5) as events:
            replay = [e async for e in events]
        assert replay[0].seq == 6
        assert replay[-1].type == "flow.completed"
        assert executor.get_run(run.run_id) is run
        assert run.to_dict()["status"] == "completed"
        assert run.counts()["tool_calls"] == 1


async def test_start_in_callers_nursery():
    executor = StreamingFlowExecutor()
    async with trio.open_nursery() as nursery:
        run = await executor.start(Agent(), "hello", nursery=nursery)
        assert run.status in (RunStatus.RUNNING, RunStatus.COMPLETED)
    assert run.status is RunStatus.COMPLETED


async def test_cancel_a_running_run(autojump_clock):
    executor = StreamingFlowExecutor()
    async with executor:
        run = await executor.start(Agent(ScriptedModel([Turn(text="x " * 100)], pace=1)), "go")
        await trio.sleep(2.5)
        assert run.cancel("user asked")
        result = await run.wait()
        assert not run.cancel()
    assert result.status is RunStatus.CANCELLED
    assert result.reason == "user asked"


async def test_pause_holds_the_run_and_resume_lets_it_go_on(autojump_clock):
    executor = StreamingFlowExecutor()
    async with executor:
        run = await executor.start(Agent(ScriptedModel([Turn(text="a b c d e f")], pace=1)), "go")
        await trio.sleep(2.5)
        assert run.pause()
        await trio.sleep(100)
        assert run.status is RunStatus.PAUSED
        tokens_while_paused = run.counts()["tokens"]
        await trio.sleep(100)
        assert run.counts()["tokens"] == tokens_while_paused
        assert run.resume()
        result = await run.wait()
    assert result.output == "a b c d e f"
    async with run.subscribe() as events:
        kinds = types_of([e async for e in events])
    assert kinds.count("flow.paused") == 1
    assert kinds.index("flow.paused") < kinds.index("flow.resumed")


async def test_closing_the_executor_cancels_running_runs(autojump_clock):
    executor = StreamingFlowExecutor()
    async with executor:
        run = await executor.start(Agent(ScriptedModel([Turn(text="x " * 100)], pace=1)), "go")
        await trio.sleep(1.5)
    assert run.status is RunStatus.CANCELLED
    assert run.result is not None
    assert run.result.reason == "executor closed"


async def test_shared_bus_listeners_see_every_run_live():
    tokens: list[str] = []
    terminals: list[FlowEvent] = []
    async with open_event_bus() as shared:
        shared.add_listener(lambda e: tokens.append(e.data["token"]), types={"token.received"})
        shared.add_listener(terminals.append, types=TERMINAL_TYPES)
        executor = StreamingFlowExecutor(bus=shared)
        r1 = await executor.run(Agent(), "first")
        r2 = await executor.run(Agent(), "second")
    assert len(terminals) == 2
    assert {e.run_id for e in terminals} == {r1.run_id, r2.run_id}
    assert "".join(tokens) == r1.output + r2.output


async def test_registry_retains_a_bounded_number_of_finished_runs():
    executor = StreamingFlowExecutor(retention=2)
    ids = [(await executor.run(Agent(), f"task {i}")).run_id for i in range(5)]
    assert list(executor.runs) == ids[-2:]
    with pytest.raises(KeyError):
        executor.get_run(ids[0])


async def test_duplicate_run_id_is_rejected():
    executor = StreamingFlowExecutor()
    async with executor:
        await executor.start(Agent(), "a", run_id="same")
        with pytest.raises(ValueError, match="exists"):
            await executor.start(Agent(), "b", run_id="same")


async def test_explicit_tool_call_objects_in_script():
    model = ScriptedModel(
        [
            Turn(
                tool_calls=[ToolCall("id1", "calculator", {"operation": "power", "a": 2, "b": 10})]
            ),
            Turn(text="1024"),
        ]
    )
    events = await collect(StreamingFlowExecutor(), Agent(model, tools=[calculator]), "2^10")
    (completed,) = [e for e in events if e.type == "tool.completed"]
    assert completed.data == {
        "tool": "calculator",
        "call_id": "id1",
        "iteration": 1,
        "result": 1024,
        "duration": completed.data["duration"],
    }


async def test_outer_cancellation_during_concurrent_tools_emits_one_flow_cancelled(autojump_clock):
    @tool
    async def wait(seconds: float) -> str:
        """Sleep."""
        await trio.sleep(seconds)
        return "ok"

    seen: list[FlowEvent] = []
    async with open_event_bus() as shared:
        shared.add_listener(seen.append)
        model = ScriptedModel(
            [Turn(tool_calls=[("wait", {"seconds": 10}), ("wait", {"seconds": 20})])]
        )
        with trio.move_on_after(5):
            await StreamingFlowExecutor(bus=shared).run(Agent(model, tools=[wait]), "go")
        await trio.testing.wait_all_tasks_blocked()
    terminal = assert_one_terminal(seen)
    assert terminal.type == "flow.cancelled"
    assert terminal.data["reason"] == "cancelled"
