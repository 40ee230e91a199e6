"""The front ends' protocols on Redis, against a real redis-server: an AG-UI run queued for a
worker carries the client's conversation; a Vercel chat's turns go to any node (its thread is
in Redis); both streams resume from another node than the one that started them."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import http_client

from trioflow import Agent, ScriptedModel, Turn

pytest.importorskip("coredis")

from test_redis_threads import node_agent, said, start_node

from trioflow.redis import RedisRunStore, open_redis, open_worker

if TYPE_CHECKING:
    from conftest import WebServer


def frames(text: str) -> list[tuple[int | None, dict[str, Any] | str]]:
    """``(id, data)`` of each SSE message (the id where the message has one)."""
    out: list[tuple[int | None, dict[str, Any] | str]] = []
    for block in text.split("\n\n"):
        ident, data = None, None
        for line in block.splitlines():
            if line.startswith("id:"):
                ident = int(line[3:].strip())
            elif line.startswith("data:"):
                payload = line[5:].strip()
                data = payload if payload == "[DONE]" else json.loads(payload)
        if data is not None:
            out.append((ident, data))
    return out


async def post(node: WebServer, path: str, body: dict[str, Any]) -> Any:
    async with http_client(node) as http:
        return await http.post(path, json=body)


async def test_an_agui_run_queued_for_a_worker_sees_the_clients_conversation(
    redis_url: str, nursery: trio.Nursery
) -> None:
    model = ScriptedModel([Turn("You asked about two sums.")])
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, node_agent)
        b = await start_node(nursery, redis_url, node_agent)
        async with (
            open_redis(redis_url) as client,
            open_worker(
                RedisRunStore(client), agent_factory=lambda r: Agent(model), reap_interval=None
            ),
        ):
            body = {
                "threadId": "t-9", "runId": "r-9", "state": {}, "tools": [], "context": [],
                "forwardedProps": {},
                "messages": [
                    {"id": "u1", "role": "user", "content": "What is 2 + 2?"},
                    {"id": "a1", "role": "assistant", "content": "4."},
                    {"id": "u2", "role": "user", "content": "And what did I ask?"},
                ],
            }  # fmt: skip
            answer = await post(a, "/agui", body)
            assert answer.status_code == 200, answer.text
            got = frames(answer.text)
            events = [data for _, data in got if isinstance(data, dict)]
            assert events[0]["type"] == "RUN_STARTED"
            assert (events[0]["threadId"], events[0]["runId"]) == ("t-9", "r-9")
            assert events[-1]["type"] == "RUN_FINISHED"
            assert (events[-1]["threadId"], events[-1]["runId"]) == ("t-9", "r-9")
            text = "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")
            assert text == "You asked about two sums."
            run_id = events[0]["metadata"]["trioflow"]["runId"]
            # the same run from node B, resumed after its first event
            first = next(ident for ident, _ in got if ident is not None)
            async with http_client(b) as http:
                rest = await http.get(
                    f"/runs/{run_id}/events.agui", headers={"Last-Event-ID": str(first)}
                )
            assert rest.status_code == 200
            resumed = [data for _, data in frames(rest.text)]
            assert (
                resumed
                == [data for ident, data in got if ident is None or ident > first][-len(resumed) :]
            )
            assert resumed[-1]["type"] == "RUN_FINISHED"
    assert said(model.calls[0]) == [
        ("user", "What is 2 + 2?"),
        ("assistant", "4."),
        ("user", "And what did I ask?"),
    ]


async def test_a_vercel_chat_goes_on_at_another_node_and_resumes_there(
    redis_url: str, nursery: trio.Nursery
) -> None:
    model = ScriptedModel([Turn("Hello ann."), Turn("You are ann.")])
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, node_agent)
        b = await start_node(nursery, redis_url, node_agent)
        async with (
            open_redis(redis_url) as client,
            open_worker(
                RedisRunStore(client), agent_factory=lambda r: Agent(model), reap_interval=None
            ),
        ):

            def chat(text: str) -> dict[str, Any]:
                message = {"id": "m", "role": "user", "parts": [{"type": "text", "text": text}]}
                return {"id": "chat-ann", "messages": [message], "trigger": "submit-message"}

            first = await post(a, "/vercel/chat", chat("I am ann"))
            assert first.status_code == 200, first.text
            assert frames(first.text)[-1][1] == "[DONE]"
            second = await post(b, "/vercel/chat", chat("Who am I?"))
            assert second.status_code == 200, second.text
            got = frames(second.text)
            deltas = [
                d["delta"] for _, d in got if isinstance(d, dict) and d["type"] == "text-delta"
            ]
            assert "".join(deltas) == "You are ann."
            # the chat's latest run, resumed on node A after its first event
            first_id = next(ident for ident, _ in got if ident is not None)
            async with http_client(a) as http:
                rest = await http.get(
                    "/vercel/chat/chat-ann/stream", headers={"Last-Event-ID": str(first_id)}
                )
                assert rest.status_code == 200, rest.text
                assert [d for _, d in frames(rest.text)] == [
                    d for ident, d in got if ident is None or ident > first_id
                ][-len(frames(rest.text)) :]
                threads = (await http.get("/threads")).json()["threads"]
            assert [(t["messages"], t["runs"]) for t in threads] == [(4, 2)]
    assert said(model.calls[1]) == [
        ("user", "I am ann"),
        ("assistant", "Hello ann."),
        ("user", "Who am I?"),
    ]
