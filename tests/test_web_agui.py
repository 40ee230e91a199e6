"""AG-UI (``POST /agui``, ``GET /runs/{id}/events.agui``): every frame validates against
``ag-ui-protocol``'s models over generated runs, the protocol's ordering rules hold, resume
has no gap and no duplicate, a bad ``RunAgentInput`` is a 400; and the real ``@ag-ui/client``
(``HttpAgent``, its SSE parser and verifier) drives a real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import (
    assert_error,
    assert_no_traceback,
    http_client,
    run_node,
    start_run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioflow import Agent, FlowEvent, ScriptedModel, StreamingFlowExecutor, Turn
from trioflow.approvals import ApprovalError
from trioflow.demo import default_agent
from trioflow.models import ModelError
from trioflow.tools import ToolContext, ToolError, tool
from trioflow.web._agui import AguiIds, agui_encoding, agui_events, parse_run_input
from trioflow.web._agui import _frames as agui_frames

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import StartWebServer

ag_ui = pytest.importorskip("ag_ui.core", reason="ag-ui-protocol (the test extra) is not installed")
pydantic = pytest.importorskip("pydantic")

EVENT = pydantic.TypeAdapter(ag_ui.Event)
IDS = AguiIds("thread-1", "run-1")


# -- checking frames ----------------------------------------------------------------------


def split_frames(text: str) -> list[tuple[str | None, dict[str, Any] | None]]:
    """The SSE frames of ``text``: ``(id, the JSON data)`` each (comments: ``(None, None)``)."""
    assert text == "" or text.endswith("\n\n"), text[-200:]
    out: list[tuple[str | None, dict[str, Any] | None]] = []
    for block in text.split("\n\n")[:-1]:
        frame_id: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            if name == "id":
                frame_id = value
            else:
                assert name == "data", line
                data.append(value)
        out.append((frame_id, json.loads("\n".join(data)) if data else None))
    return out


def validate(item: dict[str, Any]) -> Any:
    """``item`` is one AG-UI event by ``ag_ui.core``'s models, with no member they do not know."""
    model = EVENT.validate_python(item)
    assert not model.model_extra, (item, model.model_extra)
    assert item == json.loads(model.model_dump_json(by_alias=True)), item
    return model


class Verifier:
    """The ordering rules of ``@ag-ui/client``'s verifier (``verifyEvents``), in Python."""

    def __init__(self) -> None:
        self.texts: set[str] = set()
        self.ended_texts: set[str] = set()
        self.calls: set[str] = set()
        self.ended_calls: set[str] = set()
        self.steps: set[str] = set()
        self.started = False
        self.terminal: str | None = None

    def __call__(self, item: Mapping[str, Any]) -> None:
        kind = item["type"]
        assert self.terminal is None, f"{kind} after {self.terminal}"
        if not self.started:
            assert kind in ("RUN_STARTED", "RUN_ERROR"), kind
            self.started = True
        elif kind == "RUN_STARTED":
            raise AssertionError("a second RUN_STARTED")
        if kind == "TEXT_MESSAGE_START":
            assert item["messageId"] not in self.texts | self.ended_texts
            self.texts.add(item["messageId"])
        elif kind in ("TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END"):
            assert item["messageId"] in self.texts, item
            if kind == "TEXT_MESSAGE_END":
                self.texts.remove(item["messageId"])
                self.ended_texts.add(item["messageId"])
        elif kind == "TOOL_CALL_START":
            assert item["toolCallId"] not in self.calls | self.ended_calls
            # the iteration's message; still open when the model streams the call's input
            assert item["parentMessageId"] in self.texts | self.ended_texts
            self.calls.add(item["toolCallId"])
        elif kind in ("TOOL_CALL_ARGS", "TOOL_CALL_END"):
            assert item["toolCallId"] in self.calls, item
            if kind == "TOOL_CALL_END":
                self.calls.remove(item["toolCallId"])
                self.ended_calls.add(item["toolCallId"])
        elif kind == "TOOL_CALL_RESULT":
            assert item["toolCallId"] in self.ended_calls, item
        elif kind == "STEP_STARTED":
            assert item["stepName"] not in self.steps
            self.steps.add(item["stepName"])
        elif kind == "STEP_FINISHED":
            self.steps.remove(item["stepName"])
        elif kind == "RUN_FINISHED":
            assert not (self.texts or self.calls or self.steps), (self.texts, self.steps)
            self.terminal = kind
        elif kind == "RUN_ERROR":
            self.terminal = kind


