"""The WebSocket endpoints, /runs/{id}/ws and /ws, against a real Hypercorn server."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import pytest
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

from trioflow import FlowEvent

if TYPE_CHECKING:
    from conftest import OpenSSE, OpenWS, StartWebServer, WebServer
    from trio_websocket import WebSocketConnection


pytestmark = pytest.mark.usefixtures("ws_path")
"""Every test runs over both paths: served directly under serve(), and through ASGI."""


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
    start_web_server: StartWebServer, open_ws: OpenWS, ws_fanout: str
) -> None:
    # As for the event stream: 400 events of 32 KiB outgrow the socket
    # buffers while the client reads nothing, and the 4-event buffer overflows.
    server = await start_web_server(agent=flood(), buffer=4)
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws", rcvbuf=64 * 1024) as ws:
        frames = [await receive(ws)]
        assert frames[0]["id"] == 1
        fanout = await joined_fanout(server.hub, run_id, 1, name=ws_fanout)
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


# -- through the run's fan-out --------------------------------------------------------------


async def raw_until_closed(ws: WebSocketConnection) -> list[str]:
    """Every message up to the server's close, as sent."""
    messages = []
    try:
        while True:
            with trio.fail_after(5):
                message = await ws.get_message()
            assert isinstance(message, str)
            messages.append(message)
    except ConnectionClosed:
        return messages


async def test_sockets_on_one_run_share_one_fanout_and_each_event_is_encoded_once(
    start_web_server: StartWebServer,
    open_ws: OpenWS,
    monkeypatch: pytest.MonkeyPatch,
    ws_path: str,
    ws_fanout: str,
) -> None:
    from trioflow.web._direct_ws import SocketTransport
    from trioflow.web._ws import _AsgiTransport

    transport = SocketTransport if ws_path == "direct" else _AsgiTransport
    encoded: list[int] = []
    encoding = transport.encoding
    encode = encoding.event

    def counting(event: FlowEvent) -> Any:
        encoded.append(event.seq)
        return encode(event)

    monkeypatch.setattr(transport, "encoding", dataclasses.replace(encoding, event=counting))
    server = await start_web_server(agent=talker(words=150, pace=300))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    url = f"{server.ws_url}/runs/{run_id}/ws"
    async with open_ws(url) as a, open_ws(url) as b, open_ws(url) as c:
        fanout = await joined_fanout(server.hub, run_id, 3, name=ws_fanout)
        # One subscription reads the run for all three connections.
        names = [s.name for s in run.bus.statistics().subscribers]
        assert names == [f"{ws_fanout} fanout {run_id}"]
        got = [await raw_until_closed(ws) for ws in (a, b, c)]
    events = await all_events(server.executor, run_id)
    assert got[0] == got[1] == got[2] == [e.to_json() for e in events]
    assert sorted(encoded) == list(range(1, run.last_seq + 1))  # once each
    stats = fanout.statistics()
    assert stats.evicted == 0
    # Served directly, the fan-out writes to the sockets itself; through ASGI, never.
    assert (stats.direct_writes > 0) == (ws_path == "direct")
    assert stats.direct_writes + stats.queued_writes >= 3
    assert not fanout.open
    assert server.hub.fanouts() == []


async def test_event_stream_and_socket_clients_of_one_run_each_get_every_event(
    start_web_server: StartWebServer, open_ws: OpenWS, open_sse: OpenSSE, ws_fanout: str
) -> None:
    server = await start_web_server(agent=talker(words=150, pace=300))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws") as ws:
        async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
            by_name = {
                name: await joined_fanout(server.hub, run_id, 1, name=name)
                for name in ("sse", ws_fanout)
            }
            assert by_name["sse"] is not by_name[ws_fanout]
            names = sorted(s.name for s in run.bus.statistics().subscribers)
            assert names == [f"sse fanout {run_id}", f"{ws_fanout} fanout {run_id}"]
            frames = await stream.events()
        messages, code = await until_closed(ws)
    everything = list(range(1, run.last_seq + 1))
    assert [int(f.id or 0) for f in frames] == everything
    assert [m["id"] for m in messages] == everything
    assert code == 1000


