"""Faults of the WebSocket endpoints: bad messages and refused handshakes, against real Hypercorn.

A bad message gets an ``error`` frame and the connection stays open; it
never closes the connection with ``1011`` nor leaves a traceback in the
log. Only a message above
:attr:`~trioflow.web.WebConfig.websocket_message_ceiling` closes it (``1009``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import assert_no_traceback, receive, send, start_run, talker, until_terminal
from trio_websocket import ConnectionClosed, ConnectionRejected

if TYPE_CHECKING:
    from conftest import OpenWS, StartWebServer, WebServer
    from trio_websocket import WebSocketConnection

TOKEN = "s3cret-t0ken"

pytestmark = pytest.mark.usefixtures("ws_path")
"""Every test runs over both paths: served directly under serve(), and through ASGI."""


async def next_control(ws: WebSocketConnection) -> dict[str, Any]:
    """The next control frame, skipping the events of followed runs."""
    frame = await receive(ws)
    while "id" in frame:
        frame = await receive(ws)
    return frame


async def still_serves(ws: WebSocketConnection, server: WebServer) -> None:
    """The connection is open and working: a ``start`` is accepted and its run completes."""
    await send(ws, {"action": "start", "task": "What is 2 + 2?", "ref": "after"})
    accepted = await next_control(ws)
    assert accepted["type"] == "accepted" and accepted["ref"] == "after", accepted
    frames = await until_terminal(ws, accepted["run_id"])
    assert frames[-1]["type"] == "flow.completed"


# -- messages ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ({"no": "action"}, "invalid_message"),
        ({"action": "fly"}, "unknown_action"),
        ({"action": "resume"}, "invalid_after"),
        ({"action": "resume", "after": -1}, "invalid_after"),
        ({"action": "resume", "after": "3"}, "invalid_after"),
        ({"action": "cancel", "please": True}, "invalid_message"),
        ({"action": "cancel", "run_id": "run_other"}, "invalid_message"),
    ],
)
async def test_run_socket_answers_bad_messages_with_an_error_frame_and_stays_open(
    start_web_server: StartWebServer, message: Any, code: str, open_ws: OpenWS
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100))
    run_id = await start_run(server, token=TOKEN)
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
        await send(ws, message)
        frame = await receive(ws)
        while "id" in frame:  # events of the run
            frame = await receive(ws)
        assert frame["type"] == "error"
        assert frame["code"] == code
        assert frame["message"]
        await send(ws, {"action": "cancel"})  # still open and listening
        frames = await until_terminal(ws)
    assert frames[-1]["type"] == "flow.cancelled"


async def test_run_socket_for_an_unknown_run_is_refused_with_404(
    web_server: WebServer, open_ws: OpenWS
) -> None:
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_ws(f"{web_server.ws_url}/runs/run_nope/ws"):
            pass
    assert rejected.value.status_code == 404
    assert json.loads(rejected.value.body or b"")["error"]["code"] == "run_not_found"


async def test_socket_rejects_an_invalid_start_and_stays_open(
    web_server: WebServer, open_ws: OpenWS
) -> None:
    async with open_ws(f"{web_server.ws_url}/ws") as ws:
        await send(ws, {"action": "start", "task": "", "ref": 7})
        error = await receive(ws)
        await send(ws, {"action": "start", "task": "hi", "colour": "red"})
        unknown = await receive(ws)
        await send(ws, {"action": "start", "task": "What is 2 + 2?"})
        accepted = await receive(ws)
        frames = await until_terminal(ws)
    assert error == {
        "type": "error",
        "code": "invalid_request",
        "message": "'task' must not be empty",
        "action": "start",
        "ref": 7,
    }
    assert unknown["code"] == "invalid_request" and "'colour'" in unknown["message"]
    assert accepted["type"] == "accepted"
    assert frames[-1]["data"]["output"] == "2 + 2 = 4."
    assert len(web_server.executor.runs) == 1


DEEP = "[" * 30_000 + "]" * 30_000


@pytest.mark.parametrize(
    "message",
    [DEEP, '{"action": "start", "task": "hi", "ref": ' + DEEP + "}", DEEP.encode()],
    ids=["text", "member", "binary"],
)
async def test_deeply_nested_json_gets_an_invalid_json_frame_and_the_connection_stays_open(
    web_server: WebServer,
    open_ws: OpenWS,
    server_log: pytest.LogCaptureFixture,
    message: str | bytes,
) -> None:
    assert len(message) < web_server.config.max_body  # the nesting, not the size
    async with open_ws(f"{web_server.ws_url}/ws") as ws:
        await send(ws, message)
        error = await receive(ws)
        assert error["type"] == "error"
        assert error["code"] == "invalid_json"
        assert "nested deeper than" in error["message"]
        await still_serves(ws, web_server)
    assert len(web_server.executor.runs) == 1
    assert_no_traceback(server_log)


async def test_deeply_nested_json_on_a_run_socket_gets_an_error_frame(
    start_web_server: StartWebServer, open_ws: OpenWS, server_log: pytest.LogCaptureFixture
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100))
    run_id = await start_run(server, token=TOKEN)
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
        await send(ws, DEEP)
        error = await next_control(ws)
        assert (error["type"], error["code"]) == ("error", "invalid_json")
        await send(ws, {"action": "cancel"})  # still open and listening
        frames = await until_terminal(ws)
    assert frames[-1]["type"] == "flow.cancelled"
    assert_no_traceback(server_log)


@pytest.mark.parametrize("task", ["hi \ud800", "\udfff"])
async def test_a_lone_surrogate_in_a_task_gets_an_invalid_request_frame(
    web_server: WebServer, open_ws: OpenWS, server_log: pytest.LogCaptureFixture, task: str
) -> None:
    async with open_ws(f"{web_server.ws_url}/ws") as ws:
        await send(ws, json.dumps({"action": "start", "task": task, "ref": 1}))  # "\ud800" escaped
        error = await receive(ws)
        assert error["type"] == "error"
        assert error["code"] == "invalid_request"
        assert error["message"].startswith("task is not valid Unicode")
        assert (error["action"], error["ref"]) == ("start", 1)
        assert web_server.executor.runs == {}
        await still_serves(ws, web_server)
    assert_no_traceback(server_log)


async def test_a_lone_surrogate_elsewhere_in_a_message_is_answered_not_fatal(
    web_server: WebServer, open_ws: OpenWS, server_log: pytest.LogCaptureFixture
) -> None:
    async with open_ws(f"{web_server.ws_url}/ws") as ws:
        await send(ws, '{"action": "fly", "ref": "\\ud800"}')
        unknown = await receive(ws)
        await send(ws, '{"action": "cancel", "run_id": "\\ud800"}')
        missing = await receive(ws)
        await send(ws, '{"action": "\\ud800"}')
        odd = await receive(ws)
        await still_serves(ws, web_server)
    assert (unknown["code"], unknown["ref"]) == ("unknown_action", "\ud800")  # echoed, escaped
    assert missing["code"] == "run_not_found"
    assert odd["code"] == "unknown_action"
    assert_no_traceback(server_log)


async def test_a_message_over_max_body_gets_message_too_large_and_the_connection_stays_open(
    start_web_server: StartWebServer, open_ws: OpenWS, server_log: pytest.LogCaptureFixture
) -> None:
    server = await start_web_server(max_body=1024)
    big = json.dumps({"action": "start", "task": "x" * 1500})
    wide = json.dumps({"action": "start", "task": "é" * 600}, ensure_ascii=False)
    assert len(wide) < 1024 < len(wide.encode())  # bytes count, not characters
    async with open_ws(f"{server.ws_url}/ws") as ws:
        errors = []
        for message in (big, big.encode(), wide, "x" * (2 * 1024 + 60 * 1024)):
            await send(ws, message)
            errors.append(await receive(ws))
        await still_serves(ws, server)
    for error in errors:
        assert error["type"] == "error"
        assert error["code"] == "message_too_large"
        assert "at most 1024 bytes" in error["message"]
    assert len(server.executor.runs) == 1
    assert_no_traceback(server_log)


async def test_a_message_over_the_ceiling_closes_the_connection_with_1009(
    start_web_server: StartWebServer, open_ws: OpenWS, server_log: pytest.LogCaptureFixture
) -> None:
    server = await start_web_server(max_body=1024)
    ceiling = server.config.websocket_message_ceiling
    async with open_ws(f"{server.ws_url}/ws") as ws:
        await send(ws, "x" * (ceiling + 1))
        with pytest.raises(ConnectionClosed) as closed:
            await receive(ws)
    assert closed.value.reason.code == 1009
    assert server.executor.runs == {}
    assert_no_traceback(server_log)


# -- handshakes ------------------------------------------------------------------------------


async def test_websockets_need_the_token_in_a_header_or_the_query(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    server = await start_web_server(token=TOKEN)
    run_id = await start_run(server, token=TOKEN)
    for url in (f"{server.ws_url}/ws", f"{server.ws_url}/runs/{run_id}/ws"):
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_ws(url):
                pass
        assert rejected.value.status_code == 401
        assert json.loads(rejected.value.body or b"")["error"]["code"] == "unauthorized"
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws?token={TOKEN}") as ws:
        assert json.loads(await ws.get_message())["id"] == 1
    async with open_ws(f"{server.ws_url}/ws", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        await ws.send_message(json.dumps({"action": "start", "task": "hi"}))
        assert json.loads(await ws.get_message())["type"] == "accepted"


async def test_websockets_from_a_foreign_origin_are_403(
    web_server: WebServer, open_ws: OpenWS
) -> None:
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_ws(f"{web_server.ws_url}/ws", headers={"Origin": "https://evil.example"}):
            pass
    assert rejected.value.status_code == 403
    assert json.loads(rejected.value.body or b"")["error"]["code"] == "forbidden_origin"


# -- disconnects -----------------------------------------------------------------------------


async def test_run_socket_disconnect_lets_the_run_go_on_by_default(
    start_web_server: StartWebServer,
    open_ws: OpenWS,
) -> None:
    server = await start_web_server(agent=talker(words=50, pace=100))
    run_id = await start_run(server)
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
        await receive(ws)
    with trio.fail_after(5):
        result = await server.executor.get_run(run_id).wait()
    assert result.status == "completed"


async def test_run_socket_disconnect_cancels_a_run_that_asked_for_it(
    start_web_server: StartWebServer,
    open_ws: OpenWS,
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100))
    run_id = await start_run(server, on_disconnect="cancel")
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
        await receive(ws)
    with trio.fail_after(5):
        result = await server.executor.get_run(run_id).wait()
    assert result.status == "cancelled"
    assert result.reason == "client disconnected"
    assert server.hub.watchers(run_id) == 0


async def test_socket_disconnect_applies_each_runs_policy(
    start_web_server: StartWebServer,
    open_ws: OpenWS,
) -> None:
    server = await start_web_server(agent=talker(words=60, pace=100))
    async with open_ws(f"{server.ws_url}/ws") as ws:
        await send(ws, {"action": "start", "task": "a", "on_disconnect": "cancel"})
        cancel = (await receive(ws))["run_id"]
        await send(ws, {"action": "start", "task": "b"})
        frame = await receive(ws)
        while frame["type"] != "accepted":
            frame = await receive(ws)
        keep = frame["run_id"]
    with trio.fail_after(5):
        cancelled = await server.executor.get_run(cancel).wait()
        kept = await server.executor.get_run(keep).wait()
    assert (cancelled.status, cancelled.reason) == ("cancelled", "client disconnected")
    assert kept.status == "completed"
    assert server.executor.get_run(cancel).metadata == {"source": "ws"}
    assert server.executor.get_run(cancel).on_disconnect == "cancel"
