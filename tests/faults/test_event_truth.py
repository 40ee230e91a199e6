"""What users see is true: read-only event data, filters that reject unknown
type names, progress that reads 100 % for a completed run, and a progress bar
that names the iteration in progress."""

from __future__ import annotations

import copy
import io
import json
import pickle
import re
import subprocess
import sys
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
import trio
import trio.testing
from conftest import http_client

from trioflow import (
    Agent,
    EventType,
    FlowEvent,
    StreamingFlowExecutor,
    open_event_bus,
    register_event_type,
)
from trioflow.builtin import calculator
from trioflow.cli._console import RichRenderer
from trioflow.models import ModelError, ScriptedModel, Turn
from trioflow.patterns import event_predicate, filter_events, preset

if TYPE_CHECKING:
    from conftest import WebServer

CALC = ("calculator", {"operation": "evaluate", "expression": "25 * 4"})


def two_iteration_agent(budget: int = 10) -> Agent:
    """Iteration 1 calls the calculator, iteration 2 answers: a 2-iteration run."""
    return Agent(ScriptedModel(), tools=[calculator], max_iterations=budget)


# -- event.data is read-only ------------------------------------------------------------


async def test_a_listener_cannot_change_what_other_subscribers_see() -> None:
    refused: list[str] = []

    async def vandal(event: FlowEvent) -> None:
        attempts = [
            lambda: event.data.__setitem__("token", "HACKED"),
            lambda: event.data.update(token="HACKED"),  # type: ignore[attr-defined]
            lambda: event.data.pop("token"),  # type: ignore[attr-defined]
            lambda: event.data["input"].__setitem__("x", 0),
            lambda: event.data["input"]["ys"].append(4),
            lambda: event.data["input"]["ys"].__setitem__(0, 0),
        ]
        for attempt in attempts:
            with pytest.raises(TypeError, match="read-only"):
                attempt()
            refused.append("refused")

    async with open_event_bus() as bus:
        bus.add_listener(vandal, types={"tool.started"})
        async with bus.subscribe(types={"tool.started"}) as sub:
            await trio.testing.wait_all_tasks_blocked()
            await bus.emit("tool.started", {"token": "t", "input": {"x": 1, "ys": [1, 2, 3]}})
            await trio.testing.wait_all_tasks_blocked()
            seen = await sub.receive()
    assert refused == ["refused"] * 6
    assert seen.data == {"token": "t", "input": {"x": 1, "ys": [1, 2, 3]}}
    assert bus.statistics().listener_crashes == 0


async def test_the_emitter_changing_its_dict_afterwards_changes_no_event() -> None:
    payload: dict[str, Any] = {"tool": "calc", "input": {"ys": [1, 2]}}
    async with open_event_bus() as bus, bus.subscribe() as sub:
        await bus.emit("tool.started", payload)
        bus.emit_nowait("tool.started", payload)
        payload["input"]["ys"].append(3)
        payload["tool"] = "other"
        first, second = await sub.receive(), await sub.receive()
    for event in (first, second):
        assert event.data == {"tool": "calc", "input": {"ys": [1, 2]}}


def test_frozen_data_encodes_compares_pickles_copies_and_to_dict_is_a_mutable_copy() -> None:
    data = {"a": [1, {"b": 2}], "c": {"d": [3]}, "e": None}
    event = FlowEvent("info", data, 1.5, 3, "run_1")
    # Equal to plain containers and to an event built from the same dict.
    assert event.data == data
    assert event == FlowEvent("info", copy.deepcopy(data), 1.5, 3, "run_1")
    assert isinstance(event.data["a"], list)
    assert isinstance(event.data["c"], dict)
    # JSON: the same bytes as before, and a round trip.
    assert event.to_json() == (
        '{"id":3,"run_id":"run_1","type":"info","data":{"a":[1,{"b":2}],"c":{"d":[3]},'
        '"e":null},"timestamp":1.5}'
    )
    assert FlowEvent.from_json(event.to_json()) == event
    # pickle and copy keep the event, still read-only.
    for clone in (pickle.loads(pickle.dumps(event)), copy.copy(event), copy.deepcopy(event)):
        assert clone == event
        with pytest.raises(TypeError):
            clone.data["c"]["d"].append(4)
    # to_dict() is the caller's to change; the event stays as it was.
    wire = event.to_dict()
    wire["data"]["a"].append("mine")
    wire["data"]["c"]["d"] = []
    assert event.data == data
    assert json.loads(event.to_json())["data"] == data


