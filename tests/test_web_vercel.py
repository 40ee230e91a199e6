"""The Vercel AI SDK UI message stream (:mod:`trioflow.web._vercel`): the encoder over generated
runs, checked here and by the real ``ai`` package's schema and reader in Node; the chat endpoints
``useChat``'s transport calls, driven by the real ``AbstractChat`` + ``DefaultChatTransport``
against a real server on 127.0.0.1; resume with ``Last-Event-ID``; bad bodies."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import assert_error, assert_no_traceback, http_client, run_node, start_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioflow import Agent, FlowEvent, ScriptedModel, Turn
from trioflow.builtin import calculator
from trioflow.events import EventType
from trioflow.models import Message, ToolResultBlock, ToolSpec
from trioflow.web._vercel import VERCEL, data_part_type, ui_message_chunks

if TYPE_CHECKING:
    from conftest import StartWebServer

STREAM = "x-vercel-ai-ui-message-stream"


# -- reading a UI message stream --------------------------------------------------------


def groups(body: str) -> list[tuple[int | None, list[Any]]]:
    """The body's groups: each run of ``data:`` frames up to (and with) the one carrying ``id:``.

    ``[DONE]`` is the string ``"[DONE]"``; trailing frames without an id form a last group (None).
    """
    out: list[tuple[int | None, list[Any]]] = []
    pending: list[Any] = []
    for block in body.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        seq: int | None = None
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "id":
                seq = int(value)
            elif field == "data":
                pending.append(value if value == "[DONE]" else json.loads(value))
        if seq is not None:
            out.append((seq, pending))
            pending = []
    if pending:
        out.append((None, pending))
    return out


def chunks_of(body: str) -> list[Any]:
    return [c for _, cs in groups(body) for c in cs]


def check_order(chunks: Sequence[Any]) -> None:
    """The id and order rules ``readUIMessageStream`` relies on."""
    open_text: set[str] = set()
    tools: dict[str, str] = {}  # call id -> "input" | "available" | "done"
    assert chunks, "no chunks"
    assert chunks[0]["type"] == "start"
    for i, chunk in enumerate(chunks):
        if chunk == "[DONE]":
            assert i == len(chunks) - 1, "[DONE] is the last frame"
            continue
        kind = chunk["type"]
        if kind == "text-start":
            assert chunk["id"] not in open_text, chunk
            open_text.add(chunk["id"])
        elif kind in ("text-delta", "text-end"):
            assert chunk["id"] in open_text, f"{kind} before text-start: {chunk}"
            if kind == "text-end":
                open_text.discard(chunk["id"])
        elif kind == "finish-step":
            open_text.clear()
        elif kind == "tool-input-start":
            assert tools.get(chunk["toolCallId"]) in (None, "available"), chunk
            tools[chunk["toolCallId"]] = "input"
        elif kind == "tool-input-delta":
            assert tools.get(chunk["toolCallId"]) == "input", chunk
        elif kind == "tool-input-available":
            # again after an approval, for a call whose input streamed (no second start)
            assert tools.get(chunk["toolCallId"]) in ("input", "available"), chunk
            tools[chunk["toolCallId"]] = "available"
        elif kind == "tool-input-error":
            assert tools.get(chunk["toolCallId"]) == "input", chunk
            tools[chunk["toolCallId"]] = "done"
        elif kind in ("tool-approval-request", "tool-output-denied"):
            assert tools.get(chunk["toolCallId"]) == "available", chunk
        elif kind in ("tool-output-available", "tool-output-error"):
            assert tools.get(chunk["toolCallId"]) == "available", chunk
            tools[chunk["toolCallId"]] = "done"
        elif kind == "finish":
            assert chunks[i + 1 :] == ["[DONE]"], "finish, then [DONE], ends the stream"
        elif kind.startswith("data-"):
            assert re.fullmatch(r"data-[A-Za-z0-9_-]+", kind), kind


# -- generated runs ----------------------------------------------------------------------

_texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6)
_custom_types = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Z", "C")), min_size=1, max_size=12
).filter(lambda t: t not in set(EventType))
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=6,
)


VOIDED = "voided by a model retry: the turn streams again"
ENDINGS = ("completed", "failed", "model-failed", "cancelled by client", "timeout")


@st.composite
def generated_run(draw: st.DrawFn, ending: str) -> tuple[list[FlowEvent], dict[str, Any]]:
    """A run's events in the agent's order, and what its UI message must end up holding."""
    run_id = "run_" + draw(st.text(alphabet="0123456789abcdef", min_size=4, max_size=8))
    events: list[tuple[str, dict[str, Any]]] = []
    texts: list[str] = []  # the text parts, in order
    tools: dict[str, tuple[str, Any]] = {}  # call id -> (state, output)

    def add(type: str, **data: Any) -> None:
        events.append((type, data))

    def extras() -> None:
        for custom in draw(st.lists(st.tuples(_custom_types, _json_values), max_size=2)):
            add(custom[0], value=custom[1])
        if draw(st.booleans()):
            add("token.chunk", chunk=draw(_texts), tokens=1)  # no iteration: a part of its own
            texts.append(events[-1][1]["chunk"])

    add("flow.started", task="t", metadata=draw(st.sampled_from([{}, {"thread_id": "thread_1"}])))
    iterations = draw(st.integers(1, 3))
    mid_run = ending in ("model-failed", "timeout") and draw(st.booleans())

    def stream_input(call_id: str, name: str, given: Any, n: int) -> None:
        # a model streaming the call's input: a first empty delta, then its JSON in pieces
        add("tool.input_delta", tool=name, call_id=call_id, iteration=n, delta="", first=True)
        text = json.dumps(given)
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=3)))
        for a, b in itertools.pairwise([0, *cuts, len(text)]):
            if text[a:b]:
                add("tool.input_delta", tool=name, call_id=call_id, iteration=n, delta=text[a:b])

    for n in range(1, iterations + 1):
        last = n == iterations
        calls = 0 if last else draw(st.integers(0, 2))
        planned = [
            (
                f"toolu_{n}_{c}",
                draw(st.sampled_from(["calculator", "search", "a.b"])),
                draw(st.dictionaries(_texts, _json_values, max_size=3)),
                draw(st.sampled_from(["ok", "fail", "deny", "approve"])),
                draw(st.booleans()),  # its input streams during the model step
            )
            for c in range(calls)
        ]
        add("iteration.started", iteration=n, max_iterations=5)
        add("step.started", step="model", iteration=n, model="scripted")
        attempts = draw(st.integers(1, 2))
        texts.append("")
        for attempt in range(attempts):
            tokens = draw(st.lists(_texts, max_size=4))
            for token in tokens:
                add("token.received", token=token, iteration=n)
            texts[-1] += "".join(tokens)
            if attempt < attempts - 1:
                voided = []
                if draw(st.booleans()):  # the failed attempt had streamed a call's input
                    voided = [{"call_id": f"toolu_{n}_v{attempt}", "tool": "search"}]
                    stream_input(voided[0]["call_id"], "search", {"q": "x"}, n)
                    tools[voided[0]["call_id"]] = ("output-error", VOIDED)
                if tokens:  # the voided text stays a part of its own; the retry starts another
                    texts.append("")
                more = {"discarded_tool_calls": voided} if voided else {}
                add("warning", message="retry", attempt=attempt + 1, discarded_tokens=len(tokens),
                    iteration=n, delay=0.5, kind="overloaded", restarted=True, **more)  # fmt: skip
        if last and mid_run:
            if ending == "model-failed":
                if draw(st.booleans()):  # it failed in the middle of a call's input
                    stream_input(f"toolu_{n}_x", "search", {"q": "half"}, n)
                    tools[f"toolu_{n}_x"] = ("input-streaming", None)
                add("iteration.failed", iteration=n, error={"type": "ModelError", "message": "x"})
            break
        for call_id, name, given_input, _, streamed in planned:
            if streamed:
                stream_input(call_id, name, given_input, n)
        add("step.completed", step="model", iteration=n, duration=0.1)
        add("add_message", role="assistant", content="", index=n)
        extras()
        if calls:
            add("step.started", step="tools", iteration=n, calls=calls)
            per_call: list[list[tuple[str, dict[str, Any]]]] = []
            for call_id, name, given_input, kind, streamed in planned:
                base = {"tool": name, "call_id": call_id, "iteration": n}
                flag = {"streamed": True} if streamed else {}
                mine: list[tuple[str, dict[str, Any]]] = []
                if kind in ("deny", "approve"):
                    mine.append(
                        (
                            "tool.approval_required",
                            {**base, "input": given_input, "timeout": None, **flag},
                        )
                    )
                if kind == "deny":
                    mine.append(
                        ("tool.denied", {**base, "reason": "no", "timed_out": False, **flag})
                    )
                    tools[call_id] = ("output-denied", None)
                else:
                    if kind == "approve":
                        mine.append(
                            ("tool.approved", {**base, "input": given_input, "edited": False})
                        )
                    mine.append(("tool.started", {**base, "input": given_input, **flag}))
                    mine.append(("tool.progress", {**base, "done": 1, "total": 2, "message": None}))
                    if kind == "fail":
                        error = {"type": "ToolError", "message": "boom"}
                        mine.append(("tool.failed", {**base, "error": error, "duration": 0.1}))
                        tools[call_id] = ("output-error", "ToolError: boom")
                    else:
                        result = draw(_json_values)
                        mine.append(("tool.completed", {**base, "result": result, "duration": 0.1}))
                        tools[call_id] = ("output-available", result)
                per_call.append(mine)
            order = draw(st.permutations([i for i, evs in enumerate(per_call) for _ in evs]))
            for i in order:
                events.append(per_call[i].pop(0))
            add("step.completed", step="tools", iteration=n, duration=0.1)
        add("iteration.completed", iteration=n, usage={}, stop_reason="end_turn", tool_calls=calls)
        add("progress.update", percent=50.0, iteration=n)
    if ending == "completed":
        add("flow.completed", output="x", iterations=iterations, usage={"input_tokens": 1},
            stop_reason="end_turn", duration=1.0, percent=100.0)  # fmt: skip
    elif ending in ("failed", "model-failed"):
        add("flow.failed", error={"type": "ModelError", "message": "x"}, duration=1.0,
            iterations=iterations, percent=50.0)  # fmt: skip
    else:
        add("flow.cancelled", reason=ending, duration=1.0, iterations=iterations, percent=50.0)
    built = [at(seq, type, data, run_id) for seq, (type, data) in enumerate(events, start=1)]
    return built, {"texts": texts, "tools": tools, "ending": ending}


def at(seq: int, type: str, data: dict[str, Any], run_id: str | None = None) -> FlowEvent:
    return dataclasses.replace(FlowEvent.create(type, data, run_id=run_id), seq=seq)


def body_of(events: Sequence[FlowEvent]) -> str:
    return b"".join(VERCEL.event(e) for e in events).decode("ascii")


@pytest.fixture(scope="module")
def generated() -> list[tuple[list[FlowEvent], dict[str, Any]]]:
    """Generated runs of every ending, each checked here (ids, order, purity); all then go to
    Node in one call."""
    out: list[tuple[list[FlowEvent], dict[str, Any]]] = []

    def check(run: tuple[list[FlowEvent], dict[str, Any]]) -> None:
        events, _ = run
        body = body_of(events)
        assert body.isascii()
        parsed = groups(body)
        # one group per event, each ending with the frame that carries its seq
        assert [seq for seq, _ in parsed] == [e.seq for e in events]
        for (_, chunks), event in zip(parsed, events, strict=True):
            expected = ui_message_chunks(event) + (["[DONE]"] if event.is_terminal() else [])
            assert json.loads(json.dumps(chunks)) == json.loads(json.dumps(expected, default=dict))
        check_order(chunks_of(body))
        # a pure function: encoding again gives the same bytes
        assert body_of(events) == body
        out.append(run)

    for ending in ENDINGS:

        @settings(
            max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(generated_run(ending))
        def collect(run: tuple[list[FlowEvent], dict[str, Any]]) -> None:
            check(run)

        collect()
    return out


def test_generated_runs_keep_the_id_and_order_rules(
    generated: list[tuple[list[FlowEvent], dict[str, Any]]],
) -> None:
    assert len(generated) >= 100
    assert {expected["ending"] for _, expected in generated} == set(ENDINGS)


def test_a_resume_after_any_event_has_no_gap_and_no_duplicate(
    generated: list[tuple[list[FlowEvent], dict[str, Any]]],
) -> None:
    for events, _ in generated[:30]:
        whole = body_of(events)
        for k in range(len(events) + 1):
            # what a client got up to Last-Event-ID k, then what a resume after k sends
            assert body_of(events[:k]) + body_of(events[k:]) == whole


def test_the_real_sdk_reads_every_generated_run(
    generated: list[tuple[list[FlowEvent], dict[str, Any]]], js_clients: Path, tmp_path: Path
) -> None:
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps([body_of(events) for events, _ in generated]))
    done = subprocess.run(
        ["node", str(js_clients / "vercel_chat.mjs"), "validate", str(bodies)],
        cwd=js_clients,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout)
    assert len(results) == len(generated)
    for result, (events, expected) in zip(results, generated, strict=True):
        assert result["invalid"] == [], result["invalid"]
        assert result["done"]
        error_texts = {
            c["errorText"]
            for c in chunks_of(body_of(events))
            if c != "[DONE]" and c["type"] == "error"
        }
        assert {e["message"] for e in result["errors"]} <= error_texts, result["errors"]
        assert all(e["name"] == "Error" for e in result["errors"]), result["errors"]
        assert len(result["errors"]) == len(error_texts)
        message = result["message"]
        assert message["id"] == events[0].run_id
        parts = message["parts"]
        assert [p["text"] for p in parts if p["type"] == "text"] == expected["texts"]
        tool_parts = {p["toolCallId"]: p for p in parts if p["type"].startswith("tool-")}
        assert set(tool_parts) == set(expected["tools"])
        for call_id, (state, output) in expected["tools"].items():
            part = tool_parts[call_id]
            assert part["state"] == state
            if state == "output-available":
                assert part["output"] == output
            elif state == "output-error":
                assert part["errorText"] == output
        steps = sum(1 for e in events if e.type == "iteration.started")
        assert sum(1 for p in parts if p["type"] == "step-start") == steps
        if expected["ending"] == "completed":
            assert message["metadata"]["status"] == "completed"


def test_the_mapping_of_single_events() -> None:
    assert data_part_type("trade.executed") == "data-trade-executed"
    assert data_part_type("..") == "data-event"
    assert data_part_type("ünïcode/ok_1") == "data-n-code-ok_1"
    started = at(1, "flow.started", {"task": "t"}, "run_1")
    assert ui_message_chunks(started) == [
        {"type": "start", "messageId": "run_1", "messageMetadata": {"runId": "run_1"}}
    ]
    assert VERCEL.event(started).startswith(b"id: 1\ndata: {")
    silent = at(2, "add_message", {"role": "user", "index": 0})
    assert VERCEL.event(silent) == b"id: 2\n\n"
    done = at(3, "flow.completed", {"output": "x", "stop_reason": "max_tokens"})
    frame = VERCEL.event(done)
    assert frame.endswith(b"id: 3\ndata: [DONE]\n\n")
    assert json.loads(frame.split(b"\n\n")[0][len(b"data: ") :])["finishReason"] == "length"
    # a client that fell behind: an error chunk that says where to resume, then [DONE]
    ((seq, (error, end)),) = groups(VERCEL.evicted("run_1", 7).decode())
    assert seq is None  # no id: it is not an event
    assert (error["type"], error["code"], error["last_seq"], end) == (
        "error",
        "evicted",
        7,
        "[DONE]",
    )
    assert "Last-Event-ID: 7" in error["errorText"]


def test_streamed_tool_input_maps_to_start_deltas_then_available() -> None:
    base = {"tool": "calc", "call_id": "c1", "iteration": 1}
    first = at(1, "tool.input_delta", {**base, "delta": "", "first": True})
    assert ui_message_chunks(first) == [
        {
            "type": "tool-input-start",
            "toolCallId": "c1",
            "toolName": "calc",
            "providerExecuted": True,
        }
    ]
    piece = at(2, "tool.input_delta", {**base, "delta": '{"x"'})
    assert ui_message_chunks(piece) == [
        {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"x"'}
    ]
    assert ui_message_chunks(at(3, "tool.input_delta", {**base, "delta": ""})) == []
    started = at(4, "tool.started", {**base, "input": {"x": 1}, "streamed": True})
    assert ui_message_chunks(started) == [
        {
            "type": "tool-input-available",
            "toolCallId": "c1",
            "toolName": "calc",
            "providerExecuted": True,
            "input": {"x": 1},
        }
    ]
    asked = at(5, "tool.approval_required", {**base, "input": {"x": 1}, "streamed": True})
    assert [c["type"] for c in ui_message_chunks(asked)] == [
        "tool-input-available",
        "tool-approval-request",
    ]
    retry = at(
        6,
        "warning",
        {"discarded_tokens": 2, "iteration": 1, "discarded_tool_calls": [base]},
    )
    assert [c["type"] for c in ui_message_chunks(retry)] == [
        "text-end",
        "tool-input-error",
        "data-warning",
        "text-start",
    ]


# -- the server --------------------------------------------------------------------------


def remembering(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Turn:
    """A model that calls the calculator on a chat's first message and quotes it on the next."""
    results = [b for b in messages[-1].content if isinstance(b, ToolResultBlock)]
    if results:
        return Turn(f"The result is {results[0].content}.")
    asked = [m.text for m in messages if m.role == "user" and m.text]
    if len(asked) == 1:
        return Turn(
            "Let me calculate that.",
            tool_calls=[("calculator", {"operation": "evaluate", "expression": "25 * 4"})],
        )
    return Turn(f"Before this you asked: {asked[-2]}")


