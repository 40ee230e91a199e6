"""trioflow.client: the SSE and WebSocket clients and ``trioflow watch``.

Most tests run against a real Hypercorn server on 127.0.0.1 (the
``start_web_server`` fixture). Connections are dropped and slowed down by a
small TCP proxy between client and server; the reconnect backoff is tested
exactly on a MockClock with httpx's mock transport.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing
from conftest import all_events, post_run, talker
from hypothesis import given
from hypothesis import strategies as st

from trioflow import FlowEvent, HistoryExpired, RetryPolicy
from trioflow.cli._watch import events_url
from trioflow.client import (
    ConnectionClosed,
    ResumeExpired,
    SSEDecoder,
    StreamError,
    sse_events,
    ws_connect,
)

if TYPE_CHECKING:
    from conftest import StartWebServer, WebServer

ENV = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "TRIOFLOW_TOKEN")}


def seqs(events: list[FlowEvent]) -> list[int]:
    return [e.seq for e in events]


# -- a TCP proxy that drops and stalls connections ---------------------------------------


class Proxy:
    """Forwards 127.0.0.1 connections to ``upstream``; can drop them all or stall them."""

    def __init__(self, upstream: int, *, small_buffers: bool = False) -> None:
        self.upstream = upstream
        self.small_buffers = small_buffers
        self.port = 0
        self.requests: list[bytes] = []
        self.flowing = trio.Event()
        self.flowing.set()
        self._scopes: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop(self) -> None:
        """Close every open connection, both ways, at once."""
        for scope in self._scopes:
            scope.cancel()

    def pause(self) -> None:
        """Stop forwarding from the server to the clients (the server's sends fill up)."""
        self.flowing = trio.Event()

    def resume(self) -> None:
        self.flowing.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _connect(self) -> trio.SocketStream:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        if self.small_buffers:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await sock.connect(("127.0.0.1", self.upstream))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await self._connect()
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(client)
            raise
        index = len(self.requests)
        self.requests.append(b"")

        async def up() -> None:
            while data := await client.receive_some(65536):
                self.requests[index] += data
                await upstream.send_all(data)

        async def down() -> None:
            while True:
                await self.flowing.wait()
                data = await upstream.receive_some(4096 if self.small_buffers else 65536)
                if not data:
                    return
                await self.flowing.wait()
                await client.send_all(data)

        try:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(up)
                    nursery.start_soon(down)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._scopes.discard(scope)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(client)
                await trio.aclose_forcefully(upstream)

    def heads(self) -> list[dict[str, str]]:
        """The headers of every request through the proxy, in order (keep-alive included)."""
        heads = []
        for raw in self.requests:
            for block in raw.decode("latin-1").split("\r\n\r\n"):
                lines = block.split("\r\n")
                if lines[0].startswith("GET "):
                    fields = (line.partition(":") for line in lines[1:])
                    heads.append({k.strip().lower(): v.strip() for k, _, v in fields})
        return heads


@pytest.fixture
async def proxy_to(nursery: trio.Nursery) -> Any:
    async def start(server: WebServer, *, small_buffers: bool = False) -> Proxy:
        proxy = Proxy(int(server.url.rsplit(":", 1)[1]), small_buffers=small_buffers)
        await nursery.start(proxy.run)
        return proxy

    return start


# -- the SSE decoder -------------------------------------------------------------------------


def decode_all(chunks: list[bytes]) -> list[tuple[str, str, str]]:
    decoder = SSEDecoder()
    return [(e.event, e.data, e.id) for c in chunks for e in decoder.feed(c)]


event_strategy = st.builds(
    FlowEvent,
    type=st.sampled_from(["token.received", "tool.started", "flow.completed", "trade.executed"]),
    data=st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3),
    timestamp=st.floats(0, 2e9),
    seq=st.integers(1, 10**6),
    run_id=st.one_of(st.none(), st.text(min_size=1, max_size=10)),
)