async def test_a_late_socket_gets_the_messages_a_live_one_got(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    server = await start_web_server(agent=talker(words=120, pace=300))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    url = f"{server.ws_url}/runs/{run_id}/ws"
    async with open_ws(url) as live:
        first = [await live.get_message() for _ in range(30)]
        async with open_ws(url) as late:  # joins mid-run: a replay, then the fan-out
            later = await raw_until_closed(late)
        live_messages = first + await raw_until_closed(live)
    assert later == live_messages
    assert len(later) == run.last_seq
    async with open_ws(url) as replay:  # after the run: all from the replay
        assert await raw_until_closed(replay) == live_messages


async def test_socket_follows_two_runs_through_two_fanouts(
    start_web_server: StartWebServer, open_ws: OpenWS, ws_fanout: str
) -> None:
    server = await start_web_server(agent=talker(words=150, pace=300))
    async with open_ws(f"{server.ws_url}/ws") as ws:
        runs = []
        for ref in (1, 2):
            await send(ws, {"action": "start", "task": "go", "ref": ref})
            frame = await receive(ws)
            while frame["type"] != "accepted":
                frame = await receive(ws)
            runs.append(frame["run_id"])
        fanouts = [await joined_fanout(server.hub, run_id, 1, name=ws_fanout) for run_id in runs]
        assert fanouts[0] is not fanouts[1]
        frames: dict[str, list[int]] = {run_id: [] for run_id in runs}
        done: set[str] = set()
        while len(done) < 2:
            frame = await receive(ws)
            if "id" not in frame:
                continue
            frames[frame["run_id"]].append(frame["id"])
            if frame["type"] == "flow.completed":
                done.add(frame["run_id"])
    for run_id in runs:
        ids = frames[run_id]
        # The first events may have come before the accepted frame was read.
        assert ids == list(range(ids[0], server.executor.get_run(run_id).last_seq + 1))
    for fanout in fanouts:
        assert fanout.statistics().evicted == 0


async def test_socket_evicted_from_one_run_keeps_following_the_others(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    # One connection follows a run that floods it and one that talks slowly;
    # the client reads nothing until the flood is over. Its place in the
    # flood's fan-out is evicted; the other run goes on, and the flood
    # resumes on the same connection with no gap.
    floods, talks = flood(), talker(words=30, pace=40)
    server = await start_web_server(
        agent=lambda request: (floods if request.task == "flood" else talks)(request),
        buffer=16,
    )
    async with open_ws(f"{server.ws_url}/ws", rcvbuf=64 * 1024) as ws:
        ids: dict[str, str] = {}
        for task in ("talk", "flood"):
            await send(ws, {"action": "start", "task": task})
            frame = await receive(ws)
            while frame["type"] != "accepted":
                frame = await receive(ws)
            ids[task] = frame["run_id"]
        flooded = server.executor.get_run(ids["flood"])
        with trio.fail_after(10):
            assert (await flooded.wait()).status == "completed"
        got: dict[str, list[int]] = {run_id: [] for run_id in ids.values()}
        evicted = None
        talked = False
        while evicted is None or not talked:
            frame = await receive(ws)
            if "id" in frame:
                got[frame["run_id"]].append(frame["id"])
                talked = talked or (
                    frame["run_id"] == ids["talk"] and frame["type"] == "flow.completed"
                )
            elif frame["type"] == "error":
                evicted = frame
        assert (evicted["code"], evicted["run_id"]) == ("evicted", ids["flood"])
        await send(ws, {"action": "resume", "run_id": ids["flood"], "after": evicted["last_seq"]})
        rest = await until_terminal(ws, ids["flood"])
    talk = got[ids["talk"]]
    assert talk == list(range(talk[0], server.executor.get_run(ids["talk"]).last_seq + 1))
    before = got[ids["flood"]]
    assert before == list(range(before[0], evicted["last_seq"] + 1))
    after = [f["id"] for f in rest if f["run_id"] == ids["flood"]]
    assert after == list(range(evicted["last_seq"] + 1, flooded.last_seq + 1))