def check_run(events: list[FlowEvent], ids: AguiIds = IDS) -> list[dict[str, Any]]:
    """Encode ``events`` (a whole run) as the server does; check every frame and the order."""
    verify = Verifier()
    items: list[dict[str, Any]] = []
    for event in events:
        frames = split_frames(agui_frames(event, ids).decode("ascii"))
        assert [data is None for _, data in frames] == [False] * len(frames)
        assert [frame_id for frame_id, _ in frames] == [None] * (len(frames) - 1) + (
            [str(event.seq)] if frames else []
        )
        for _, data in frames:
            assert data is not None
            validate(data)
            verify(data)
            items.append(data)
    assert verify.terminal is not None
    return items


# -- generated runs -----------------------------------------------------------------------


@tool
def echo(text: str) -> str:
    """Say ``text`` back."""
    return text


@tool
async def slow(steps: int, ctx: ToolContext) -> dict[str, int]:
    """Report progress ``steps`` times, then return a count."""
    for i in range(steps):
        await ctx.progress(i + 1, steps, message=f"step {i + 1}")
    return {"steps": steps}


@tool
def boom(why: str) -> str:
    """Always fail."""
    raise ToolError(why, tool="boom")


texts = st.text(st.characters(codec="utf-8"), max_size=6)
calls = st.one_of(
    st.tuples(st.just("echo"), st.fixed_dictionaries({"text": texts})),
    st.tuples(st.just("slow"), st.fixed_dictionaries({"steps": st.integers(0, 3)})),
    st.tuples(st.just("boom"), st.fixed_dictionaries({"why": texts})),
    st.tuples(st.just("missing"), st.just({})),
)
turns = st.builds(
    Turn,
    text=st.lists(texts, max_size=5),
    tool_calls=st.lists(calls, max_size=3),
)


