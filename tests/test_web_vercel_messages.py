"""``GET /vercel/chat/{id}/messages``: a chat's conversation as ``useChat``'s UI messages, for a
page that reloads; checked in Python and by the real ``ai`` package (``validateUIMessages``,
then a chat made from them goes on). Real Hypercorn on 127.0.0.1."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
from conftest import http_client, run_node

from trioflow import Agent, ScriptedModel
from trioflow.builtin import calculator

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import StartWebServer


def calculator_agent(request: Any) -> Agent:
    return Agent(ScriptedModel(pace=0), tools=[calculator])


def chat_body(text: str, chat_id: str = "chat-7") -> dict[str, Any]:
    message = {"id": "m", "role": "user", "parts": [{"type": "text", "text": text}]}
    return {"id": chat_id, "messages": [message], "trigger": "submit-message"}


async def test_a_chats_messages_are_the_ui_messages_of_its_turns(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=calculator_agent)
    with trio.fail_after(20):
        async with http_client(server) as http:
            for text in ("What is 25 * 4?", "What is 2 ^ 10?"):
                answer = await http.post("/vercel/chat", json=chat_body(text))
                assert answer.status_code == 200, answer.text
            listed = await http.get("/vercel/chat/chat-7/messages")
            unknown = await http.get("/vercel/chat/chat-nobody/messages")
    assert listed.status_code == 200
    body = listed.json()
    assert body["id"] == "chat-7"
    messages = body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["parts"] == [{"type": "text", "text": "What is 25 * 4?"}]
    parts = messages[1]["parts"]
    assert [p["type"] for p in parts] == [
        "step-start", "text", "tool-calculator", "step-start", "text"
    ]  # fmt: skip
    tool = parts[2]
    assert tool["state"] == "output-available" and tool["output"] == 100
    assert tool["input"] == {"operation": "evaluate", "expression": "25 * 4"}
    assert parts[-1] == {"type": "text", "text": "25 * 4 = 100.", "state": "done"}
    assert len({m["id"] for m in messages}) == 4
    assert unknown.json() == {"id": "chat-nobody", "messages": []}


async def test_the_ai_package_takes_them_and_the_chat_goes_on(
    start_web_server: StartWebServer, js_clients: Path
) -> None:
    server = await start_web_server(agent=calculator_agent)
    with trio.fail_after(60):
        async with http_client(server) as http:
            answer = await http.post("/vercel/chat", json=chat_body("What is 25 * 4?"))
            assert answer.status_code == 200
        done = await run_node(
            js_clients, "vercel_messages.mjs", f"{server.url}/vercel/chat", "chat-7", "And 3 + 4?"
        )
    out = json.loads(done.stdout)
    assert out["error"] is None
    assert out["validated"] == 2  # validateUIMessages took both
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    last = out["messages"][-1]["parts"]
    tool = next(p for p in last if p["type"] == "tool-calculator")
    assert tool["state"] == "output-available" and tool["output"] == 7
    thread = server.hub.threads.list()[0]
    assert len(thread.messages) == 8  # the thread holds both turns: the reload lost nothing
