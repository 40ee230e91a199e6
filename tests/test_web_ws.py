"""The WebSocket endpoints, /runs/{id}/ws and /ws, against a real Hypercorn server."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
from conftest import (
    all_events,
    flood,
    joined_fanout,
    receive,
    send,
    start_run,
    talker,
    until_terminal,
)
from trio_websocket import ConnectionClosed

if TYPE_CHECKING:
    from conftest import OpenWS, StartWebServer, WebServer
    from trio_websocket import WebSocketConnection


async def until_closed(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame up to the server's close, and the close code."""
    frames = []
    try:
        while True:
            frames.append(await receive(ws))
    except ConnectionClosed as closed:
        return frames, closed.reason.code


# -- /runs/{id}/ws ------------------------------------------------------------------


async def test_run_socket_sends_each_event_as_its_json_then_closes_with_1000(
    web_server: WebServer,
    open_ws: OpenWS,
) -> None:
    run_id = await start_run(web_server, task="What is 25 * 4?")
    async with open_ws(f"{web_server.ws_url}/runs/{run_id}/ws") as ws:
        frames, code = await until_closed(ws)
    events = await all_events(web_server.executor, run_id)
    assert code == 1000
    assert frames == [json.loads(e.to_json()) for e in events]
    assert frames[-1]["type"] == "flow.completed"


async def test_run_socket_after_parameter_starts_after_that_event(
    web_server: WebServer, open_ws: OpenWS
) -> None:
    run_id = await start_run(web_server, task="What is 25 * 4?")
    await web_server.executor.get_run(run_id).wait()
    async with open_ws(f"{web_server.ws_url}/runs/{run_id}/ws?after=25") as ws:
        frames, code = await until_closed(ws)
    assert [f["id"] for f in frames] == [26, 27, 28, 29]
    assert code == 1000


async def test_run_socket_cancel_ends_the_run_with_flow_cancelled(
    start_web_server: StartWebServer,
    open_ws: OpenWS,
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100))
    run_id = await start_run(server)
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
        assert (await receive(ws))["type"] == "flow.started"
        await send(ws, {"action": "cancel"})
        frames, code = await until_closed(ws)
    assert frames[-1]["type"] == "flow.cancelled"
    assert frames[-1]["data"]["reason"] == "cancelled by client"
    assert code == 1000
    assert server.executor.get_run(run_id).status == "cancelled"


async def test_run_socket_resume_replays_after_the_given_event(
    start_web_server: StartWebServer,
    open_ws: OpenWS,
) -> None:
    server = await start_web_server(agent=talker(words=60, pace=200))
    run_id = await start_run(server)
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
        first = [(await receive(ws))["id"] for _ in range(6)]
        await send(ws, {"action": "resume", "after": 2})
        frames, code = await until_closed(ws)
    assert first == [1, 2, 3, 4, 5, 6]
    ids = [f["id"] for f in frames]
    # Frames of the replaced stream may still be on the way; the replay
    # starts at 3 and then runs to the end with no gap.
    replay = ids[ids.index(3) :]
    assert replay == list(range(3, server.executor.get_run(run_id).last_seq + 1))
    assert code == 1000


# -- /ws ---------------------------------------------------------------------------------


async def test_socket_starts_several_runs_and_streams_each_with_its_run_id(
    web_server: WebServer,
    open_ws: OpenWS,
) -> None:
    async with open_ws(f"{web_server.ws_url}/ws") as ws:
        await send(ws, {"action": "start", "task": "What is 25 * 4?", "ref": 1})
        accepted = await receive(ws)
        assert accepted["type"] == "accepted" and accepted["ref"] == 1
        first = accepted["run_id"]
        await send(ws, {"action": "start", "task": "What is 6 * 7?", "ref": "b"})
        frames = []
        second = None
        done: set[str] = set()
        while len(done) < 2:
            frame = await receive(ws)
            if frame["type"] == "accepted":
                assert frame["ref"] == "b"
                second = frame["run_id"]
                continue
            frames.append(frame)
            if frame["type"] == "flow.completed":
                done.add(frame["run_id"])
    assert done == {first, second}
    for run_id in (first, second):
        events = await all_events(web_server.executor, run_id)
        assert [f for f in frames if f["run_id"] == run_id] == [
            json.loads(e.to_json()) for e in events
        ]
    assert web_server.executor.get_run(first).metadata["source"] == "ws"


async def test_socket_cancel_resume_and_errors_for_other_runs(
    start_web_server: StartWebServer,
    open_ws: OpenWS,
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100))
    run_id = await start_run(server)
    async with open_ws(f"{server.ws_url}/ws") as ws:
        await send(ws, {"action": "resume", "run_id": run_id, "after": 0})
        assert (await receive(ws))["type"] == "flow.started"
        await send(ws, {"action": "cancel", "run_id": run_id})
        frames = await until_terminal(ws, run_id)
        assert frames[-1]["type"] == "flow.cancelled"
        await send(ws, {"action": "cancel", "run_id": run_id})
        finished = await receive(ws)
        await send(ws, {"action": "cancel", "run_id": "run_nope"})
        missing = await receive(ws)
        await send(ws, {"action": "cancel"})
        no_id = await receive(ws)
    assert (finished["code"], finished["status"]) == ("run_finished", "cancelled")
    assert missing["code"] == "run_not_found"
    assert no_id["code"] == "invalid_message"


async def test_socket_limits_the_runs_one_connection_follows(
    start_web_server: StartWebServer,
    open_ws: OpenWS,
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100), max_runs_per_socket=1)
    async with open_ws(f"{server.ws_url}/ws") as ws:
        await send(ws, {"action": "start", "task": "a"})
        assert (await receive(ws))["type"] == "accepted"
        await send(ws, {"action": "start", "task": "b"})
        frame = await receive(ws)
        while "id" in frame:
            frame = await receive(ws)
    assert frame["code"] == "too_many_runs"
    assert len(server.executor.runs) == 1


async def test_a_slow_socket_is_evicted_and_resumes_on_the_same_connection(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    # As for the event stream: 400 events of 32 KiB outgrow the socket
    # buffers while the client reads nothing, and the 4-event buffer overflows.
    server = await start_web_server(agent=flood(), buffer=4)
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws", rcvbuf=64 * 1024) as ws:
        frames = [await receive(ws)]
        assert frames[0]["id"] == 1
        fanout = await joined_fanout(server.hub, run_id, 1, name="ws")
        with trio.fail_after(10):
            assert (await run.wait()).status == "completed"
        # Its place in the run's WebSocket fan-out was evicted; no subscription was.
        assert fanout.statistics().evicted == 1
        assert run.bus.statistics().evicted == 0
        while "id" in frames[-1]:
            frames.append(await receive(ws))
        error = frames.pop()
        assert error["type"] == "error" and error["code"] == "evicted"
        assert error["run_id"] == run_id
        last_seq = error["last_seq"]
        assert [f["id"] for f in frames] == list(range(1, last_seq + 1))
        await send(ws, {"action": "resume", "after": last_seq})
        rest, code = await until_closed(ws)
    assert [f["id"] for f in frames + rest] == list(range(1, run.last_seq + 1))
    assert rest[-1]["type"] == "flow.completed"
    assert code == 1000