def test_a_ready_event_re_emitted_keeps_its_data_read_only() -> None:
    event = FlowEvent.tool_started("calc", {"expression": "1+1"})
    with pytest.raises(TypeError):
        event.data["input"]["expression"] = "2+2"
    assert event.data["input"] == {"expression": "1+1"}


# -- filters reject unknown type names ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "replacement"),
    [("token", "token.received"), ("tool_end", "tool.completed"), ("end", "flow.completed")],
)
async def test_subscribe_rejects_an_old_short_name_and_says_what_replaced_it(
    name: str, replacement: str
) -> None:
    async with open_event_bus() as bus:
        for types in ({name}, name):
            with pytest.raises(ValueError, match="unknown event type") as info:
                async with bus.subscribe(types=types):
                    pass  # pragma: no cover
            message = str(info.value)
            assert f"{name!r} is the old name of {replacement!r}" in message
            assert "valid types: " in message
            for valid in EventType:
                assert str(valid) in message
        with pytest.raises(ValueError, match=re.escape("tool.complete")):
            bus.add_listener(print, types={"tool.complete"})
        assert bus.statistics().subscribers == ()


async def test_registered_custom_types_are_accepted_unregistered_ones_are_not() -> None:
    class AuditEvent(FlowEvent):
        __slots__ = ()
        AUDIT_LOGGED: ClassVar[str] = "audit.logged"

    register_event_type("faults.declared")
    async with open_event_bus(event_class=AuditEvent) as bus:
        bus.register_event("on_trade", "faults.trade")
        async with bus.subscribe(
            types={"faults.declared", "faults.trade", AuditEvent.AUDIT_LOGGED, "token.received"}
        ) as sub:
            await bus.emit_named("on_trade", {"qty": 1})
            await bus.emit("audit.logged")
            assert [(await sub.receive()).type for _ in range(2)] == [
                "faults.trade",
                "audit.logged",
            ]
        with pytest.raises(ValueError, match=re.escape("'faults.undeclared'")) as info:
            async with bus.subscribe(types={"faults.undeclared"}):
                pass  # pragma: no cover
        assert " faults.trade," in str(info.value)  # the bus's named type is listed
    # Another bus does not know the first one's named event type.
    async with open_event_bus() as other:
        with pytest.raises(ValueError, match=re.escape("faults.trade")):
            async with other.subscribe(types="faults.trade"):
                pass  # pragma: no cover
    with pytest.raises(ValueError, match=re.escape("old name of 'tool.completed'")):
        register_event_type("tool_end")


async def test_event_predicate_and_filter_events_reject_unknown_names() -> None:
    with pytest.raises(
        ValueError, match=re.escape("'tool_start' is the old name of 'tool.started'")
    ):
        event_predicate({"tool_start", "tool.completed"})
    with pytest.raises(
        ValueError, match=re.escape("'progress' is the old name of 'progress.update'")
    ):
        event_predicate("progress")

    async def events() -> Any:
        yield FlowEvent.token("x")

    with pytest.raises(ValueError, match=re.escape("old name of 'token.received'")):
        async for _ in filter_events(events(), {"token"}):
            pass  # pragma: no cover
    essential = preset("essential")
    assert essential is not None
    assert event_predicate(essential)(FlowEvent.token("x"))


async def test_stream_rejects_unknown_types_before_starting_a_run() -> None:
    executor = StreamingFlowExecutor()
    with pytest.raises(ValueError, match=re.escape("old name of 'tool.completed'")):
        async with executor.stream(two_iteration_agent(), "What is 25 * 4?", types={"tool_end"}):
            pass  # pragma: no cover
    assert not executor.runs


def watch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trioflow", "watch", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_watch_types_rejects_unknown_names_with_exit_2() -> None:
    proc = watch("http://127.0.0.1:9/runs/run_x/events", "--types", "token.received,tool_end")
    assert proc.returncode == 2
    assert "'tool_end' is the old name of 'tool.completed'" in proc.stderr
    assert "valid types: " in proc.stderr and "token.received" in proc.stderr
    assert proc.stdout == ""


