"""Event streams served on the connection itself (``trioflow.web._direct``), compared
with the same application served through Hypercorn and Starlette; frames encoded
once per run (``FrameCache``); one descriptor per connection."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from conftest import http_client, start_run, talker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioflow import FlowEvent
from trioflow.history import HistoryExpired, MemoryHistory
from trioflow.web._app import direct_writes
from trioflow.web._direct import parse_head
from trioflow.web._sse import SSE, encode_event
from trioflow.web._streams import FrameCache, frame_cache

if TYPE_CHECKING:
    from conftest import OpenSSE, StartWebServer, WebServer

TOKEN = "s3cret-token"


async def both(start_web_server: StartWebServer, **options: Any) -> tuple[WebServer, WebServer]:
    """The same application twice: served directly, and through the ASGI path."""
    direct = await start_web_server(**options)
    asgi = await start_web_server(through_asgi=True, **options)
    assert direct_writes(direct.app) and not direct_writes(asgi.app)
    return direct, asgi


def essentials(response: httpx.Response, run_id: str) -> tuple[Any, ...]:
    body = response.text.replace(run_id, "RUN")
    headers = {
        name: response.headers.get(name)
        for name in ("content-type", "cache-control", "www-authenticate", "retry-after")
    }
    return response.status_code, body, headers


async def test_every_answer_before_the_stream_is_the_same_both_ways(
    start_web_server: StartWebServer,
) -> None:
    servers = await both(start_web_server, token=TOKEN)
    answers: list[list[tuple[Any, ...]]] = []
    for server in servers:
        run_id = await start_run(server, "hi", token=TOKEN)
        run = server.executor.get_run(run_id)
        await run.wait()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        events = f"/runs/{run_id}/events"
        async with http_client(server) as http:
            got = [
                await http.get(events),  # no token
                await http.get(events, params={"token": "wrong"}),
                await http.get(events, headers={**auth, "Host": "rebind.evil"}),
                await http.get("/runs/run_nope/events", headers=auth),
                await http.get(events, headers={**auth, "Last-Event-ID": "abc"}),
                await http.get(events, headers=auth, params={"after": "-1"}),
                await http.get(events, headers=auth, params={"after": "999"}),
                await http.get(events, headers={**auth, "Last-Event-ID": str(run.last_seq)}),
            ]
            stream = await http.get(events, headers=auth, params={"after": str(run.last_seq - 1)})
        assert stream.status_code == 200
        assert stream.text.endswith("\n\n")
        answers.append([essentials(r, run_id) for r in got])
    direct, asgi = answers
    for d, a in zip(direct, asgi, strict=True):
        assert d == a, (d, a)
    assert [a[0] for a in direct] == [401, 401, 403, 404, 400, 400, 400, 204]


async def test_direct_streams_say_connection_close_and_other_requests_keep_alive(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=10))
    run_id = await start_run(server)
    await server.executor.get_run(run_id).wait()
    async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
        assert stream.headers["connection"] == "close"
        assert stream.headers["transfer-encoding"] == "chunked"
        frames = await stream.events()
    assert frames[-1].event == "flow.completed"
    # Other requests go to Hypercorn, on a connection that stays open; an event
    # stream as a later request on it is served there too (through ASGI).
    async with http_client(server) as http:
        first = await http.get("/healthz")
        listing = await http.get("/runs")
        later = await http.get(f"/runs/{run_id}/events")
        again = await http.get("/healthz")
    assert first.status_code == listing.status_code == again.status_code == 200
    assert later.status_code == 200
    assert later.text.count("event: ") == int(frames[-1].id or 0)
    assert "connection" not in later.headers


async def test_the_access_log_has_the_same_line_both_ways(
    start_web_server: StartWebServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioflow.web.access")
    lines = []
    for server in await both(start_web_server, access_log=True, agent=talker(words=5)):
        run_id = await start_run(server)
        await server.executor.get_run(run_id).wait()
        caplog.clear()
        async with http_client(server) as http:
            response = await http.get(f"/runs/{run_id}/events", headers={"User-Agent": "t/1"})
        assert response.status_code == 200
        await server.hub.wait_watchers(run_id, 0)  # the stream is over: its line is written
        records = [r.getMessage() for r in caplog.records if r.name == "trioflow.web.access"]
        assert len(records) == 1, records
        lines.append(records[0].split(" ", 5)[5].replace(run_id, "RUN"))  # after the time
    assert lines[0] == lines[1]
    assert lines[0].startswith('"GET /runs/RUN/events 1.1" 200 ')


async def test_a_late_joiner_gets_byte_identical_frames_encoded_once(
    start_web_server: StartWebServer, open_sse: OpenSSE, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trioflow.web._sse as sse

    encoded = 0
    encode = sse.SSE.event

    def counting(event: FlowEvent) -> bytes:
        nonlocal encoded
        encoded += 1
        return encode(event)

    counted = dataclasses.replace(sse.SSE, event=counting)
    monkeypatch.setattr(sse, "SSE_FORMAT", dataclasses.replace(sse.SSE_FORMAT, encoding=counted))
    server = await start_web_server(agent=talker(words=40, pace=400))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    path = f"/runs/{run_id}/events"
    async with open_sse(server.url, path) as live:
        await live.events()
        await run.wait()
    late = []
    for after in (0, 0, 17):
        async with open_sse(server.url, f"{path}?after={after}") as stream:
            await stream.events()
            late.append(stream.raw)
    assert late[0] == late[1] == live.raw
    assert late[2] == "retry: 3000\n\n" + "".join(
        frame_cache(run, server.hub, SSE).get(seq).decode()  # type: ignore[union-attr]
        for seq in range(18, run.last_seq + 1)
    )
    assert live.raw.endswith(encode_event(run.bus.history.snapshot(run.last_seq - 1)[0]))
    assert encoded == run.last_seq  # once each, for the live client and every replay


def test_the_frame_cache_holds_the_newest_frames_of_consecutive_seqs() -> None:
    events = [FlowEvent(type="token.received", run_id="r", seq=s) for s in range(1, 11)]
    cache = FrameCache(4, SSE.event)
    assert cache.frames(events[:3]) == [encode_event(e).encode() for e in events[:3]]
    assert (len(cache), cache.first_seq) == (3, 1)
    cache.frames(events[3:8])
    assert (len(cache), cache.first_seq) == (4, 5)  # the history's bound
    assert cache.get(4) is None and cache.get(5) == encode_event(events[4]).encode()
    held = cache.frames(events[5:8])  # all held: the very frames kept, not encoded again
    assert all(f is cache.get(e.seq) for f, e in zip(held, events[5:8], strict=True))
    assert held == [encode_event(e).encode() for e in events[5:8]]
    assert cache.frames(events[1:3]) == [encode_event(e).encode() for e in events[1:3]]
    assert cache.first_seq == 5  # older than the oldest held: encoded, not kept
    cache.frames(events[9:])  # a gap: start again there
    assert (len(cache), cache.first_seq) == (1, 10)
    assert FrameCache(0, SSE.event).frames(events[:2]) == [
        encode_event(e).encode() for e in events[:2]
    ]
    assert len(FrameCache(0, SSE.event)) == 0


async def test_the_frame_cache_never_serves_what_the_history_no_longer_holds(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    # The cache is bounded like the history (8), and a resume from before the
    # history still fails with history_expired: the cache is asked only for
    # events the run's subscription delivered.
    server = await start_web_server(history=8, agent=talker(words=20))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    await run.wait()
    path = f"/runs/{run_id}/events"
    async with open_sse(server.url, f"{path}?after={run.last_seq - 8}") as stream:
        frames = await stream.events()
    cache = frame_cache(run, server.hub, SSE)
    assert (cache.capacity, len(cache), cache.first_seq) == (8, 8, run.last_seq - 7)
    assert [int(f.id or 0) for f in frames] == list(range(run.last_seq - 7, run.last_seq + 1))
    history = run.bus.history
    assert isinstance(history, MemoryHistory)
    for seq in range(1, run.last_seq + 1):
        assert (cache.get(seq) is None) == (seq < history.first_seq)
    with pytest.raises(HistoryExpired):
        history.snapshot(run.last_seq - 9)
    async with open_sse(server.url, f"{path}?after={run.last_seq - 9}") as stream:
        expired = await stream.events()
    assert [f.json()["code"] for f in expired] == ["history_expired"]


def server_descriptors(port: int) -> int:
    """How many of this process's descriptors are server-side connections on ``port``.

    From ``/proc``: the sockets whose local port is ``port`` and that are
    established (not the listener), matched to descriptors by inode.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if int(local.rsplit(":", 1)[1], 16) == port and state == "01":
                    inodes.add(f"socket:[{inode}]")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") in inodes
        except OSError:
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_an_event_stream_connection_holds_one_descriptor_in_the_server(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=200, pace=20))
    run_id = await start_run(server)
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    request = f"GET /runs/{run_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    clients: list[trio.SocketStream] = []
    try:
        for _ in range(100):
            client = await trio.open_tcp_stream(host, int(port))
            clients.append(client)
            await client.send_all(request)
        with trio.fail_after(10):
            await server.hub.wait_watchers(run_id, 100)
            # Every connection caught up and written to by the fan-out directly.
            # (Polled: the fan-out has no event for its count of direct targets.)
            while not [f for f in server.hub.fanouts() if f.statistics().direct == 100]:  # noqa: ASYNC110
                await trio.sleep(0.01)
        held = server_descriptors(int(port))
    finally:
        for client in clients:
            await client.aclose()
    assert held == 100  # one each: no duplicate for the fan-out's writes