def chat_agent(pace: float = 0) -> Any:
    def make(request: Any) -> Agent:
        return Agent(ScriptedModel(itertools.repeat(remembering), pace=pace), tools=[calculator])

    return make


def chat_body(text: str, chat_id: str = "chat-1", **more: Any) -> dict[str, Any]:
    message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}
    return {
        "id": chat_id,
        "messages": [message],
        "trigger": "submit-message",
        "messageId": None,
        **more,
    }


async def test_post_chat_answers_with_the_runs_ui_message_stream(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=chat_agent())
    async with http_client(server) as http:
        response = await http.post("/vercel/chat", json=chat_body("What is 25 * 4?"))
    assert response.status_code == 200, response.text
    assert response.headers[STREAM] == "v1"
    assert response.headers["content-type"].startswith("text/event-stream")
    run_id = response.headers["x-trioflow-run-id"]
    chunks = chunks_of(response.text)
    check_order(chunks)
    assert chunks[0] == {
        "type": "start",
        "messageId": run_id,
        "messageMetadata": {"runId": run_id, "threadId": server.hub.threads.list()[0].thread_id},
    }
    text = "".join(c["delta"] for c in chunks if c != "[DONE]" and c["type"] == "text-delta")
    assert text == "Let me calculate that.The result is 100."
    (output,) = [c for c in chunks if c != "[DONE]" and c["type"] == "tool-output-available"]
    assert output["output"] == 100 or output["output"] == "100" or "100" in json.dumps(output)
    assert chunks[-2]["type"] == "finish" and chunks[-1] == "[DONE]"