@given(events=st.lists(event_strategy, max_size=8), cuts=st.lists(st.integers(0, 4000)))
def test_decoder_round_trips_frames_split_at_any_byte(
    events: list[FlowEvent], cuts: list[int]
) -> None:
    body = "".join(e.to_sse() for e in events).encode()
    bounds = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    chunks = [body[a:b] for a, b in itertools.pairwise(bounds)]
    decoded = decode_all(chunks)
    assert [FlowEvent.from_json(data) for _, data, _ in decoded] == events
    assert [(name, int(id)) for name, _, id in decoded] == [(e.type, e.seq) for e in events]


def test_decoder_follows_the_event_stream_spec() -> None:
    body = (
        b"\xef\xbb\xbfretry: 250\r\n"
        b": a comment\r\n\r\n"
        b"id: 7\revent: a\rdata: one\rdata:two\r\r"
        b"data: no id here\nunknown: field\n\n"
        b"id: 8\n\n"
        b"retry: soon\nevent: b\ndata\n\n"
        b"data: cut off at the end"
    )
    decoder = SSEDecoder()
    got = [(e.event, e.data, e.id) for i in range(len(body)) for e in decoder.feed(body[i : i + 1])]
    assert got == [("a", "one\ntwo", "7"), ("message", "no id here", "7"), ("b", "", "8")]
    assert decoder.retry == 250
    assert decoder.last_event_id == "8"
    assert decoder.close() == []


# -- sse_events: backoff, exactly (httpx mock transport, MockClock) -------------------------


def sse_body(events: list[FlowEvent], prefix: str = "") -> bytes:
    return (prefix + "".join(e.to_sse() for e in events)).encode()


def make_events(n: int, *, run_id: str = "r") -> list[FlowEvent]:
    events = [FlowEvent("token.received", {"token": f"t{i}"}, 1.0, i, run_id) for i in range(1, n)]
    return [*events, FlowEvent("flow.completed", {"output": "ok"}, 1.0, n, run_id)]


class Dropping(httpx.AsyncByteStream):
    """A response body that sends ``body`` and then drops the connection (or ends)."""

    def __init__(self, body: bytes, *, drop: bool = True) -> None:
        self.body = body
        self.drop = drop

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.body:
            yield self.body
        if self.drop:
            raise httpx.RemoteProtocolError("peer closed connection")