@pytest.mark.parametrize("path", ["/healthz", "/runs/{run_id}/events", "/runs/{run_id}"])
async def test_a_head_sent_byte_by_byte_is_served_either_way(
    start_web_server: StartWebServer, path: str
) -> None:
    server = await start_web_server(agent=talker(words=3))
    run_id = await start_run(server)
    await server.executor.get_run(run_id).wait()
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    head = f"GET {path.format(run_id=run_id)} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    async with await trio.open_tcp_stream(host, int(port)) as client:
        for i in range(len(head)):
            await client.send_all(head[i : i + 1])
            await trio.lowlevel.checkpoint()
        received = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in received:
                received += await client.receive_some(4096)
    assert received.startswith(b"HTTP/1.1 200 ")
    direct = path.endswith("/events")
    assert (b"\r\nconnection: close\r\n" in received.lower()) == direct


async def test_an_unexpected_error_deciding_is_a_logged_500_both_ways(
    start_web_server: StartWebServer, server_log: pytest.LogCaptureFixture
) -> None:
    answers = []
    for server in await both(start_web_server):

        def broken(run_id: str) -> Any:
            raise RuntimeError("the hub broke")

        server.hub.get = broken  # type: ignore[method-assign]
        async with http_client(server) as http:
            response = await http.get("/runs/run_x/events")
            health = await http.get("/healthz")
        answers.append(essentials(response, "run_x"))
        assert health.status_code == 200  # the server goes on
    assert answers[0] == answers[1]
    assert answers[0][0] == 500
    assert '"code":"internal_error"' in answers[0][1]
    logged = [r for r in server_log.records if r.exc_info and "the hub broke" in str(r.exc_info[1])]
    assert len(logged) >= 2


