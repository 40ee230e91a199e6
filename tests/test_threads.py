"""Threads: conversations whose runs see the turns before them, from Python and over HTTP;
one run at a time, bounded messages and threads, clear errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from conftest import http_client

from trioflow import Agent, ScriptedModel, StreamingFlowExecutor, Turn
from trioflow.builtin import calculator
from trioflow.models import ModelError
from trioflow.threads import (
    ThreadBusy,
    ThreadFull,
    ThreadLimitReached,
    ThreadNotFound,
    Threads,
)

if TYPE_CHECKING:
    from conftest import StartWebServer


def said(messages: tuple[object, ...]) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in messages]  # type: ignore[attr-defined]


async def test_a_three_turn_conversation_sees_its_earlier_turns() -> None:
    model = ScriptedModel([Turn(text="hello ann"), Turn(text="you are ann"), Turn(text="bye ann")])
    agent = Agent(model)
    thread = Threads().create({"user": "ann"})
    async with StreamingFlowExecutor() as executor:
        runs = []
        for message in ("I am ann", "who am I?", "bye"):
            run = await executor.start(agent, message, thread=thread)
            await run.wait()
            runs.append(run)
    assert said(model.calls[2]) == [
        ("user", "I am ann"),
        ("assistant", "hello ann"),
        ("user", "who am I?"),
        ("assistant", "you are ann"),
        ("user", "bye"),
    ]
    assert said(thread.messages)[-1] == ("assistant", "bye ann")
    assert len(thread.messages) == 6
    assert thread.runs == tuple(r.run_id for r in runs)
    assert all(r.metadata["thread_id"] == thread.thread_id for r in runs)
    assert thread.running is None
    assert thread.metadata == {"user": "ann"}


async def test_tool_calls_and_results_stay_in_the_conversation() -> None:
    model = ScriptedModel(
        [
            Turn(tool_calls=[("calculator", {"operation": "add", "a": 2, "b": 2})]),
            Turn(text="4"),
            Turn(text="it was 4"),
        ]
    )
    agent = Agent(model, tools=[calculator])
    thread = Threads().create()
    async with StreamingFlowExecutor() as executor:
        await (await executor.start(agent, "2 + 2?", thread=thread)).wait()
        await (await executor.start(agent, "what was it?", thread=thread)).wait()
    kinds = [[b.__class__.__name__ for b in m.content] for m in model.calls[2]]
    assert kinds == [
        ["TextBlock"],
        ["ToolUseBlock"],
        ["ToolResultBlock"],
        ["TextBlock"],
        ["TextBlock"],
    ]


async def test_one_run_at_a_time_per_thread(autojump_clock: trio.testing.MockClock) -> None:
    agent = Agent(ScriptedModel([Turn(text="first"), Turn(text="second")]))
    thread = Threads().create()
    async with StreamingFlowExecutor() as executor:
        blocked = Agent(ScriptedModel([Turn(text="slow", delay=3600)]))
        run = await executor.start(blocked, "wait", thread=thread)
        with pytest.raises(ThreadBusy) as busy:
            await executor.start(agent, "next", thread=thread)
        assert busy.value.run_id == run.run_id
        assert thread.running == run.run_id
        run.cancel()
        await run.wait()
        assert thread.running is None
        assert thread.messages == ()  # a cancelled run leaves the conversation as it was
        nxt = await executor.start(agent, "next", thread=thread)
        await nxt.wait()
    assert thread.runs == (run.run_id, nxt.run_id)
    assert said(thread.messages) == [("user", "next"), ("assistant", "first")]


async def test_a_failed_run_leaves_the_messages_as_they_were() -> None:
    failing = Agent(ScriptedModel([Turn(fail=ModelError("down", kind="server"))]))
    thread = Threads().create()
    async with StreamingFlowExecutor() as executor:
        run = await executor.start(failing, "hi", thread=thread)
        await run.wait()
    assert str(run.status) == "failed"
    assert thread.messages == () and thread.runs == (run.run_id,)


async def test_a_full_thread_refuses_the_next_run() -> None:
    thread = Threads(max_messages=2).create()
    agent = Agent(ScriptedModel([Turn(text="one"), Turn(text="two")]))
    async with StreamingFlowExecutor() as executor:
        await (await executor.start(agent, "first", thread=thread)).wait()
        with pytest.raises(ThreadFull) as full:
            await executor.start(agent, "second", thread=thread)
    assert full.value.limit == 2
    assert len(thread.runs) == 1 and len(executor.runs) == 1  # no run was made


async def test_the_store_forgets_the_oldest_idle_thread_and_refuses_when_all_run() -> None:
    threads = Threads(max_threads=2)
    first, second = threads.create(), threads.create()
    third = threads.create()
    with pytest.raises(ThreadNotFound):
        threads.get(first.thread_id)
    assert [t.thread_id for t in threads.list()] == [second.thread_id, third.thread_id]
    second.begin("run_a")
    third.begin("run_b")
    with pytest.raises(ThreadLimitReached):
        threads.create()
    with pytest.raises(ValueError, match="max_threads"):
        Threads(max_threads=0)


# -- over HTTP ------------------------------------------------------------------------------


async def test_a_conversation_over_http(start_web_server: StartWebServer) -> None:
    model = ScriptedModel([Turn(text="hello"), Turn(text="again"), Turn(text="bye")])
    server = await start_web_server(agent=lambda request: Agent(model))
    async with http_client(server) as http:
        created = await http.post("/threads", json={"metadata": {"user": "ann"}})
        assert created.status_code == 201
        thread_id = created.json()["thread_id"]
        assert created.headers["location"].endswith(f"/threads/{thread_id}")
        for message in ("hi", "hi again", "bye"):
            started = await http.post(f"/threads/{thread_id}/runs", json={"message": message})
            assert started.status_code == 201, started.text
            assert started.json()["thread_id"] == thread_id
            with trio.fail_after(10):
                await server.executor.get_run(started.json()["run_id"]).wait()
        thread = (await http.get(f"/threads/{thread_id}")).json()
        listing = (await http.get("/threads")).json()["threads"]
    assert [m["role"] for m in thread["messages"]] == ["user", "assistant"] * 3
    assert thread["messages"][4]["content"] == [{"type": "text", "text": "bye"}]
    assert len(thread["runs"]) == 3 and thread["running"] is None
    assert thread["metadata"] == {"user": "ann"}
    assert listing == [
        {
            "thread_id": thread_id,
            "created_at": thread["created_at"],
            "messages": 6,
            "runs": 3,
            "running": None,
        }
    ]
    assert said(model.calls[2])[:4] == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "hi again"),
        ("assistant", "again"),
    ]


async def test_thread_errors_over_http(start_web_server: StartWebServer) -> None:
    server = await start_web_server(
        agent=lambda request: Agent(ScriptedModel([Turn(text="slow", delay=3600)])),
        max_thread_messages=1,
    )
    async with http_client(server) as http:
        thread_id = (await http.post("/threads")).json()["thread_id"]
        first = await http.post(f"/threads/{thread_id}/runs", json={"message": "go"})
        answers = [
            await http.post(f"/threads/{thread_id}/runs", json={"message": "again"}),
            await http.post("/threads/thread_nope/runs", json={"message": "x"}),
            await http.get("/threads/thread_nope"),
            await http.post(f"/threads/{thread_id}/runs", json={"task": "x"}),
            await http.post(f"/threads/{thread_id}/runs", json={"message": ""}),
            await http.post("/threads", json={"metadata": "x"}),
            await http.post("/threads", json={"other": 1}),
        ]
        codes = [(a.status_code, a.json()["error"]["code"]) for a in answers]
        assert codes == [
            (409, "thread_busy"),
            (404, "thread_not_found"),
            (404, "thread_not_found"),
            (400, "invalid_request"),
            (400, "invalid_request"),
            (400, "invalid_request"),
            (400, "invalid_request"),
        ]
        assert answers[0].json()["error"]["run_id"] == first.json()["run_id"]
        assert "unknown field 'task'" in answers[3].json()["error"]["message"]
        run = server.executor.get_run(first.json()["run_id"])
        run.cancel()
        with trio.fail_after(5):
            await run.wait()
        # Cancelled: no message added, so the thread still has room for one run.
        full_server = await start_web_server(max_thread_messages=1)
    async with http_client(full_server) as http:
        thread_id = (await http.post("/threads")).json()["thread_id"]
        done = await http.post(f"/threads/{thread_id}/runs", json={"message": "What is 2 + 2?"})
        with trio.fail_after(10):
            await full_server.executor.get_run(done.json()["run_id"]).wait()
        full = await http.post(f"/threads/{thread_id}/runs", json={"message": "more"})
    assert (full.status_code, full.json()["error"]["code"]) == (409, "thread_full")


async def test_a_thread_of_a_given_id_is_made_once() -> None:
    threads = Threads(max_threads=2)
    made = await threads.create_thread({"chat_id": "c"}, thread_id="chat_1")
    again = await threads.create_thread({"chat_id": "other"}, thread_id="chat_1")
    assert again is made and made.thread_id == "chat_1"
    assert made.to_dict()["metadata"] == {"chat_id": "c"}
    assert len(threads) == 1