async def run_events(agent: Agent, task: str, cancel_at: int | None) -> list[FlowEvent]:
    """The run's events; a "person" approves the calls that ask, but denies empty texts."""
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(agent, task, metadata={"agui_run_id": "r"})
        events: list[FlowEvent] = []
        async with run.subscribe(after=0) as sub:
            async for event in sub:
                events.append(event)
                if event.type == "tool.approval_required" and not run.done:
                    # A cancel may have withdrawn the call already (decided: refused).
                    with contextlib.suppress(ApprovalError):
                        if event.data["input"].get("text"):
                            run.approve(event.data["call_id"])
                        else:
                            run.deny(event.data["call_id"], "nothing to say")
                if cancel_at is not None and event.seq == cancel_at:
                    run.cancel()
        return events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(turns, max_size=4),
    fail=st.sampled_from([None, "model", "exhausted"]),
    cancel_at=st.none() | st.integers(2, 40),
    max_iterations=st.integers(1, 5),
    pace=st.sampled_from([0, 1e6]),  # paced: the tools' input streams (tool.input_delta)
)
def test_every_frame_of_generated_runs_validates_and_keeps_the_order(
    script: list[Turn], fail: str | None, cancel_at: int | None, max_iterations: int, pace: float
) -> None:
    if fail == "model":
        script = [*script, Turn(["half", " a turn"], fail=ModelError("gone"), fail_after=1)]
    elif fail is None:
        script = [*script, Turn("done.")]
    agent = Agent(
        ScriptedModel(script, pace=pace),
        tools=[echo, slow, boom],
        max_iterations=max_iterations,
        approval=lambda call: call.name == "echo",
    )
    events = trio.run(run_events, agent, "go", cancel_at)
    items = check_run(events)
    kinds = [item["type"] for item in items]
    assert kinds[0] == "RUN_STARTED" and kinds[-1] in ("RUN_FINISHED", "RUN_ERROR")
    for started in (e for e in events if e.type == "tool.started"):
        ids = [item.get("toolCallId") for item in items]
        assert ids.count(started.data["call_id"]) >= 3  # START, ARGS, END (and a RESULT)
        args = "".join(
            i["delta"]
            for i in items
            if i["type"] == "TOOL_CALL_ARGS" and i["toolCallId"] == started.data["call_id"]
        )
        assert json.loads(args) == started.data["input"]
        assert started.data.get("streamed", False) == bool(pace)
    for delta in (e for e in events if e.type == "tool.input_delta"):
        assert pace
        # streamed during the model step: its call starts in the iteration's open message
        after = [
            e for e in events if e.seq > delta.seq and e.type in ("step.completed", "tool.started")
        ]
        if after:  # (a cancel may have ended the run first)
            assert after[0].type == "step.completed" and after[0].data["step"] == "model"
    tokens = "".join(e.data["token"] for e in events if e.type == "token.received")
    assert "".join(i["delta"] for i in items if i["type"] == "TEXT_MESSAGE_CONTENT") == tokens
    if events[-1].type == "flow.completed":
        assert items[-1]["result"] == events[-1].data["output"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
known = st.sampled_from(
    [
        "flow.started", "flow.completed", "flow.failed", "flow.cancelled", "token.received",
        "token.chunk", "iteration.started", "iteration.completed", "step.started",
        "step.completed", "tool.started", "tool.completed", "tool.failed", "tool.progress",
        "tool.approval_required", "tool.approved", "tool.denied", "add_message", "warning",
        "progress.update", "trade.executed", "tool.input_delta",
    ]
)  # fmt: skip


@settings(max_examples=300)
@given(
    etype=known | st.from_regex(r"[a-z_]{1,10}(\.[a-z_]{1,10}){0,2}", fullmatch=True),
    data=st.dictionaries(
        st.sampled_from(
            ["token", "chunk", "iteration", "step", "call_id", "tool", "input", "result",
             "error", "reason", "output", "structured", "usage", "x", "delta", "first",
             "streamed", "discarded_tool_calls"]
        ),
        json_values,
        max_size=6,
    ),
    seq=st.integers(1, 2**40),
    stamp=st.floats(0, 4e9),
)  # fmt: skip
def test_any_event_makes_valid_frames(
    etype: str, data: dict[str, Any], seq: int, stamp: float
) -> None:
    event = FlowEvent(etype, data, stamp, seq, "run_1")
    frames = split_frames(agui_frames(event, IDS).decode("ascii"))
    for i, (frame_id, item) in enumerate(frames):
        assert item is not None
        validate(item)
        assert frame_id == (str(seq) if i == len(frames) - 1 else None)
    assert agui_frames(event, IDS) == agui_frames(event, IDS)  # a pure function


def test_the_mapping_of_a_run_with_a_tool_call() -> None:
    events = trio.run(run_events, default_agent(), "What is 25 * 4?", None)
    items = check_run(events)
    kinds = [item["type"] for item in items]
    assert kinds[:4] == [
        "RUN_STARTED",
        "STEP_STARTED",
        "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT",
    ]
    start = kinds.index("TOOL_CALL_START")
    assert kinds[start : start + 4] == [
        "TOOL_CALL_START",
        "TOOL_CALL_ARGS",
        "TOOL_CALL_END",
        "TOOL_CALL_RESULT",
    ]
    call = items[start]
    assert call["toolCallName"] == "calculator" and call["toolCallId"] == "toolu_scripted_1"
    assert json.loads(items[start + 1]["delta"]) == {
        "operation": "evaluate",
        "expression": "25 * 4",
    }
    assert items[start + 3]["content"] == "100"
    assert items[0] | {"timestamp": 0} == {
        "type": "RUN_STARTED",
        "threadId": "thread-1",
        "runId": "run-1",
        "metadata": {"trioflow": {"runId": events[0].run_id}},
        "timestamp": 0,
    }
    assert items[-1]["type"] == "RUN_FINISHED" and items[-1]["result"] == "25 * 4 = 100."
    assert items[-1]["usage"] == [{"inputTokens": 15, "outputTokens": 9, "totalTokens": 24}]
    assert {item["name"] for item in items if item["type"] == "CUSTOM"} == {"progress.update"}


def test_a_streamed_tool_call_starts_in_the_open_message_and_ends_at_tool_started() -> None:
    events = trio.run(run_events, default_agent(ScriptedModel(pace=1e6)), "What is 25 * 4?", None)
    items = check_run(events)
    kinds = [item["type"] for item in items]
    start, end = kinds.index("TOOL_CALL_START"), kinds.index("TOOL_CALL_END")
    message_end = kinds.index("TEXT_MESSAGE_END")
    # START and the ARGS (the input in pieces) inside the model's message; END at tool.started
    assert start < message_end < end
    assert set(kinds[start + 1 : message_end]) == {"TOOL_CALL_ARGS"}
    assert len(kinds[start + 1 : message_end]) > 1
    assert items[start]["parentMessageId"] == items[message_end]["messageId"]
    args = "".join(i["delta"] for i in items[start:message_end] if i["type"] == "TOOL_CALL_ARGS")
    assert json.loads(args) == {"operation": "evaluate", "expression": "25 * 4"}
    assert kinds[end + 1] == "TOOL_CALL_RESULT"
    assert not any(i["type"] == "CUSTOM" and i["name"] == "tool.input_delta" for i in items)


def test_streamed_calls_that_never_start_end_at_their_denial_or_the_retry() -> None:
    base = {"tool": "rm", "call_id": "c1", "iteration": 1}
    first = FlowEvent("tool.input_delta", {**base, "delta": "", "first": True}, 1.0, 1, "r")
    piece = FlowEvent("tool.input_delta", {**base, "delta": '{"a"'}, 1.0, 2, "r")
    assert [i["type"] for i in agui_events(first, IDS)] == ["TOOL_CALL_START"]
    assert agui_events(piece, IDS) == [
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": '{"a"', "timestamp": 1000}
    ]
    denied = FlowEvent(
        "tool.denied", {**base, "reason": "no", "timed_out": False, "streamed": True}, 1.0, 3, "r"
    )
    assert [i["type"] for i in agui_events(denied, IDS)] == ["TOOL_CALL_END", "CUSTOM"]
    started = FlowEvent("tool.started", {**base, "input": {"a": 1}, "streamed": True}, 1.0, 4, "r")
    assert [i["type"] for i in agui_events(started, IDS)] == ["TOOL_CALL_END"]
    retry = FlowEvent(
        "warning",
        {
            "message": "retry",
            "discarded_tokens": 0,
            "iteration": 1,
            "discarded_tool_calls": [{"call_id": "c1", "tool": "rm"}],
        },
        1.0,
        5,
        "r",
    )
    ended, custom = agui_events(retry, IDS)
    assert ended["type"] == "TOOL_CALL_END" and ended["toolCallId"] == "c1"
    assert custom["type"] == "CUSTOM" and custom["name"] == "warning"


def test_approvals_failures_and_cancellation_map_to_custom_and_run_error() -> None:
    approval = FlowEvent(
        "tool.approval_required",
        {"tool": "rm", "call_id": "c1", "iteration": 1, "input": {"path": "/"}, "timeout": None},
        1.0,
        7,
        "run_1",
    )
    (item,) = agui_events(approval, IDS)
    validate(item)
    assert item["type"] == "CUSTOM" and item["name"] == "tool.approval_required"
    interrupt = ag_ui.Interrupt.model_validate(item["value"]["interrupt"])
    assert (interrupt.id, interrupt.tool_call_id, interrupt.reason) == ("c1", "c1", "tool_approval")
    failed = FlowEvent("flow.failed", {"error": {"type": "ModelError", "message": "no"}}, 1.0, 9)
    assert [agui_events(failed, IDS)[0][k] for k in ("type", "code", "message")] == [
        "RUN_ERROR",
        "ModelError",
        "no",
    ]
    cancelled = FlowEvent("flow.cancelled", {"reason": "timeout"}, 1.0, 9)
    (item,) = agui_events(cancelled, IDS)
    assert (item["type"], item["code"]) == ("RUN_ERROR", "cancelled")
    assert agui_events(FlowEvent("add_message", {"role": "user"}, 1.0, 2), IDS) == []


def test_stream_errors_and_keepalives() -> None:
    encoding = agui_encoding(IDS)
    ((frame_id, item),) = split_frames(encoding.evicted("run_1", 41).decode("ascii"))
    assert frame_id is None and item is not None
    validate(item)
    assert (item["type"], item["code"], item["rawEvent"]["last_seq"]) == (
        "RUN_ERROR",
        "evicted",
        41,
    )
    assert encoding.keepalive is not None and encoding.keepalive.startswith(b":")
    assert split_frames(encoding.keepalive.decode("ascii")) == [(None, None)]


# -- RunAgentInput ------------------------------------------------------------------------


def user(text: str, id: str = "u") -> dict[str, Any]:
    return {"id": id, "role": "user", "content": text}


def agui_input(*messages: dict[str, Any], **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "threadId": "t-1",
        "runId": "r-1",
        "state": {},
        "messages": list(messages) or [user("What is 25 * 4?")],
        "tools": [],
        "context": [],
        "forwardedProps": {},
    }
    return body | more


def test_a_conversation_becomes_the_task_the_history_and_the_system_prompt() -> None:
    parsed = parse_run_input(
        agui_input(
            {"id": "s", "role": "system", "content": "Be brief."},
            user("What is 2 + 2?", "u1"),
            {
                "id": "a1",
                "role": "assistant",
                "content": "Let me see.",
                "toolCalls": [
                    {
                        "id": "call-1",
                        "type": "function",
                        "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'},
                    }
                ],
            },
            {"id": "t1", "role": "tool", "toolCallId": "call-1", "content": "4"},
            {"id": "a2", "role": "assistant", "content": "4."},
            {"id": "r", "role": "reasoning", "content": "hm"},
            {"id": "u2", "role": "user", "content": [{"type": "text", "text": "And 3 + 3?"}]},
            forwardedProps={"trioflow": {"max_iterations": 3, "on_disconnect": "cancel"}},
        )
    )
    assert (parsed.thread_id, parsed.run_id) == ("t-1", "r-1")
    assert parsed.request.task == "And 3 + 3?"
    assert parsed.request.system == "Be brief."
    assert parsed.request.max_iterations == 3 and parsed.request.on_disconnect == "cancel"
    assert parsed.request.metadata == {"agui_thread_id": "t-1", "agui_run_id": "r-1"}
    assert [m.to_dict() for m in parsed.history] == [
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me see."},
                {"type": "tool_use", "id": "call-1", "name": "calculator", "input": {"expression": "2+2"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call-1", "content": "4", "is_error": False}
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "4."}]},
    ]  # fmt: skip
    # What ag_ui.core makes of it agrees it is a RunAgentInput.
    ag_ui.RunAgentInput.model_validate(agui_input(user("hi")))


