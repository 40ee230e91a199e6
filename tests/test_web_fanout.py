"""The event-stream fan-out: one subscription per run, each event encoded once,
chunks written straight to the sockets under ``trioflow.web.serve``, and the
same behaviour through the ASGI ``send`` under any other server."""

from __future__ import annotations

import functools
import socket
from typing import TYPE_CHECKING, Any

import trio
from conftest import joined_fanout, start_run, talker
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.middleware.gzip import GZipMiddleware

from trioflow import Agent, ScriptedModel, StreamingFlowExecutor, Turn
from trioflow.web import WebConfig, create_app
from trioflow.web._app import direct_writes, hub_of
from trioflow.web._fanout import FanoutTarget, chunk
from trioflow.web._sse import SSE
from trioflow.web._streams import new_fanout

if TYPE_CHECKING:
    from conftest import OpenSSE, StartWebServer


def seqs(frames: list[Any]) -> list[int]:
    return [int(f.id) for f in frames]


async def test_clients_of_a_run_share_one_fanout_that_writes_to_their_sockets(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=150, pace=300))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    path = f"/runs/{run_id}/events"
    async with open_sse(server.url, path) as a, open_sse(server.url, path) as b:
        async with open_sse(server.url, path) as c:
            fanout = await joined_fanout(server.hub, run_id, 3)
            # One subscription reads the run for all three connections.
            names = [s.name for s in run.bus.statistics().subscribers]
            assert names == [f"sse fanout {run_id}"]
            assert a.headers["connection"] == "close"
            frames = [await stream.events() for stream in (a, b, c)]
    for got in frames:
        assert seqs(got) == list(range(1, run.last_seq + 1))
        assert got[-1].event == "flow.completed"
    stats = fanout.statistics()
    assert stats.direct_writes > 0
    assert stats.evicted == 0
    assert not fanout.open
    assert server.hub.fanouts() == []


async def test_a_client_joining_mid_run_with_last_event_id_gets_the_rest_once(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=120, pace=200))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    path = f"/runs/{run_id}/events"
    async with open_sse(server.url, path) as first:
        await joined_fanout(server.hub, run_id, 1)
        early = [await first.next() for _ in range(20)]
        resume_at = int([f for f in early if f is not None and f.id][-1].id)
        async with open_sse(server.url, path, headers={"Last-Event-ID": str(resume_at)}) as late:
            await joined_fanout(server.hub, run_id, 2)
            rest = await late.events()
        assert seqs(rest) == list(range(resume_at + 1, run.last_seq + 1))
        everything = await first.events()
    assert seqs(everything)[-1] == run.last_seq


async def test_under_another_asgi_server_the_stream_goes_through_send(
    nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    executor = StreamingFlowExecutor()
    app = create_app(executor, agent=talker(words=80, pace=200), config=WebConfig(port=0))
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    urls: list[str] = await nursery.start(functools.partial(hypercorn_serve, app, config))
    url = urls[0]
    run_id = await start_run(url)
    run = executor.get_run(run_id)
    async with open_sse(url, f"/runs/{run_id}/events") as stream:
        fanout = await joined_fanout(hub_of(app), run_id, 1)
        frames = await stream.events()
        assert "connection" not in stream.headers  # the server's own framing throughout
    assert seqs(frames) == list(range(1, run.last_seq + 1))
    stats = fanout.statistics()
    assert stats.direct_writes == 0
    assert stats.queued_writes > 0


def test_direct_writes_are_off_when_middleware_was_added_or_by_config() -> None:
    executor = StreamingFlowExecutor()
    app = create_app(executor)
    assert direct_writes(app)
    app.add_middleware(GZipMiddleware)
    assert not direct_writes(app)
    assert not direct_writes(create_app(executor, config=WebConfig(direct_writes=False)))


async def test_with_direct_writes_off_serve_sends_every_chunk_through_asgi(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=60, pace=200), direct_writes=False)
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
        fanout = await joined_fanout(server.hub, run_id, 1)
        frames = await stream.events()
    assert seqs(frames) == list(range(1, run.last_seq + 1))
    assert fanout.statistics().direct_writes == 0


# -- one target, against a real socket pair -----------------------------------------------


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        out += data[:size]
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]
    return bytes(out)


async def test_a_target_that_stops_reading_is_evicted_keeping_every_committed_chunk() -> None:
    # 300 events of 16 KiB to a socket whose peer never reads: the direct
    # writes fill the kernel's buffers, the rest queues past the target's
    # limit, and the target is evicted. What reaches the client is whole
    # events up to ``committed_through``, then the eviction frame.
    big = "x" * 16 * 1024
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    left.setblocking(False)
    async with StreamingFlowExecutor() as executor, trio.open_nursery() as nursery:
        agent = Agent(ScriptedModel([Turn([big] * 300, delay=0.1)]))
        run = await executor.start(agent, "flood")
        fanout = new_fanout(run, WebConfig(), SSE)
        await nursery.start(fanout.run_until_done)
        start = fanout.position
        own = trio.socket.from_stdlib_socket(left)  # the connection's one socket, as served
        target: FanoutTarget[bytes] = FanoutTarget(
            skip_through=fanout.position, limit=8, sock=own, encode=chunk
        )
        fanout.add(target)
        target.go_direct()
        with trio.fail_after(10):
            await run.wait()
            await target.wait()
        assert target.finished and not target.broken
        assert fanout.statistics().evicted == 1
        assert fanout.statistics().direct_writes > 0
        tail = b"".join(target.take())
        fanout.discard(target)  # the fan-out lets go of the socket; its owner closes it
        assert target.sock is None
        own.close()
    received = bytearray()
    right.setblocking(False)
    while True:
        try:
            part = right.recv(1 << 20)
        except BlockingIOError:
            break
        if not part:  # the target closed its end
            break
        received += part
    right.close()
    text = dechunk(bytes(received) + tail).decode("ascii")
    *blocks, last, end = text.split("\n\n")
    assert end == ""
    ids = [int(b.split("\n", 1)[0][4:]) for b in blocks]
    assert ids == list(range(start + 1, target.committed_through + 1))
    assert ids[-1] == target.committed_through < run.last_seq
    assert last.startswith("event: trioflow.error\ndata: ")
    assert f'"last_seq":{target.committed_through}' in last
