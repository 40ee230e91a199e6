"""Tools that emit: a ``ToolContext`` parameter, its events in the run's stream in order,
from Python, over an event stream and over a WebSocket."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import start_run

from trioflow import (
    TERMINAL_TYPES,
    Agent,
    FlowEvent,
    ScriptedModel,
    StreamingFlowExecutor,
    ToolContext,
    ToolInputError,
    Turn,
    tool,
)

if TYPE_CHECKING:
    from conftest import OpenSSE, OpenWS, StartWebServer


@tool
async def crawl(site: str, pages: int, ctx: ToolContext) -> int:
    """Crawl a site, reporting each page.

    Args:
        site: the site.
        pages: how many pages it has.
    """
    for n in range(1, pages + 1):
        await ctx.emit("crawl.page", {"url": f"{site}/{n}"})
        await ctx.progress(n, pages, message=f"page {n}")
    return pages


def crawling_agent(*calls: tuple[str, int]) -> Agent:
    model = ScriptedModel(
        [
            Turn(tool_calls=[("crawl", {"site": site, "pages": n}) for site, n in calls]),
            Turn(text="done"),
        ]
    )
    return Agent(model, tools=[crawl])


async def run_events(agent: Agent) -> list[FlowEvent]:
    async with StreamingFlowExecutor().stream(agent, "crawl") as events:
        return [event async for event in events]


def test_the_context_parameter_is_not_part_of_the_input_schema() -> None:
    assert crawl.context == "ctx"
    assert set(crawl.input_schema["properties"]) == {"site", "pages"}
    assert crawl.input_schema["required"] == ["site", "pages"]


def test_a_context_needs_an_async_tool_and_only_one() -> None:
    def sync(x: int, ctx: ToolContext) -> int:
        return x

    async def twice(a: ToolContext, b: ToolContext) -> None:
        pass

    with pytest.raises(TypeError, match="needs an async function"):
        tool(sync)
    with pytest.raises(TypeError, match="two ToolContext parameters"):
        tool(twice)


async def record_nothing(type: str, data: Mapping[str, Any]) -> None:
    await trio.lowlevel.checkpoint()


async def test_invoking_a_context_tool_without_a_context_is_a_type_error() -> None:
    called = False

    @tool
    async def probe(ctx: ToolContext) -> None:
        nonlocal called
        called = True

    with pytest.raises(TypeError, match="takes a ToolContext"):
        await probe.invoke({})
    assert not called
    with pytest.raises(ToolInputError, match="ctx"):  # not an input property the model may send
        await probe.invoke({"ctx": 1}, ToolContext(record_nothing, tool="probe", call_id="c"))
    assert not called


async def test_a_tool_is_tested_with_a_context_of_its_own() -> None:
    seen: list[tuple[str, Mapping[str, Any]]] = []

    async def record(type: str, data: Mapping[str, Any]) -> None:
        seen.append((type, data))

    ctx = ToolContext(record, tool="crawl", call_id="c1", iteration=2)
    assert await crawl.invoke({"site": "s", "pages": 1}, ctx) == 1
    assert seen == [
        ("crawl.page", {"tool": "crawl", "call_id": "c1", "url": "s/1"}),
        (
            "tool.progress",
            {
                "tool": "crawl",
                "call_id": "c1",
                "iteration": 2,
                "done": 1,
                "total": 1,
                "message": "page 1",
            },
        ),
    ]


async def test_a_tools_events_come_between_its_start_and_its_end_in_order() -> None:
    events = await run_events(crawling_agent(("a.test", 3)))
    types = [e.type for e in events]
    start, end = types.index("tool.started"), types.index("tool.completed")
    inside = events[start + 1 : end]
    assert [e.type for e in inside] == ["crawl.page", "tool.progress"] * 3
    assert [e.data["url"] for e in inside if e.type == "crawl.page"] == [
        "a.test/1",
        "a.test/2",
        "a.test/3",
    ]
    assert [e.data["done"] for e in inside if e.type == "tool.progress"] == [1, 2, 3]
    call_id = events[start].data["call_id"]
    assert all(e.data["call_id"] == call_id and e.data["tool"] == "crawl" for e in inside)
    assert all(e.run_id == events[0].run_id for e in events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "flow.completed"


async def test_concurrent_calls_each_emit_between_their_own_start_and_end() -> None:
    events = await run_events(crawling_agent(("a.test", 4), ("b.test", 2)))
    by_call: dict[str, list[str]] = {}
    for event in events:
        if event.type.startswith(("tool.", "crawl.")):
            by_call.setdefault(event.data["call_id"], []).append(event.type)
    assert sorted(by_call.values(), key=len) == [
        ["tool.started", *["crawl.page", "tool.progress"] * 2, "tool.completed"],
        ["tool.started", *["crawl.page", "tool.progress"] * 4, "tool.completed"],
    ]


async def test_the_context_knows_its_run() -> None:
    runs: list[str | None] = []

    @tool
    async def whoami(ctx: ToolContext) -> str:
        """Which run is this."""
        runs.append(ctx.run_id)
        return str(ctx.run_id)

    model = ScriptedModel([Turn(tool_calls=[("whoami", {})]), Turn(text="ok")])
    events = await run_events(Agent(model, tools=[whoami]))
    assert runs == [events[0].run_id]


@pytest.mark.parametrize(
    "forbidden", ["flow.completed", "tool.completed", "token.received", "iteration.started"]
)
async def test_a_tool_cannot_emit_the_runs_own_types(forbidden: str) -> None:
    @tool
    async def forger(ctx: ToolContext) -> None:
        """Try to end the run."""
        await ctx.emit(forbidden, {})

    model = ScriptedModel([Turn(tool_calls=[("forger", {})]), Turn(text="ok")])
    events = await run_events(Agent(model, tools=[forger]))
    (failed,) = [e for e in events if e.type == "tool.failed"]
    assert "cannot emit" in failed.data["error"]["message"]
    assert [e.type for e in events if e.type in TERMINAL_TYPES] == ["flow.completed"]
    assert not [e for e in events if e.type == forbidden and e.data.get("tool") == "forger"]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda ctx: ctx.emit("has space"), ValueError),
        (lambda ctx: ctx.emit(3), TypeError),
        (lambda ctx: ctx.emit("x.y", ["not", "a", "mapping"]), TypeError),
        (lambda ctx: ctx.progress(-1), ValueError),
        (lambda ctx: ctx.progress(1, float("nan")), ValueError),
        (lambda ctx: ctx.progress(True), ValueError),
    ],
)
async def test_bad_emits_are_clear_errors(call: Any, error: type[Exception]) -> None:
    seen: list[str] = []

    async def record(type: str, data: Mapping[str, Any]) -> None:
        seen.append(type)

    with pytest.raises(error):
        await call(ToolContext(record, tool="t", call_id="c"))
    assert seen == []


async def test_info_and_warning_are_a_tools_to_emit() -> None:
    seen: list[str] = []

    async def record(type: str, data: Mapping[str, Any]) -> None:
        seen.append(type)

    ctx = ToolContext(record, tool="t", call_id="c")
    await ctx.emit("info", {"message": "hello"})
    await ctx.emit("warning", {"message": "careful"})
    assert seen == ["info", "warning"]


# -- over the wire ----------------------------------------------------------------------


async def test_a_tools_events_reach_an_event_stream_in_order(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=lambda request: crawling_agent(("a.test", 2)))
    run_id = await start_run(server, "crawl")
    with trio.fail_after(10):
        async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
            frames = await stream.events()
    names = [f.event for f in frames]
    start, end = names.index("tool.started"), names.index("tool.completed")
    assert names[start + 1 : end] == ["crawl.page", "tool.progress"] * 2
    assert [f.json()["data"]["url"] for f in frames if f.event == "crawl.page"] == [
        "a.test/1",
        "a.test/2",
    ]


async def test_a_tools_events_reach_a_websocket_in_order(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    server = await start_web_server(agent=lambda request: crawling_agent(("a.test", 2)))
    run_id = await start_run(server, "crawl")
    types: list[str] = []
    with trio.fail_after(10):
        async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
            while True:
                message = json.loads(await ws.get_message())
                types.append(message["type"])
                if message["type"] in TERMINAL_TYPES:
                    break
    start, end = types.index("tool.started"), types.index("tool.completed")
    assert types[start + 1 : end] == ["crawl.page", "tool.progress"] * 2