BAD_INPUTS: list[tuple[object, str]] = [
    ([], "object"),
    ({**agui_input(), "threadId": 3}, "threadId"),
    ({k: v for k, v in agui_input().items() if k != "runId"}, "runId"),
    (agui_input(user("hi"), {"id": "a", "role": "assistant", "content": "x"}), "last"),
    (agui_input(user("   ")), "empty"),
    (agui_input({"id": "x", "role": "robot", "content": "hi"}, user("hi")), "role"),
    (agui_input({"role": "user", "content": "hi"}), "id"),
    (agui_input({"id": "u", "role": "user", "content": [{"type": "binary"}]}), "text part"),
    ({**agui_input(), "messages": "hi"}, "messages"),
    ({**agui_input(), "surprise": 1}, "surprise"),
    ({**agui_input(), "tools": {}}, "tools"),
    ({**agui_input(), "resume": [{"interruptId": "c", "status": "resolved"}]}, "resume"),
    ({**agui_input(), "forwardedProps": {"trioflow": {"task": "x"}}}, "task"),
    ({**agui_input(), "forwardedProps": {"trioflow": {"timeout": -1}}}, "timeout"),
    ({**agui_input(), "forwardedProps": {"trioflow": {"metadata": {"thread_id": "x"}}}}, "thread_id"),
    (
        agui_input(
            {
                "id": "a",
                "role": "assistant",
                "toolCalls": [{"id": "c", "function": {"name": "f", "arguments": "[1"}}],
            },
            user("hi"),
        ),
        "arguments",
    ),
]  # fmt: skip