async def test_watch_types_shows_only_the_selected_types(web_server: WebServer) -> None:

    async with http_client(web_server) as http:
        info = (await http.post("/runs", json={"task": "What is 25 * 4?"})).json()
    await web_server.executor.get_run(info["run_id"]).wait()
    proc = await trio.to_thread.run_sync(
        watch,
        info["events_url"],
        "--json",
        "--types",
        "tool.completed",
        "--types",
        "flow.completed",
    )
    assert proc.returncode == 0, proc.stderr
    types = [json.loads(line)["type"] for line in proc.stdout.splitlines()]
    assert types == ["tool.completed", "flow.completed"]


# -- progress reads 100 % for a completed run ----------------------------------------------


async def test_a_completed_two_iteration_run_reads_100_percent() -> None:
    executor = StreamingFlowExecutor()
    async with executor.stream(two_iteration_agent(budget=10), "What is 25 * 4?") as sub:
        events = [event async for event in sub]
    updates = [e.data for e in events if e.type == "progress.update"]
    assert [(u["current_iteration"], u["total_iterations"], u["percent"]) for u in updates] == [
        (1, 10, 10.0),
        (2, 2, 100.0),
    ]
    assert updates[-1]["progress_percent"] == 100.0
    assert updates[-1]["estimated_remaining"] == 0.0
    terminal = events[-1]
    assert terminal.type == "flow.completed"
    assert terminal.data["iterations"] == 2
    assert terminal.data["percent"] == 100.0
    (run,) = executor.runs.values()
    assert run.to_dict()["progress"]["progress_percent"] == 100.0
    assert run.progress.percent == 100.0


async def test_a_failed_run_keeps_the_share_it_reached() -> None:
    model = ScriptedModel([Turn("Let me see.", [CALC]), Turn(fail=ModelError("overloaded"))])
    executor = StreamingFlowExecutor()
    agent = Agent(model, tools=[calculator], max_iterations=10)
    async with executor.stream(agent, "What is 25 * 4?") as sub:
        events = [event async for event in sub]
    terminal = events[-1]
    assert terminal.type == "flow.failed"
    assert terminal.data["percent"] == 10.0
    (run,) = executor.runs.values()
    assert run.to_dict()["progress"]["progress_percent"] == 10.0


async def test_a_cancelled_run_keeps_the_share_it_reached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = ScriptedModel([Turn("Let me see.", [CALC]), Turn("slow", delay=100)])
    executor = StreamingFlowExecutor()
    agent = Agent(model, tools=[calculator], max_iterations=4)
    async with executor.stream(agent, "What is 25 * 4?", timeout=50) as sub:
        events = [event async for event in sub]
    terminal = events[-1]
    assert terminal.type == "flow.cancelled"
    assert terminal.data["reason"] == "timeout"
    assert terminal.data["percent"] == 25.0


# -- the console bar names the iteration in progress ----------------------------------------


async def test_the_progress_bar_shows_the_iteration_in_progress() -> None:
    renderer = RichRenderer(io.StringIO(), task="What is 25 * 4?", model="scripted")
    seen: list[tuple[str, str]] = []
    executor = StreamingFlowExecutor()
    with renderer:
        async with executor.stream(two_iteration_agent(budget=10), "What is 25 * 4?") as sub:
            async for event in sub:
                renderer.show(event)
                if event.type in ("iteration.started", "tool.started", "progress.update"):
                    seen.append((event.type, renderer.status))
    assert seen[0] == ("iteration.started", "iteration 1/10 · 0%")
    assert seen[1] == ("tool.started", "iteration 1/10 · 0%")
    assert seen[2][0] == "progress.update"
    assert seen[2][1].startswith("iteration 1/10 · 10% · ")
    assert seen[3][0] == "iteration.started"
    assert seen[3][1].startswith("iteration 2/10 · 10% · ")
    assert seen[4][0] == "progress.update"
    assert seen[4][1].startswith("iteration 2/2 · 100% · ")
    assert renderer.status.startswith("✔ completed in")