async def test_the_same_run_as_events_vercel_resumes_at_every_seq(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server()
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    await run.wait()
    path = f"/runs/{run_id}/events.vercel"
    async with http_client(server) as http:
        whole = (await http.get(path)).text
        assert [seq for seq, _ in groups(whole)] == list(range(1, run.last_seq + 1))
        for k in range(1, run.last_seq):
            rest = await http.get(path, headers={"Last-Event-ID": str(k)})
            assert rest.status_code == 200
            sent = [g for g in groups(whole) if g[0] is not None and g[0] <= k]
            assert groups(rest.text) == [g for g in groups(whole) if g[0] is not None and g[0] > k]
            assert sent and groups(whole) == sent + groups(rest.text)
        after = await http.get(f"{path}?after={run.last_seq}")
        assert after.status_code == 204
        missing = await http.get("/runs/run_nope/events.vercel")
    assert_error(missing, 404, "run_not_found")


async def test_history_expired_is_an_error_chunk(start_web_server: StartWebServer) -> None:
    server = await start_web_server(history=8)
    run_id = await start_run(server)
    await server.executor.get_run(run_id).wait()
    async with http_client(server) as http:
        response = await http.get(f"/runs/{run_id}/events.vercel", headers={"Last-Event-ID": "1"})
    assert response.status_code == 200
    (error, done) = chunks_of(response.text)
    assert error["type"] == "error" and error["code"] == "history_expired"
    assert isinstance(error["errorText"], str) and done == "[DONE]"


BAD_BODIES: list[tuple[Any, str]] = [
    ([], "JSON object"),
    ({"messages": []}, "'id'"),
    ({"id": "", "messages": []}, "'id'"),
    ({"id": "x" * 201, "messages": []}, "'id'"),
    ({"id": "a\nb", "messages": []}, "'id'"),
    ({"id": "c", "messages": []}, "'messages'"),
    ({"id": "c", "messages": "hi"}, "'messages'"),
    ({"id": "c", "messages": [1]}, "UI message"),
    ({"id": "c", "messages": [{"role": "assistant", "parts": []}]}, "role 'user'"),
    ({"id": "c", "messages": [{"role": "user"}]}, "'parts'"),
    ({"id": "c", "messages": [{"role": "user", "parts": [3]}]}, "part 0"),
    ({"id": "c", "messages": [{"role": "user", "parts": [{"type": "text"}]}]}, "part 0"),
    (
        {"id": "c", "messages": [{"role": "user", "parts": [{"type": "file", "url": "x"}]}]},
        "no text",
    ),
    (
        {"id": "c", "messages": [{"role": "user", "parts": [{"type": "text", "text": " "}]}]},
        "no text",
    ),
    ({**chat_body("hi"), "trigger": "regenerate-message"}, "'trigger'"),
    ({**chat_body("hi"), "messageId": 5}, "'messageId'"),
    ({**chat_body("hi"), "temperature": "hot"}, "'temperature'"),
    ({**chat_body("hi"), "colour": "red"}, "'colour'"),
]


@pytest.mark.parametrize(("body", "says"), BAD_BODIES)
async def test_bad_chat_bodies_are_400_json_errors(
    start_web_server: StartWebServer, server_log: pytest.LogCaptureFixture, body: Any, says: str
) -> None:
    server = await start_web_server()
    async with http_client(server) as http:
        response = await http.post("/vercel/chat", json=body)
    error = assert_error(response, 400, "invalid_request")
    assert says in str(error["message"])
    assert_no_traceback(server_log)
    assert not server.executor.runs


async def test_chat_errors_beyond_the_body(
    start_web_server: StartWebServer, server_log: pytest.LogCaptureFixture
) -> None:
    server = await start_web_server(token="s3cret", agent=chat_agent(pace=20))
    auth = {"Authorization": "Bearer s3cret"}
    async with http_client(server) as http:
        assert_error(await http.post("/vercel/chat", json=chat_body("hi")), 401, "unauthorized")
        response = await http.post(
            "/vercel/chat", content=b"{", headers={**auth, "content-type": "application/json"}
        )
        assert_error(response, 400, "invalid_json")
        response = await http.post("/vercel/chat", content=b"hi", headers=auth)
        assert_error(response, 415, "unsupported_media_type")
        # an unknown chat has no stream to resume: 204, as the transport expects
        assert (await http.get("/vercel/chat/nope/stream", headers=auth)).status_code == 204
        assert_error(await http.get("/vercel/chat/nope/stream"), 401, "unauthorized")
        async with http.stream(
            "POST", "/vercel/chat", json=chat_body("What is 2 + 2?"), headers=auth
        ) as first:
            assert first.status_code == 200
            busy = await http.post("/vercel/chat", json=chat_body("again"), headers=auth)
            assert_error(busy, 409, "thread_busy")
            await first.aread()
    assert_no_traceback(server_log)


# -- the real client ---------------------------------------------------------------------


async def node_json(js_clients: Path, *args: str) -> Any:
    with trio.fail_after(60):
        done = await run_node(js_clients, "vercel_chat.mjs", *args)
    return json.loads(done.stdout)


def assistant_parts(message: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    parts = message["parts"]
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    return text, [p for p in parts if p["type"] == "tool-calculator"]


@pytest.mark.parametrize("pace", [0, 1000])  # paced: the tool's input streams
async def test_use_chat_drives_a_conversation_with_tools(
    start_web_server: StartWebServer,
    js_clients: Path,
    server_log: pytest.LogCaptureFixture,
    pace: float,
) -> None:
    server = await start_web_server(agent=chat_agent(pace))
    api = f"{server.url}/vercel/chat"
    chat_id = f"chat-a{int(pace)}"
    out = await node_json(
        js_clients, "chat", api, chat_id, "What is 25 * 4?", "And what did I ask?"
    )
    assert out["status"] == "ready" and out["error"] is None and out["errors"] == []
    user1, first, user2, second = out["messages"]
    assert (user1["role"], user2["role"], first["role"], second["role"]) == (
        "user",
        "user",
        "assistant",
        "assistant",
    )
    text, (tool,) = assistant_parts(first)
    assert text == "Let me calculate that.The result is 100."
    assert tool["state"] == "output-available"
    assert tool["input"] == {"operation": "evaluate", "expression": "25 * 4"}
    assert "100" in json.dumps(tool["output"])
    assert tool["providerExecuted"] is True
    assert [p["type"] for p in first["parts"]].count("step-start") == 2
    # the second turn is a run on the same thread: the model saw the first
    text2, tools2 = assistant_parts(second)
    assert text2 == "Before this you asked: What is 25 * 4?" and tools2 == []
    assert first["metadata"]["status"] == second["metadata"]["status"] == "completed"
    assert first["metadata"]["threadId"] == second["metadata"]["threadId"]
    assert out["finishes"] == [{"finishReason": "stop", "isError": False, "isAbort": False}] * 2
    (thread,) = server.hub.threads.list()
    assert thread.metadata == {"chat_id": chat_id} and len(thread.runs) == 2
    assert first["id"] == thread.runs[0]
    assert_no_traceback(server_log)


async def test_use_chat_resumes_after_a_dropped_connection(
    start_web_server: StartWebServer, js_clients: Path, server_log: pytest.LogCaptureFixture
) -> None:
    server = await start_web_server(agent=chat_agent(pace=10))
    api = f"{server.url}/vercel/chat"
    out = await node_json(js_clients, "drop", api, "chat-b", "What is 25 * 4?", "3")
    assert out["afterDrop"]["status"] == "error"  # the connection broke mid-answer
    assert out["status"] == "ready" and out["error"] is None
    _, answer = out["messages"]
    text, (tool,) = assistant_parts(answer)
    # the resume replays the run into a fresh message: nothing twice, nothing missing
    assert text == "Let me calculate that.The result is 100."
    assert tool["state"] == "output-available"
    assert answer["metadata"]["status"] == "completed"
    # once the run is over there is nothing to resume
    again = await node_json(js_clients, "resume", api, "chat-b")
    assert again["messages"] == [] and again["status"] == "ready"
    assert_no_traceback(server_log)


async def test_a_reader_resumes_with_last_event_id_mid_text(
    start_web_server: StartWebServer, js_clients: Path
) -> None:
    server = await start_web_server(agent=chat_agent(pace=6))
    async with (
        http_client(server) as http,
        http.stream(
            "POST", "/vercel/chat", json=chat_body("What is 25 * 4?", "chat-c")
        ) as response,
    ):
        run_id = response.headers["x-trioflow-run-id"]
        # the chat's run, joined and dropped mid-text by the real parser, then resumed after its last id
        out = await node_json(js_clients, "lastid", f"{server.url}/vercel/chat/chat-c/stream", "6")
        await response.aread()
    message = out["message"]
    assert int(out["lastId"]) >= 1 and out["firstCount"] == 6
    text, (tool,) = assistant_parts(message)
    assert text == "Let me calculate that.The result is 100."
    assert message["id"] == run_id and tool["state"] == "output-available"


async def test_a_long_history_is_413_with_the_way_out(start_web_server: StartWebServer) -> None:
    server = await start_web_server(max_body=1024)
    body = chat_body("hi")
    body["messages"] = [*body["messages"]] * 40
    async with http_client(server) as http:
        response = await http.post("/vercel/chat", json=body)
    error = assert_error(response, 413, "payload_too_large")
    assert "prepareSendMessagesRequest" in str(error["message"])


async def test_a_client_leaving_follows_the_runs_on_disconnect(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=chat_agent(pace=5))
    runs = []
    for chat_id, policy in (("stays", "continue"), ("goes", "cancel")):
        body = chat_body("What is 25 * 4?", chat_id, on_disconnect=policy)
        async with (
            http_client(server) as http,
            http.stream("POST", "/vercel/chat", json=body) as response,
        ):
            run_id = response.headers["x-trioflow-run-id"]  # the client leaves at once
        runs.append(server.executor.get_run(run_id))
    stays, goes = runs
    with trio.fail_after(10):
        await goes.wait()
        await stays.wait()
    assert str(stays.status) == "completed"
    assert str(goes.status) == "cancelled"
    last = server.executor.get_run(goes.run_id)
    assert last.last_seq > 0


@pytest.mark.parametrize("decision", ["approve", "deny"])
async def test_use_chat_shows_an_approval_and_its_outcome(
    start_web_server: StartWebServer,
    js_clients: Path,
    server_log: pytest.LogCaptureFixture,
    decision: str,
) -> None:
    def make(request: Any) -> Agent:
        model = ScriptedModel(itertools.repeat(remembering))
        return Agent(model, tools=[calculator], approval=lambda call: True)

    server = await start_web_server(agent=make)
    decided: list[str] = []

    async def decide() -> None:
        with trio.fail_after(30):
            while True:
                threads = server.hub.threads.list()
                run_id = threads[0].running if threads else None
                pending = server.executor.get_run(run_id).pending_approvals() if run_id else []
                if pending:
                    break
                await trio.sleep(0.02)
        call_id = pending[0].call_id
        async with http_client(server) as http:
            body = {"decision": decision, **({"reason": "no"} if decision == "deny" else {})}
            response = await http.post(f"/runs/{run_id}/approvals/{call_id}", json=body)
        assert response.status_code == 200, response.text
        decided.append(call_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(decide)
        out = await node_json(
            js_clients, "chat", f"{server.url}/vercel/chat", "chat-d", "What is 25 * 4?"
        )
    assert out["status"] == "ready" and out["errors"] == []
    _, answer = out["messages"]
    text, (tool,) = assistant_parts(answer)
    assert tool["toolCallId"] == decided[0]
    assert tool["approval"] == {"id": decided[0]}  # the tool-approval-request reached the part
    if decision == "approve":
        assert tool["state"] == "output-available" and "100" in json.dumps(tool["output"])
        approved = [p for p in answer["parts"] if p["type"] == "data-tool-approved"]
        assert [p["id"] for p in approved] == decided
        assert text.endswith("The result is 100.")
    else:
        assert tool["state"] == "output-denied"
        assert "denied" in text
    assert_no_traceback(server_log)
