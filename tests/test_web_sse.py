"""GET /runs/{id}/events: Server-Sent Events against a real server.

Every test with a server runs both ways: the stream served on the connection
itself (``direct``, what ``serve`` does for an application without middleware),
and through Hypercorn and Starlette (``asgi``, an application with middleware).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from conftest import all_events, flood, http_client, start_run, talker
from hypothesis import given
from hypothesis import strategies as st

from trioflow import FlowEvent, StreamingFlowExecutor
from trioflow.web import ERROR_EVENT, RunRequest, create_app
from trioflow.web._app import direct_writes
from trioflow.web._sse import KEEPALIVE, encode_error, encode_event, event_name

if TYPE_CHECKING:
    from conftest import OpenSSE, SSEFrame, StartWebServer, WebServer


@pytest.fixture(params=["direct", "asgi"])
def start_web_server(
    request: pytest.FixtureRequest, start_web_server: StartWebServer
) -> StartWebServer:
    """``conftest.start_web_server``, once as ``serve`` serves an event stream
    itself, once through the ASGI path (with a pass-through middleware)."""
    if request.param == "direct":
        return start_web_server
    return functools.partial(start_web_server, through_asgi=True)


def is_retry(frame: SSEFrame | None) -> bool:
    return frame is not None and (frame.retry, frame.data, frame.id) == ("3000", None, None)


def seqs(frames: list[SSEFrame]) -> list[int]:
    return [int(f.id or 0) for f in frames]


# -- framing -------------------------------------------------------------------------


async def test_stream_replays_then_goes_live_and_ends_after_the_terminal_event(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=30, pace=300))
    run_id = await start_run(server)
    async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        # Served on the connection itself, the stream closes it at its end.
        direct = direct_writes(server.app)
        assert stream.headers.get("connection") == ("close" if direct else None)
        assert is_retry(await stream.next())
        frames = await stream.events()
    assert seqs(frames) == list(range(1, len(frames) + 1))
    assert frames[0].event == "flow.started"
    assert frames[-1].event == "flow.completed"
    assert frames[-1].json()["data"]["output"] == " ".join(f"w{i}" for i in range(30))
    assert all(f.json()["run_id"] == run_id for f in frames)


async def test_frames_are_exactly_the_events_sse_encoding(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        run_id = await start_run(web_server)
        events = await all_events(web_server.executor, run_id)
        response = await http.get(f"/runs/{run_id}/events")
    assert response.text == "retry: 3000\n\n" + "".join(e.to_sse() for e in events)


def test_error_events_are_renamed_so_a_browser_can_tell_them_from_connection_errors() -> None:
    event = dataclasses.replace(FlowEvent.error("boom", run_id="r"), seq=4)
    assert encode_event(event) == f"id: 4\nevent: run.error\ndata: {event.to_json()}\n\n"
    assert event_name("error") == "run.error"
    assert event_name("open") == "run.open"
    assert event_name("token.received") == "token.received"
    token = dataclasses.replace(FlowEvent.token("hi"), seq=5)
    assert encode_event(token) == token.to_sse()
    assert encode_error("evicted", "m", last_seq=3) == (
        f'event: {ERROR_EVENT}\ndata: {{"code":"evicted","message":"m","last_seq":3}}\n\n'
    )


@given(
    type=st.sampled_from(["error", "open", "token.received", "trade.executed"]),
    text=st.text(),
    seq=st.integers(min_value=1, max_value=2**40),
)
def test_a_frame_decodes_back_to_its_event(type: str, text: str, seq: int) -> None:
    event = FlowEvent(type, {"text": text, "lines": "a\nb\r\nc"}, 1.5, seq, "run_1")
    frame = encode_event(event)
    assert frame.endswith("\n\n") and frame.count("\n") == 4
    fields = dict(line.split(": ", 1) for line in frame[:-2].split("\n"))
    assert fields["id"] == str(seq)
    assert fields["event"] == event_name(type)
    assert FlowEvent.from_json(fields["data"]) == event


async def test_keepalive_comment_fills_silences(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=3, delay=0.3), keepalive=0.05)
    run_id = await start_run(server)
    keepalives = 0
    async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
        while (frame := await stream.next()) is not None:
            if frame.comments:
                assert frame.comments == ["keepalive"]
                assert (frame.id, frame.event, frame.data) == (None, None, None)
                keepalives += 1
    assert keepalives >= 2
    assert KEEPALIVE in stream.raw
    assert stream.raw.endswith("}\n\n")  # the terminal event is last


async def test_ready_events_are_written_in_one_send() -> None:
    # At the ASGI level, to count the messages: a finished run's 29 events go
    # out in one body message, with ``retry:`` first.
    async with StreamingFlowExecutor() as executor:
        app = create_app(executor, agent=talker(words=20))
        run = await executor.start(talker(words=20)(RunRequest("hi")), "hi")
        await run.wait()
        messages: list[dict[str, Any]] = []
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await trio.sleep_forever()
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": f"/runs/{run.run_id}/events",
            "raw_path": f"/runs/{run.run_id}/events".encode(),
            "query_string": b"",
            "headers": [(b"host", b"localhost")],
            "scheme": "http",
            "server": ("test", 80),
            "root_path": "",
            "http_version": "1.1",
            "asgi": {"version": "3.0", "spec_version": "2.1"},
        }
        await app(scope, receive, send)
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    assert [b["more_body"] for b in bodies] == [False]
    assert bodies[0]["body"].startswith(b"retry: 3000\n\nid: 1\n")
    assert bodies[0]["body"].count(b"\nevent: ") == run.last_seq == 29


# -- resuming --------------------------------------------------------------------------


async def test_resume_after_a_forced_disconnect_mid_run_is_gapless(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=100, pace=200))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    seen: list[int] = []
    async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
        while len(seen) < 15:
            frame = await stream.next()
            assert frame is not None
            if frame.id is not None:
                seen.append(int(frame.id))
    assert not run.done  # the connection dropped mid-run
    headers = {"Last-Event-ID": str(seen[-1])}
    async with open_sse(server.url, f"/runs/{run_id}/events", headers=headers) as stream:
        frames = await stream.events()
    seen += seqs(frames)
    assert seen == list(range(1, run.last_seq + 1))
    assert frames[-1].event == "flow.completed"
    assert run.status == "completed"  # on_disconnect: continue (the default)


async def test_after_parameter_resumes_and_last_event_id_wins(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        run_id = await start_run(web_server)
        await web_server.executor.get_run(run_id).wait()
        by_query = await http.get(f"/runs/{run_id}/events", params={"after": 20})
        by_header = await http.get(
            f"/runs/{run_id}/events?after=3", headers={"Last-Event-ID": "25"}
        )

    def ids(text: str) -> list[int]:
        return [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]

    assert ids(by_query.text) == list(range(21, 30))
    assert ids(by_header.text) == list(range(26, 30))


async def test_resuming_a_finished_run_at_its_end_is_204(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        run_id = await start_run(web_server, "hi")
        run = web_server.executor.get_run(run_id)
        await run.wait()
        response = await http.get(
            f"/runs/{run_id}/events", headers={"Last-Event-ID": str(run.last_seq)}
        )
    assert response.status_code == 204
    assert response.content == b""


async def test_a_stale_id_gets_a_history_expired_error_event_not_a_gap(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(history=8)
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    await run.wait()
    headers = {"Last-Event-ID": "2"}
    async with open_sse(server.url, f"/runs/{run_id}/events", headers=headers) as stream:
        assert stream.status == 200
        assert is_retry(await stream.next())
        frames = await stream.events()
    assert len(frames) == 1
    error = frames[0]
    assert error.event == ERROR_EVENT
    assert error.id is None  # the client's Last-Event-ID stays where it was
    assert error.json() == {
        "code": "history_expired",
        "message": error.json()["message"],
        "requested": 2,
        "first_available": run.last_seq - 7,
    }


# -- disconnects and slow clients ---------------------------------------------------------


async def test_a_slow_client_is_evicted_and_resumes_without_a_gap(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    # 400 events of 32 KiB: far more than the socket buffers hold, so the
    # server's writes stall while the client does not read, and its 4-event
    # buffer overflows. The run must not wait for the client.
    server = await start_web_server(agent=flood(), buffer=4)
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    path = f"/runs/{run_id}/events"
    async with open_sse(server.url, path, rcvbuf=64 * 1024) as stream:
        assert is_retry(await stream.next())
        first = await stream.next()  # flow.started: connected before the flood
        assert first is not None and first.id == "1"
        with trio.fail_after(10):
            result = await run.wait()  # the flood ends while the client reads nothing
        assert result.status == "completed"
        frames = [first, *await stream.events()]
    error = frames.pop()
    assert error.event == ERROR_EVENT
    assert error.id is None
    assert error.json()["code"] == "evicted"
    last_seq = error.json()["last_seq"]
    assert last_seq < run.last_seq
    seen = seqs(frames)
    assert seen == list(range(1, last_seq + 1))
    headers = {"Last-Event-ID": str(last_seq)}
    async with open_sse(server.url, path, headers=headers) as stream:
        rest = await stream.events()
    seen += seqs(rest)
    assert seen == list(range(1, run.last_seq + 1))
    assert rest[-1].event == "flow.completed"