class Script:
    """A mock server: answers request ``n`` with ``responses[n]``, recording time and headers."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.calls: list[tuple[float, httpx.Headers]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((trio.current_time(), request.headers))
        await trio.lowlevel.checkpoint()
        return self.responses[len(self.calls) - 1]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self))

    def last_event_ids(self) -> list[str | None]:
        return [headers.get("last-event-id") for _, headers in self.calls]

    def times(self) -> list[float]:
        start = self.calls[0][0]
        return [round(t - start, 6) for t, _ in self.calls]


def stream_response(body: bytes, *, drop: bool = True, status: int = 200) -> httpx.Response:
    return httpx.Response(
        status, headers={"content-type": "text/event-stream"}, stream=Dropping(body, drop=drop)
    )


EXACT = RetryPolicy(attempts=4, base_delay=1.0, multiplier=2.0, jitter=0.0)


async def test_sse_reconnects_with_last_event_id_after_the_policys_delays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events = make_events(6)
    script = Script(
        stream_response(sse_body(events[:2])),  # 1, 2, then dropped
        stream_response(b""),  # dropped at once: no progress
        stream_response(sse_body(events[1:4])),  # 2 again (skipped), 3, 4, dropped
        stream_response(sse_body(events[4:]), drop=False),
    )
    async with (
        script.client() as client,
        sse_events("http://x/e", client=client, retry=EXACT) as ev,
    ):
        got = [e async for e in ev]
    assert got == events
    assert script.last_event_ids() == [None, "2", "2", "4"]
    # 1 s before the first retry, 2 s before the second in a row; progress resets the count.
    assert script.times() == [0.0, 1.0, 3.0, 4.0]
    assert ev.reconnects == 3
    assert ev.terminal == events[-1]


async def test_sse_servers_retry_field_is_the_shortest_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events = make_events(2)
    script = Script(
        stream_response(sse_body(events[:1], prefix="retry: 5000\n\n")),
        stream_response(sse_body(events[1:]), drop=False),
    )
    async with (
        script.client() as client,
        sse_events("http://x/e", client=client, retry=EXACT) as ev,
    ):
        assert [e async for e in ev] == events
    assert script.times() == [0.0, 5.0]


async def test_sse_gives_up_after_the_attempts_without_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script(*[stream_response(b"") for _ in range(4)])
    async with (
        script.client() as client,
        sse_events("http://x/e", client=client, retry=EXACT) as ev,
    ):
        with pytest.raises(trio.BrokenResourceError, match="4 time") as info:
            await ev.receive()
        assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
        with pytest.raises(trio.BrokenResourceError):
            await ev.receive()
    assert script.times() == [0.0, 1.0, 3.0, 7.0]


async def test_sse_without_resume_raises_on_a_dropped_connection() -> None:
    script = Script(stream_response(sse_body(make_events(3)[:1])))
    async with (
        script.client() as client,
        sse_events("http://x/e", client=client, resume=False) as ev,
    ):
        assert (await ev.receive()).seq == 1
        with pytest.raises(trio.BrokenResourceError, match="resume is off"):
            await ev.receive()
    assert len(script.calls) == 1


async def test_sse_retries_503_after_its_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events = make_events(1)
    script = Script(
        httpx.Response(503, headers={"retry-after": "7"}, json={"error": {"code": "unavailable"}}),
        stream_response(sse_body(events), drop=False),
    )
    async with (
        script.client() as client,
        sse_events("http://x/e", client=client, retry=EXACT) as ev,
    ):
        assert [e async for e in ev] == events
    assert script.times() == [0.0, 7.0]


async def test_sse_refusal_raises_stream_error_without_retrying() -> None:
    script = Script(
        httpx.Response(401, json={"error": {"code": "unauthorized", "message": "token!"}})
    )
    async with script.client() as client, sse_events("http://x/e", client=client) as ev:
        with pytest.raises(StreamError) as info:
            await ev.receive()
    assert (info.value.status, info.value.code, info.value.message) == (
        401,
        "unauthorized",
        "token!",
    )
    assert len(script.calls) == 1


async def test_sse_cancelled_read_loses_no_event(autojump_clock: trio.testing.MockClock) -> None:
    events = make_events(3)

    class Slow(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield sse_body(events[:1])
            await trio.sleep(10)
            yield sse_body(events[1:])

    script = Script(
        httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Slow()),
        stream_response(sse_body(events[1:]), drop=False),
    )
    async with (
        script.client() as client,
        sse_events("http://x/e", client=client, retry=EXACT) as ev,
    ):
        assert (await ev.receive()).seq == 1
        with trio.move_on_after(1):
            await ev.receive()
        assert [e.seq async for e in ev] == [2, 3]
    assert script.last_event_ids() == [None, "1"]


def test_sse_events_rejects_a_bad_after() -> None:
    with pytest.raises(ValueError, match="after"):
        sse_events("http://x/e", after=-1)
    with pytest.raises(ValueError, match="after"):
        sse_events("http://x/e?after=soon")


# -- sse_events against the server -------------------------------------------------------------


async def test_sse_events_follows_a_run_from_start_to_terminal_event(
    web_server: WebServer,
) -> None:
    info = (await post_run(web_server)).json()
    async with sse_events(info["events_url"]) as events:
        got = [event async for event in events]
        with pytest.raises(trio.EndOfChannel):
            await events.receive()
    assert got == await all_events(web_server.executor, info["run_id"])
    assert got[0].type == "flow.started"
    assert got[-1].type == "flow.completed" and got[-1].data["output"] == "25 * 4 = 100."
    assert seqs(got) == list(range(1, len(got) + 1))
    assert events.reconnects == 0


async def test_sse_events_after_starts_after_that_event(web_server: WebServer) -> None:
    info = (await post_run(web_server)).json()
    everything = await all_events(web_server.executor, info["run_id"])
    async with sse_events(info["events_url"], after=5) as events:
        assert [e async for e in events] == everything[5:]
    async with sse_events(info["events_url"] + "?after=7") as events:
        assert [e async for e in events] == everything[7:]


async def test_sse_events_of_a_finished_run_resumed_at_its_end_is_empty(
    web_server: WebServer,
) -> None:
    info = (await post_run(web_server)).json()
    last = (await all_events(web_server.executor, info["run_id"]))[-1].seq
    async with sse_events(info["events_url"], after=last) as events:
        assert [e async for e in events] == []
        assert events.terminal is None


async def test_sse_resumes_gapless_after_the_connection_drops_mid_run(
    start_web_server: StartWebServer, proxy_to: Any
) -> None:
    server = await start_web_server(agent=talker(words=40, pace=100), retry=0.01)
    proxy: Proxy = await proxy_to(server)
    info = (await post_run(server)).json()
    url = f"{proxy.url}/runs/{info['run_id']}/events"
    got: list[FlowEvent] = []
    async with sse_events(url) as events:
        async for event in events:
            got.append(event)
            if event.seq == 5:
                proxy.drop()
    assert got == await all_events(server.executor, info["run_id"])
    assert seqs(got) == list(range(1, len(got) + 1))
    assert events.reconnects >= 1
    heads = proxy.heads()
    assert len(heads) == events.reconnects + 1
    assert "last-event-id" not in heads[0]
    assert int(heads[1]["last-event-id"]) >= 5


async def test_sse_client_evicted_for_falling_behind_resumes_gapless(
    start_web_server: StartWebServer, proxy_to: Any
) -> None:
    server = await start_web_server(agent=talker(words=600, delay=0.2), buffer=4, retry=0.01)
    proxy: Proxy = await proxy_to(server, small_buffers=True)
    proxy.pause()
    info = (await post_run(server)).json()
    run = server.executor.get_run(info["run_id"])
    got: list[FlowEvent] = []

    async def consume() -> None:
        async with sse_events(f"{proxy.url}/runs/{run.run_id}/events") as events:
            got.extend([e async for e in events])
        assert events.reconnects >= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await run.wait()  # every event was emitted while the client could not read
        assert server.hub.executor.get_run(run.run_id).done
        proxy.resume()
    assert got == await all_events(server.executor, run.run_id)
    assert len(got) > 600
    assert int(proxy.heads()[1]["last-event-id"]) > 0


async def test_sse_unknown_run_raises_stream_error_404(web_server: WebServer) -> None:
    async with sse_events(f"{web_server.url}/runs/nope/events") as events:
        with pytest.raises(StreamError) as info:
            await events.receive()
    assert (info.value.status, info.value.code) == (404, "run_not_found")


async def test_sse_needs_the_servers_token(start_web_server: StartWebServer) -> None:
    server = await start_web_server(token="s3cret")
    info = (await post_run(server)).json()
    async with sse_events(info["events_url"]) as events:
        with pytest.raises(StreamError) as refused:
            await events.receive()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    async with sse_events(info["events_url"], token="s3cret") as events:
        assert [e async for e in events][-1].type == "flow.completed"


async def test_sse_resume_older_than_the_history_raises_resume_expired(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=30), history=10)
    info = (await post_run(server)).json()
    await server.executor.get_run(info["run_id"]).wait()
    async with sse_events(info["events_url"], after=1) as events:
        with pytest.raises(ResumeExpired) as info_:
            await events.receive()
    error = info_.value
    assert isinstance(error, HistoryExpired) and isinstance(error, StreamError)
    assert error.code == "history_expired"
    assert error.requested == 1
    assert error.first_available > 2


# -- ws_connect -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("ws_path")
async def test_ws_run_socket_streams_the_run_and_closes_normally(web_server: WebServer) -> None:
    info = (await post_run(web_server)).json()
    async with ws_connect(info["ws_url"]) as conn:
        assert conn.run_id == info["run_id"]
        got = [event async for event in conn]
        assert conn.closed is not None and conn.closed.code == 1000
        with pytest.raises(ConnectionClosed):
            await conn.receive()
    assert got == await all_events(web_server.executor, info["run_id"])


@pytest.mark.usefixtures("ws_path")
async def test_ws_starts_and_follows_several_runs_on_one_connection(
    web_server: WebServer,
) -> None:
    results: dict[str, list[FlowEvent]] = {}
    async with ws_connect(f"{web_server.ws_url}/ws") as conn:
        ids = [await conn.start("What is 25 * 4?"), await conn.start("What is 7 times 6?")]

        async def follow(run_id: str) -> None:
            results[run_id] = [e async for e in conn.run_events(run_id)]

        async with trio.open_nursery() as nursery:
            for run_id in ids:
                nursery.start_soon(follow, run_id)
        assert conn.closed is None
    assert len(set(ids)) == 2
    for run_id in ids:
        assert results[run_id] == await all_events(web_server.executor, run_id)
    assert results[ids[1]][-1].data["output"] == "7 * 6 = 42."


@pytest.mark.usefixtures("ws_path")
async def test_ws_cancel_ends_the_run_with_flow_cancelled(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=1000, pace=50))
    async with ws_connect(f"{server.ws_url}/ws") as conn:
        run_id = await conn.start("talk")
        async for event in conn.run_events(run_id):
            if event.type == "token.received":
                await conn.cancel(run_id)
        assert event.type == "flow.cancelled"
        await conn.cancel(run_id)  # finished already: nothing happens
        with pytest.raises(ValueError, match="run_id"):
            await conn.cancel()
    info = (await post_run(server)).json()
    async with ws_connect(info["ws_url"]) as conn:
        await conn.cancel()
        assert [e async for e in conn][-1].type == "flow.cancelled"


@pytest.mark.usefixtures("ws_path")
async def test_ws_refused_start_raises_stream_error(web_server: WebServer) -> None:
    async with ws_connect(f"{web_server.ws_url}/ws") as conn:
        with pytest.raises(StreamError) as info:
            await conn.start(" ")
        assert info.value.code == "invalid_request"
        assert conn.closed is None
    info_ = (await post_run(web_server)).json()
    async with ws_connect(info_["ws_url"]) as conn:
        with pytest.raises(StreamError) as refused:
            await conn.start("What is 1 + 1?")
    assert refused.value.code == "unknown_action"


@pytest.mark.usefixtures("ws_path")
async def test_ws_error_frame_raises_stream_error_and_the_connection_goes_on(
    web_server: WebServer,
) -> None:
    async with ws_connect(f"{web_server.ws_url}/ws") as conn:
        await conn.send_raw("not json")
        with pytest.raises(StreamError) as bad:
            await conn.receive()
        assert bad.value.code == "invalid_json"
        await conn.resume(0, run_id="no-such-run")
        with pytest.raises(StreamError) as missing:
            await conn.receive()
        assert missing.value.code == "run_not_found"
        run_id = await conn.start("What is 25 * 4?")
        assert [e async for e in conn.run_events(run_id)][-1].type == "flow.completed"


@pytest.mark.usefixtures("ws_path")
async def test_ws_resume_follows_a_run_after_an_event(web_server: WebServer) -> None:
    info = (await post_run(web_server)).json()
    everything = await all_events(web_server.executor, info["run_id"])
    async with ws_connect(f"{web_server.ws_url}/ws") as conn:
        await conn.resume(10, run_id=info["run_id"])
        assert [e async for e in conn.run_events(info["run_id"])] == everything[10:]
        assert conn.last_seq(info["run_id"]) == everything[-1].seq


@pytest.mark.usefixtures("ws_path")
async def test_ws_handshake_refusal_raises_stream_error(start_web_server: StartWebServer) -> None:
    server = await start_web_server(token="s3cret")
    with pytest.raises(StreamError) as unauthorized:
        async with ws_connect(f"{server.ws_url}/ws"):
            pass  # pragma: no cover
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    with pytest.raises(StreamError) as missing:
        async with ws_connect(f"{server.ws_url}/runs/nope/ws", token="s3cret"):
            pass  # pragma: no cover
    assert (missing.value.status, missing.value.code) == (404, "run_not_found")
    async with ws_connect(f"{server.url}/ws", token="s3cret") as conn:  # http:// works too
        run_id = await conn.start("What is 25 * 4?")
        assert [e async for e in conn.run_events(run_id)][-1].type == "flow.completed"


@pytest.mark.usefixtures("ws_path")
async def test_ws_evicted_connection_resumes_gapless(
    start_web_server: StartWebServer, proxy_to: Any
) -> None:
    server = await start_web_server(agent=talker(words=600, delay=0.5), buffer=4)
    proxy: Proxy = await proxy_to(server, small_buffers=True)
    info = (await post_run(server)).json()
    run = server.executor.get_run(info["run_id"])
    async with ws_connect(f"ws://127.0.0.1:{proxy.port}/runs/{run.run_id}/ws") as conn:
        first = await conn.receive()  # streaming has begun; the tokens follow in 0.5 s
        proxy.pause()
        await run.wait()  # every token was emitted while the client could not read
        proxy.resume()
        got = [first, *[e async for e in conn]]
    assert got == await all_events(server.executor, run.run_id)
    assert len(got) > 600


@pytest.mark.usefixtures("ws_path")
async def test_ws_eviction_without_resume_raises_stream_error(
    start_web_server: StartWebServer, proxy_to: Any
) -> None:
    server = await start_web_server(agent=talker(words=600, delay=0.5), buffer=4)
    proxy: Proxy = await proxy_to(server, small_buffers=True)
    info = (await post_run(server)).json()
    run = server.executor.get_run(info["run_id"])
    async with ws_connect(
        f"ws://127.0.0.1:{proxy.port}/runs/{run.run_id}/ws", resume=False
    ) as conn:
        await conn.receive()
        proxy.pause()
        await run.wait()
        proxy.resume()
        with pytest.raises(StreamError) as info_:
            async for _ in conn:
                pass
        assert conn.closed is None  # the connection stays open
    assert info_.value.code == "evicted"
    assert info_.value.data["last_seq"] == conn.last_seq(run.run_id)
    assert conn.last_seq(run.run_id) < run.last_seq


async def test_ws_connect_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="WebSocket URL"):
        async with ws_connect("ftp://127.0.0.1/ws"):
            pass  # pragma: no cover


# -- trioflow watch ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "run", "expected"),
    [
        ("http://h:1/runs/r1/events", None, "http://h:1/runs/r1/events"),
        ("http://h:1/runs/r1", None, "http://h:1/runs/r1/events"),
        ("http://h:1/runs/r1/", "r1", "http://h:1/runs/r1/events"),
        ("http://h:1", "r1", "http://h:1/runs/r1/events"),
        ("https://h/api/", "r 1", "https://h/api/runs/r%201/events"),
        ("http://h:1/runs/r1/events?token=t", None, "http://h:1/runs/r1/events?token=t"),
        ("ws://h:1/runs/r1/ws", None, "ws://h:1/runs/r1/ws"),
        ("http://h:1/runs/r1/ws", None, "ws://h:1/runs/r1/ws"),
        ("ws://h:1/ws", "r1", "ws://h:1/runs/r1/ws"),
    ],
)
def test_watch_url_forms(url: str, run: str | None, expected: str) -> None:
    assert events_url(url, run) == expected


@pytest.mark.parametrize(
    ("url", "run", "message"),
    [
        ("http://h:1", None, "names no run"),
        ("http://h:1/runs/r1", "r2", "r2"),
        ("ftp://h/runs/r1", None, "not an http"),
    ],
)
def test_watch_url_errors(url: str, run: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        events_url(url, run)


async def watch(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "trioflow", "watch", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=ENV,
        )


async def test_watch_json_prints_exactly_the_runs_events(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=30, pace=100))
    info = (await post_run(server)).json()
    proc = await watch(info["url"], "--json")
    assert proc.returncode == 0, proc.stderr
    expected = [e.to_json() for e in await all_events(server.executor, info["run_id"])]
    assert proc.stdout.decode().splitlines() == expected


async def test_watch_over_a_websocket_with_server_url_and_run(web_server: WebServer) -> None:
    info = (await post_run(web_server)).json()
    proc = await watch(web_server.ws_url, "--run", info["run_id"], "--json", "--after", "3")
    assert proc.returncode == 0, proc.stderr
    expected = [e.to_json() for e in await all_events(web_server.executor, info["run_id"])][3:]
    assert proc.stdout.decode().splitlines() == expected


async def test_watch_plain_shows_the_answer_and_exit_status(web_server: WebServer) -> None:
    info = (await post_run(web_server)).json()
    proc = await watch(web_server.url, "--run", info["run_id"], "--plain")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.decode()
    assert "calculator" in out and "25 * 4 = 100." in out and "completed in" in out


async def test_watch_exits_1_for_a_cancelled_run(start_web_server: StartWebServer) -> None:
    server = await start_web_server(agent=talker(words=100, pace=20))
    info = (await post_run(server)).json()
    server.executor.get_run(info["run_id"]).cancel("stop")
    proc = await watch(info["events_url"], "--json")
    assert proc.returncode == 1
    assert FlowEvent.from_json(proc.stdout.decode().splitlines()[-1]).type == "flow.cancelled"


async def test_watch_reports_refusals_and_bad_usage(start_web_server: StartWebServer) -> None:
    server = await start_web_server(token="s3cret")
    info = (await post_run(server)).json()
    refused = await watch(info["url"])
    assert refused.returncode == 1
    assert b"--token" in refused.stderr
    allowed = await watch(info["url"], "--token", "s3cret", "--json")
    assert allowed.returncode == 0, allowed.stderr
    missing = await watch(server.url, "--token", "s3cret")
    assert missing.returncode == 2
    assert b"names no run" in missing.stderr


async def test_watch_ctrl_c_stops_watching_with_130_and_the_run_goes_on(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=1000, pace=20))
    info = (await post_run(server)).json()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioflow", "watch", info["url"], "--json"],
        stdout=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None
    with trio.fail_after(30):
        output = b""
        while b"token.received" not in output:
            output += await proc.stdout.receive_some()
        proc.send_signal(signal.SIGINT)
        assert await proc.wait() == 130
    assert not server.executor.get_run(info["run_id"]).done
    await proc.stdout.aclose()


@pytest.fixture(autouse=True)
def _no_proxy_env() -> Iterator[None]:
    """Talk to 127.0.0.1 directly, whatever proxy the environment configures."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower().endswith("_proxy")}
    yield
    os.environ.update(saved)


def test_stream_error_from_payload_shapes() -> None:
    nested = StreamError.from_payload({"error": {"code": "x", "message": "m"}}, status=400)
    assert (nested.code, nested.message, nested.status) == ("x", "m", 400)
    flat = StreamError.from_payload({"code": "y", "message": "n"})
    assert (flat.code, flat.message, flat.status) == ("y", "n", None)
    text = StreamError.from_payload("boom", status=500)
    assert (text.code, text.message) == ("http_500", "boom")
    expired = StreamError.from_payload(
        {"code": "history_expired", "message": "gone", "requested": 3, "first_available": 9}
    )
    assert isinstance(expired, ResumeExpired)
    assert (expired.requested, expired.first_available) == (3, 9)
    assert json.dumps(dict(expired.data))