async def test_a_bad_run_agent_input_is_a_400_naming_the_member(
    start_web_server: StartWebServer, server_log: pytest.LogCaptureFixture
) -> None:
    server = await start_web_server()
    async with http_client(server) as http:
        for body, words in BAD_INPUTS:
            response = await http.post("/agui", json=body)
            error = assert_error(response, 400, "invalid_request")
            assert words in str(error["message"]), (body, error)
        response = await http.post(
            "/agui", content=b"{", headers={"content-type": "application/json"}
        )
        assert_error(response, 400, "invalid_json")
        response = await http.post("/agui", content=b"hi", headers={"content-type": "text/plain"})
        assert_error(response, 415, "unsupported_media_type")
        assert_error(await http.get("/runs/run_nope/events.agui"), 404, "run_not_found")
    assert not server.executor.runs
    assert_no_traceback(server_log)


# -- over HTTP -----------------------------------------------------------------------------


async def test_post_agui_answers_with_the_runs_stream_and_feeds_the_history(
    start_web_server: StartWebServer,
) -> None:
    models: list[ScriptedModel] = []

    def make(request: Any) -> Agent:
        models.append(ScriptedModel())
        return default_agent(models[-1])

    server = await start_web_server(agent=make)
    body = agui_input(
        user("Hello", "u1"),
        {"id": "a1", "role": "assistant", "content": "Hi."},
        user("What is 25 * 4?", "u2"),
        forwardedProps={"trioflow": {"metadata": {"app": "x"}}},
    )
    with trio.fail_after(10):
        async with http_client(server) as http:
            response = await http.post("/agui", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    frames = split_frames(response.text)
    items = [item for _, item in frames if item is not None]
    verify = Verifier()
    for item in items:
        validate(item)
        verify(item)
    assert (items[0]["threadId"], items[0]["runId"]) == ("t-1", "r-1")
    assert (items[-1]["threadId"], items[-1]["runId"]) == ("t-1", "r-1")
    (run,) = server.executor.runs.values()
    assert run.metadata == {
        "app": "x", "agui_thread_id": "t-1", "agui_run_id": "r-1", "source": "agui"
    }  # fmt: skip
    assert [m.text for m in models[0].calls[0]] == ["Hello", "Hi.", "What is 25 * 4?"]
    assert not server.hub.threads.list()  # the client's conversation, not a server thread


async def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=lambda request: default_agent())
    run_id = await start_run(server)
    await server.executor.get_run(run_id).wait()
    path = f"/runs/{run_id}/events.agui"
    async with http_client(server) as http:
        whole = (await http.get(path)).text
        frames = split_frames(whole)
        ids = [frame_id for frame_id, _ in frames if frame_id is not None]
        blocks = whole.split("\n\n")
        for i, frame_id in enumerate(ids[:-1]):
            header = (await http.get(path, headers={"Last-Event-ID": frame_id})).text
            query = (await http.get(f"{path}?after={frame_id}")).text
            assert header == query
            cut = next(j for j, b in enumerate(blocks) if b.startswith(f"id: {frame_id}\n")) + 1
            assert "\n\n".join(blocks[:cut]) + "\n\n" + header == whole, i
        last = await http.get(path, headers={"Last-Event-ID": ids[-1]})
        assert last.status_code == 204
    items = [item for _, item in frames if item is not None]
    assert items[0]["runId"] == items[0]["threadId"] == run_id  # a run not started over AG-UI