# -- joining a watched live run at once ----------------------------------------------------


async def test_a_late_joiner_to_a_watched_live_run_joins_its_fanout_with_no_subscription(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    # A run someone already watches has a fan-out: a connection joins it at
    # once, its replay served from the frames cached for the run, without a
    # subscription of its own; the bytes are those the first client got.
    server = await start_web_server(agent=talker(words=300, pace=150))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    subscriptions: list[str | None] = []
    subscribe = run.subscribe

    def counting(*args: Any, **kwargs: Any) -> Any:
        subscriptions.append(kwargs.get("name"))
        return subscribe(*args, **kwargs)

    run.subscribe = counting  # type: ignore[method-assign]
    path = f"/runs/{run_id}/events"
    with trio.fail_after(20):
        async with open_sse(server.url, path) as first:
            while (frame := await first.next()) is not None and int(frame.id or 0) < 20:
                pass
            assert frame is not None
            assert subscriptions == [f"sse {run_id}", f"sse fanout {run_id}"]
            async with (
                open_sse(server.url, path) as late,
                open_sse(server.url, f"{path}?after={frame.id}") as resumed,
            ):
                await server.hub.wait_joined(run_id, 3)
                assert subscriptions == [f"sse {run_id}", f"sse fanout {run_id}"]
                assert not run.done
                await first.events()
                await late.events()
                rest = await resumed.events()
    assert late.raw == first.raw
    assert int(rest[0].id or 0) == int(frame.id or 0) + 1
    assert rest[-1].event == "flow.completed"


async def test_a_late_joiner_beyond_the_history_of_a_watched_run_gets_history_expired(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(history=8, agent=talker(words=300, pace=150))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    path = f"/runs/{run_id}/events"
    with trio.fail_after(20):
        async with open_sse(server.url, path) as first:
            while (frame := await first.next()) is not None and int(frame.id or 0) < 20:
                pass
            assert not run.done
            async with open_sse(server.url, f"{path}?after=2") as late:
                expired = await late.events()
    assert [f.json()["code"] for f in expired] == ["history_expired"]


# -- the request head, read strictly -------------------------------------------------------

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7F), max_size=30),
    fields=st.lists(
        st.tuples(
            st.text(alphabet=_TOKEN_CHARS + " :\t", min_size=0, max_size=12),
            st.binary(max_size=16),
        ),
        max_size=5,
    ),
    host=st.sampled_from([0, 1, 2]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"http/1.1"]),
)
def test_parse_head_accepts_only_what_h11_accepts_and_agrees_with_it(
    target: str, fields: list[tuple[str, bytes]], host: int, version: bytes
) -> None:
    import h11

    lines = [b"GET /runs/" + target.encode("ascii") + b" " + version]
    lines += [b"Host: example.test"] * host
    lines += [name.encode("ascii") + b": " + value for name, value in fields]
    head = b"\r\n".join(lines)
    parsed = parse_head(head)
    if parsed is None:
        return  # Hypercorn's to answer
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"\r\n\r\n")
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert (parsed.method, parsed.target, parsed.http_version) == (
        request.method,
        request.target,
        request.http_version,
    )
    assert parsed.headers == list(request.headers)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /runs/r/events HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two",  # obsolete folding
        b"GET /runs/r/events HTTP/1.1\nHost: a",  # bare LF
        b"GET /runs/r/events HTTP/1.1\r\nAccept: */*",  # no Host
        b"GET /runs/r/events HTTP/1.1\r\nHost: a\r\nHost: b",  # two
        b"GET /runs/r/events HTTP/1.0\r\nHost: a",  # not HTTP/1.1
        b"GET /runs/r/events HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b",  # control character
        b"GET /runs/r/events HTTP/1.1\r\nHost : a",  # space before the colon
        b"GET  /runs/r/events HTTP/1.1\r\nHost: a",  # two spaces
    ],
)
def test_parse_head_leaves_every_odd_head_to_hypercorn(head: bytes) -> None:
    assert parse_head(head) is None


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /runs/{run_id}/events HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),  # no Host
        (b"GET /runs/{run_id}/events HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /runs/{run_id}/events HTTP/1.0\r\nHost: {host}\r\n\r\n", 200),
        (b"GET /runs/{run_id}/events HTTP/1.1\r\nHost: {host}\r\nX: a\r\n b\r\n\r\n", 200),
    ],
)
async def test_an_odd_event_stream_head_gets_hypercorns_answer(
    start_web_server: StartWebServer, head: bytes, status: int
) -> None:
    server = await start_web_server(agent=talker(words=3))
    run_id = await start_run(server)
    await server.executor.get_run(run_id).wait()
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    request = head.replace(b"{run_id}", run_id.encode()).replace(
        b"{host}", f"{host}:{port}".encode()
    )
    async with await trio.open_tcp_stream(host, int(port)) as client:
        await client.send_all(request)
        received = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in received:
                data = await client.receive_some(4096)
                if not data:
                    break
                received += data
    assert received.startswith(b"HTTP/1.1 %d " % status), received[:80]
    assert b"\r\nserver: hypercorn-h11\r\n" in received.lower()  # not the direct path's answer
