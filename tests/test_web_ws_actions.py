"""The WebSocket actions of issue #15, over both paths: ``decide`` (tool approvals),
``cancel`` with ``mode: after_turn``, and ``message`` (a conversation's next run)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import http_client, receive, send, start_run

from trioflow import Agent, ScriptedModel, Turn, tool

if TYPE_CHECKING:
    from conftest import OpenWS, StartWebServer
    from trio_websocket import WebSocketConnection

pytestmark = pytest.mark.usefixtures("ws_path")


def approving_agent(request: object = None) -> Agent:
    @tool(requires_approval=True)
    async def transfer(amount: int) -> str:
        """Move money.

        Args:
            amount: how much.
        """
        return f"sent {amount}"

    model = ScriptedModel([Turn(tool_calls=[("transfer", {"amount": 5})]), Turn(text="done")])
    return Agent(model, tools=[transfer])


async def frames_until(ws: WebSocketConnection, stop: str) -> list[dict[str, Any]]:
    """Frames up to the first whose ``type`` is ``stop`` (included)."""
    frames = []
    with trio.fail_after(10):
        while True:
            frame = await receive(ws)
            frames.append(frame)
            if frame.get("type") == stop:
                return frames


async def test_decide_over_a_run_socket(start_web_server: StartWebServer, open_ws: OpenWS) -> None:
    server = await start_web_server(agent=approving_agent)
    run_id = await start_run(server, "pay")
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
        asked = (await frames_until(ws, "tool.approval_required"))[-1]
        call_id = asked["data"]["call_id"]
        await send(
            ws, {"action": "decide", "call_id": "toolu_nope", "decision": "approve", "ref": 1}
        )
        await send(ws, {"action": "decide", "call_id": call_id, "decision": "maybe", "ref": 2})
        await send(ws, {"action": "decide", "call_id": call_id, "decision": "approve", "ref": 3})
        await send(ws, {"action": "decide", "call_id": call_id, "decision": "deny", "ref": 4})
        frames = await frames_until(ws, "flow.completed")
    controls = [f for f in frames if "id" not in f]
    assert [(c["type"], c.get("code"), c.get("ref")) for c in controls] == [
        ("error", "approval_not_found", 1),
        ("error", "invalid_request", 2),
        ("decided", None, 3),
        ("error", "approval_decided", 4),
    ]
    assert controls[2] == {
        "type": "decided",
        "run_id": run_id,
        "call_id": call_id,
        "decision": "approve",
        "ref": 3,
    }
    types = [f["type"] for f in frames if "id" in f]
    assert types.index("tool.approved") < types.index("tool.completed")


async def test_decide_on_the_multiplexed_socket_edits_the_input(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    server = await start_web_server(agent=approving_agent)
    async with open_ws(f"{server.ws_url}/ws") as ws:
        await send(ws, {"action": "start", "task": "pay"})
        frames = await frames_until(ws, "tool.approval_required")
        run_id = frames[0]["run_id"]
        call_id = frames[-1]["data"]["call_id"]
        await send(
            ws,
            {
                "action": "decide",
                "run_id": run_id,
                "call_id": call_id,
                "decision": "edit",
                "input": {"amount": "lots"},
            },
        )
        refused = await frames_until(ws, "error")
        assert refused[-1]["code"] == "invalid_input"
        await send(
            ws,
            {
                "action": "decide",
                "run_id": run_id,
                "call_id": call_id,
                "decision": "edit",
                "input": {"amount": 1},
            },
        )
        frames = await frames_until(ws, "flow.completed")
    (completed,) = [f for f in frames if f.get("type") == "tool.completed"]
    assert completed["data"]["result"] == "sent 1"


async def test_cancel_after_turn_over_the_socket(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    gate = trio.Event()

    @tool
    async def wait() -> str:
        """Wait for the gate."""
        await gate.wait()
        return "opened"

    def make(request: object) -> Agent:
        turns = [Turn(tool_calls=[("wait", {})]), Turn(tool_calls=[("wait", {})]), Turn("x")]
        return Agent(ScriptedModel(turns), tools=[wait])

    server = await start_web_server(agent=make)
    async with open_ws(f"{server.ws_url}/ws") as ws:
        await send(ws, {"action": "start", "task": "go"})
        frames = await frames_until(ws, "tool.started")
        run_id = frames[0]["run_id"]
        await send(ws, {"action": "cancel", "run_id": run_id, "mode": "soon", "ref": 7})
        bad = await frames_until(ws, "error")
        assert (bad[-1]["code"], bad[-1]["ref"]) == ("invalid_request", 7)
        await send(ws, {"action": "cancel", "run_id": run_id, "mode": "after_turn"})
        # Messages are handled in order: once this one is answered, the cancel was taken.
        await send(ws, {"action": "nothing", "ref": 8})
        answered = await frames_until(ws, "error")
        assert (answered[-1]["code"], answered[-1]["ref"]) == ("unknown_action", 8)
        assert not server.executor.get_run(run_id).done
        gate.set()
        frames = await frames_until(ws, "flow.cancelled")
    types = [f["type"] for f in frames]
    assert types.index("tool.completed") < types.index("flow.cancelled")
    assert "iteration.started" not in types  # no second turn
    assert frames[-1]["data"]["reason"] == "cancelled by client"


async def test_messages_to_a_thread_over_the_socket(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    model = ScriptedModel([Turn(text="hello"), Turn(text="again")])
    server = await start_web_server(agent=lambda request: Agent(model))
    async with http_client(server) as http:
        thread_id = (await http.post("/threads")).json()["thread_id"]
    async with open_ws(f"{server.ws_url}/ws") as ws:
        await send(ws, {"action": "message", "thread_id": "thread_nope", "message": "x", "ref": 1})
        await send(ws, {"action": "message", "thread_id": thread_id, "task": "x", "ref": 2})
        await send(ws, {"action": "message", "thread_id": thread_id, "message": "hi", "ref": 3})
        first = await frames_until(ws, "flow.completed")
        await send(ws, {"action": "message", "thread_id": thread_id, "message": "hi again"})
        second = await frames_until(ws, "flow.completed")
    controls = [f for f in first if "id" not in f]
    assert [(c["type"], c.get("code"), c.get("ref")) for c in controls] == [
        ("error", "thread_not_found", 1),
        ("error", "invalid_request", 2),
        ("accepted", None, 3),
    ]
    assert controls[2]["thread_id"] == thread_id
    assert second[-1]["data"]["output"] == "again"
    assert [m.text for m in model.calls[1]] == ["hi", "hello", "hi again"]