async def test_history_expired_is_a_run_error_with_its_code(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(history=8, agent=lambda request: default_agent())
    run_id = await start_run(server)
    await server.executor.get_run(run_id).wait()
    async with http_client(server) as http:
        response = await http.get(f"/runs/{run_id}/events.agui?after=1")
    ((frame_id, item),) = split_frames(response.text)
    assert frame_id is None and item is not None
    validate(item)
    assert (item["type"], item["code"]) == ("RUN_ERROR", "history_expired")


async def test_a_client_leaving_cancels_a_run_that_asked_for_it(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=lambda request: default_agent(ScriptedModel(pace=20)))
    body = json.dumps(agui_input(forwardedProps={"trioflow": {"on_disconnect": "cancel"}}))
    host, port = server.url.removeprefix("http://").split(":")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        head = (
            f"POST /agui HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        await stream.send_all(head.encode() + body.encode())
        seen = b""
        while b"TEXT_MESSAGE_CONTENT" not in seen:
            seen += await stream.receive_some()
        await stream.aclose()  # the client leaves mid-run
        (run,) = server.executor.runs.values()
        await run.wait()
    assert run.status == "cancelled"


async def test_an_approval_is_a_custom_interrupt_decided_over_http(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=lambda request: default_agent(approval=lambda call: True))
    items: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with (
            http_client(server) as http,
            http.stream("POST", "/agui", json=agui_input()) as response,
        ):
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                items.append(validate(json.loads(line[6:])).model_dump(by_alias=True))
                if items[-1]["type"] == "CUSTOM" and items[-1]["name"] == "tool.approval_required":
                    value = items[-1]["value"]
                    decided = await http.post(value["decide"], json={"decision": "approve"})
                    assert decided.status_code == 200, decided.text
    verify = Verifier()
    for item in items:
        verify(item)
    kinds = [(item["type"], item.get("name")) for item in items]
    asked = kinds.index(("CUSTOM", "tool.approval_required"))
    assert kinds.index(("CUSTOM", "tool.approved")) > asked
    assert kinds.index(("TOOL_CALL_START", None)) > asked
    interrupt = items[asked]["value"]["interrupt"]
    assert interrupt["toolCallId"] == items[asked]["value"]["call_id"] == interrupt["id"]
    assert items[0]["metadata"]["trioflow"]["runId"] in items[asked]["value"]["decide"]
    assert items[-1]["type"] == "RUN_FINISHED" and items[-1]["result"] == "25 * 4 = 100."


# -- the real client: @ag-ui/client ---------------------------------------------------------


@pytest.mark.parametrize("pace", [0, 1000])  # paced: the tool's input streams
async def test_http_agent_drives_a_complete_run_and_the_next_turn(
    js_clients: Path, start_web_server: StartWebServer, pace: float
) -> None:
    models: list[ScriptedModel] = []

    def make(request: Any) -> Agent:
        # The first run: the calculator; the second: an answer that needs no tool.
        script = None if not models else [Turn("You asked 25 * 4.")]
        models.append(ScriptedModel(script, pace=pace))
        return default_agent(models[-1])

    server = await start_web_server(agent=make)
    with trio.fail_after(60):
        done = await run_node(
            js_clients, "agui_run.mjs", server.url, "What is 25 * 4?", "What did I ask?"
        )
    out = json.loads(done.stdout)
    first, second = out["runs"]
    assert first["error"] is None and second["error"] is None
    kinds = [event["type"] for event in first["events"]]
    assert kinds[0] == "RUN_STARTED" and kinds[-1] == "RUN_FINISHED"
    # streamed: the call starts inside the assistant's message, its arguments in pieces
    assert (kinds.index("TOOL_CALL_START") < kinds.index("TEXT_MESSAGE_END")) == bool(pace)
    assert (kinds.count("TOOL_CALL_ARGS") > 1) == bool(pace)
    assert (first["events"][0]["threadId"], first["events"][0]["runId"]) == (
        "thread-agui-test",
        "run-agui-test-1",
    )
    assert first["result"] == "25 * 4 = 100."
    messages = out["messages"]
    roles = ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert [m["role"] for m in messages] == roles
    (call,) = messages[1]["toolCalls"]
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {
        "operation": "evaluate",
        "expression": "25 * 4",
    }
    assert messages[1]["content"] == "Let me calculate that."
    assert (messages[2]["toolCallId"], messages[2]["content"]) == (call["id"], "100")
    assert messages[3]["content"] == "25 * 4 = 100."
    assert [m["id"] for m in first["newMessages"]] == [m["id"] for m in messages[1:4]]
    # The next turn: the client sent the conversation, in its own shape; the model saw it all.
    assert second["result"] == messages[5]["content"] == "You asked 25 * 4."
    assert [m.to_dict() for m in models[1].calls[0]] == [
        {"role": "user", "content": [{"type": "text", "text": "What is 25 * 4?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me calculate that."},
                {
                    "type": "tool_use",
                    "id": call["id"],
                    "name": "calculator",
                    "input": {"operation": "evaluate", "expression": "25 * 4"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": call["id"],
                    "content": "100",
                    "is_error": False,
                }
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "25 * 4 = 100."}]},
        {"role": "user", "content": [{"type": "text", "text": "What did I ask?"}]},
    ]
    assert [run.status for run in server.executor.runs.values()] == ["completed", "completed"]


async def test_a_dropped_connection_resumes_with_the_clients_parser(
    js_clients: Path, start_web_server: StartWebServer
) -> None:
    server = await start_web_server(agent=lambda request: default_agent(ScriptedModel(pace=10)))
    run_id = await start_run(server)
    path = f"/runs/{run_id}/events.agui"
    with trio.fail_after(60):
        done = await run_node(js_clients, "agui_resume.mjs", server.url, path, "4")
        run = server.executor.get_run(run_id)
        await run.wait()
        async with http_client(server) as http:
            whole = [item for _, item in split_frames((await http.get(path)).text) if item]
    out = json.loads(done.stdout)
    assert out["status"] == 200
    assert 0 < len(out["first"]) < len(whole)
    assert out["first"] + out["resumed"] == whole  # no gap, no duplicate
    assert out["joined"] == whole  # and the client's verifier took the joined stream
    assert whole[-1]["type"] == "RUN_FINISHED"
    assert any(item["type"] == "TOOL_CALL_RESULT" for item in out["resumed"])
    assert math.isfinite(float(out["lastId"]))
