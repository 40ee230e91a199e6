"""WebSockets served on the connection itself (``trioflow.web._direct_ws``), compared with
the same application served through Hypercorn, wsproto and Starlette; the framing
spoken with raw sockets (ping, fragments, close codes); one descriptor per connection;
frames encoded once per run; a client that keeps up is never evicted."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import joined_fanout, start_run, talker
from test_web_direct import both, server_descriptors

if TYPE_CHECKING:
    from conftest import StartWebServer, WebServer

TOKEN = "s3cret-token"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # of KEY: the example of RFC 6455, 1.3

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def address(server: WebServer) -> tuple[str, int]:
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def handshake(server: WebServer, path: str, **headers: str) -> bytes:
    host, port = address(server)
    fields = {
        "Host": f"{host}:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        **headers,
    }
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items() if v]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """A client's frame (masked unless told not to)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", (0x80 if fin else 0) | rsv | opcode, (0x80 if mask else 0) | size)
    elif size < 1 << 16:
        head = struct.pack(
            "!BBH", (0x80 if fin else 0) | rsv | opcode, (0x80 if mask else 0) | 126, size
        )
    else:
        head = struct.pack(
            "!BBQ", (0x80 if fin else 0) | rsv | opcode, (0x80 if mask else 0) | 127, size
        )
    if not mask:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawSocket:
    """A WebSocket client on a raw TCP stream: frames as sent, frames as received."""

    def __init__(self, stream: trio.SocketStream, received: bytes) -> None:
        self.stream = stream
        self.received = bytearray(received)
        self.everything = bytes(received)
        """Every byte the server sent after its handshake's answer."""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self, size: int) -> None:
        while len(self.received) < size:
            with trio.fail_after(5):
                data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError
            self.received += data
            self.everything += data

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the server, ``(opcode, payload)`` (unmasked, final)."""
        await self._fill(2)
        first, size = self.received[0], self.received[1]
        assert first & 0x80 and not self.received[1] & 0x80  # final, unmasked
        offset = 2
        if size == 126:
            await self._fill(4)
            (size,) = struct.unpack_from("!H", self.received, 2)
            offset = 4
        elif size == 127:
            await self._fill(10)
            (size,) = struct.unpack_from("!Q", self.received, 2)
            offset = 10
        await self._fill(offset + size)
        payload = bytes(self.received[offset : offset + size])
        del self.received[: offset + size]
        return first & 0x0F, payload

    async def message(self) -> dict[str, Any]:
        """The next text frame, as JSON."""
        opcode, payload = await self.frame()
        assert opcode == TEXT, (opcode, payload)
        result: dict[str, Any] = json.loads(payload)
        return result

    async def close_code(self) -> int | None:
        """Skip to the server's close frame; its code."""
        while True:
            opcode, payload = await self.frame()
            if opcode == CLOSE:
                return struct.unpack_from("!H", payload)[0] if payload else None

    async def close_code_or_end(self) -> int | None:
        """The code of the server's close frame, or ``None`` if it ended the connection without one."""
        try:
            return await self.close_code()
        except EOFError:
            return None

    async def until_eof(self) -> bytes:
        """Every byte up to the server's end of the connection."""
        with trio.fail_after(10):
            while data := await self.stream.receive_some(1 << 16):
                self.received += data
                self.everything += data
        return self.everything


async def answer(server: WebServer, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send ``request`` on a new connection; the status line, headers and body of the answer."""
    async with await trio.open_tcp_stream(*address(server)) as stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in received:
                data = await stream.receive_some(1 << 16)
                assert data, received
                received += data
            head, _, body = received.partition(b"\r\n\r\n")
            status, *lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            while len(body) < int(headers.get("content-length", "0")):
                body += await stream.receive_some(1 << 16)
    return status.encode(), headers, body


@asynccontextmanager
async def raw_socket(
    server: WebServer, path: str, *, rcvbuf: int | None = None, **headers: str
) -> AsyncIterator[RawSocket]:
    """A :class:`RawSocket` after its handshake (``rcvbuf``: its receive buffer, set before connecting)."""
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(address(server))
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(handshake(server, path, **headers))
        received = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(1 << 16)
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        assert {k.lower(): v for k, v in fields.items()}[b"sec-websocket-accept"] == ACCEPT
        yield RawSocket(stream, rest)


def start(task: str = "What is 2 + 2?", **fields: Any) -> bytes:
    return json.dumps({"action": "start", "task": task, **fields}).encode()


# -- handshakes ------------------------------------------------------------------------------


async def test_bad_handshakes_get_the_same_answer_both_ways(
    start_web_server: StartWebServer,
) -> None:
    answers = []
    for server in await both(start_web_server):
        got = [
            await answer(server, handshake(server, "/ws", **{"Sec-WebSocket-Version": "8"})),
            await answer(server, handshake(server, "/ws", **{"Sec-WebSocket-Key": ""})),
            await answer(server, handshake(server, "/ws", Connection="keep-alive")),
        ]
        answers.append([(status, body) for status, _, body in got])
    assert answers[0] == answers[1]
    assert [status.split()[1] for status, _ in answers[0]] == [b"400", b"400", b"404"]


async def test_refused_handshakes_are_the_same_both_ways(
    start_web_server: StartWebServer,
) -> None:
    answers = []
    for server in await both(start_web_server, token=TOKEN, agent=talker(words=3)):
        run_id = await start_run(server, token=TOKEN)
        await server.executor.get_run(run_id).wait()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        requests = [
            handshake(server, "/ws"),
            handshake(server, f"/runs/{run_id}/ws?token=wrong"),
            handshake(server, "/ws", **auth, Host="rebind.evil"),
            handshake(server, "/ws", **auth, Origin="https://evil.example"),
            handshake(server, "/runs/run_nope/ws", **auth),
            handshake(server, f"/runs/{run_id}/ws?after=abc", **auth),
            handshake(server, f"/runs/{run_id}/ws?after=999", **auth),
        ]
        got = []
        for request in requests:
            status, headers, body = await answer(server, request)
            kept = {k: headers.get(k) for k in ("content-type", "www-authenticate")}
            body = body.replace(run_id.encode(), b"RUN")
            got.append((status.split()[1], kept, json.loads(body)))  # Hypercorn: no phrase
        answers.append(got)
    direct, asgi = answers
    assert direct == asgi
    codes = [(status, body["error"]["code"]) for status, _, body in direct]
    assert codes == [
        (b"401", "unauthorized"),
        (b"401", "invalid_token"),
        (b"403", "forbidden_host"),
        (b"403", "forbidden_origin"),
        (b"404", "run_not_found"),
        (b"400", "invalid_after"),
        (b"400", "invalid_after"),
    ]


async def test_the_access_log_has_the_same_lines_both_ways_for_websockets(
    start_web_server: StartWebServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioflow.web.access")
    lines = []
    for server in await both(start_web_server, access_log=True):
        caplog.clear()
        async with raw_socket(server, "/ws?x=1", **{"User-Agent": "t/1"}) as ws:
            await ws.send(frame(CLOSE, struct.pack("!H", 1000)))
            assert await ws.close_code() == 1000
        await answer(server, handshake(server, "/runs/run_nope/ws", **{"User-Agent": "t/1"}))
        with trio.fail_after(5):  # Hypercorn logs a refusal once its answer is written
            while len([r for r in caplog.records if r.name == "trioflow.web.access"]) < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        records = [r.getMessage() for r in caplog.records if r.name == "trioflow.web.access"]
        lines.append([record.split(" ", 5)[5] for record in records])  # after the time
    assert lines[0] == lines[1]
    assert [line.split(" ", 4)[:4] for line in lines[0]] == [
        ['"GET', "/ws", '1.1"', "101"],
        ['"GET', "/runs/run_nope/ws", '1.1"', "404"],
    ]


async def test_the_direct_path_is_taken_under_serve_only_without_middleware(
    start_web_server: StartWebServer,
) -> None:
    names = []
    servers = [
        *await both(start_web_server, agent=talker(words=100, pace=200)),
        await start_web_server(agent=talker(words=100, pace=200), direct_writes=False),
    ]
    for server in servers:
        run_id = await start_run(server)
        async with raw_socket(server, f"/runs/{run_id}/ws") as ws:
            name = "ws" if names else "ws-frames"  # only the first is served directly
            fanout = await joined_fanout(server.hub, run_id, 1, name=name)
            names.append({f.name for f in server.hub.fanouts()})
            assert await ws.close_code() == 1000
        names[-1] = (names[-1], fanout.statistics().direct_writes > 0)
    # Served directly: the run's frames fan-out, written to the socket by the fan-out itself.
    assert names == [({"ws-frames"}, True), ({"ws"}, False), ({"ws"}, False)]


# -- framing -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("ws_path")
async def test_a_ping_gets_its_pong_and_a_fragmented_message_is_one_message(
    web_server: WebServer,
) -> None:
    message = start(ref="fragments")
    async with raw_socket(web_server, "/ws") as ws:
        await ws.send(frame(PING, b"are you there"))
        assert await ws.frame() == (PONG, b"are you there")
        await ws.send(frame(TEXT, message[:10], fin=False))
        await ws.send(frame(PING, b"between"))  # a control frame may come between fragments
        await ws.send(frame(0x0, message[10:20], fin=False))
        await ws.send(frame(0x0, message[20:]))
        assert await ws.frame() == (PONG, b"between")
        accepted = await ws.message()
        await ws.send(frame(BINARY, start(ref="bytes")))  # binary: as on the ASGI path
        frames = [await ws.message()]
        while frames[-1].get("ref") != "bytes":
            frames.append(await ws.message())
    assert (accepted["type"], accepted["ref"]) == ("accepted", "fragments")


@pytest.mark.usefixtures("ws_path")
@pytest.mark.parametrize(
    ("code", "echoed"), [(struct.pack("!H", 1000) + b"bye", 1000), (b"", None)]
)
async def test_a_close_from_the_client_is_echoed_and_the_connection_ends(
    web_server: WebServer, code: bytes, echoed: int | None
) -> None:
    async with raw_socket(web_server, "/ws") as ws:
        await ws.send(frame(CLOSE, code))
        assert await ws.close_code() == echoed
        await ws.until_eof()  # then the server ends the connection


BROKEN = {
    "unmasked": frame(TEXT, b"{}", mask=False),
    "reserved opcode": frame(0x3, b"x"),
    "reserved bit": frame(TEXT, b"{}", rsv=0x40),
    "continuation of nothing": frame(0x0, b"x"),
    "fragmented ping": frame(PING, b"x", fin=False),
    "long ping": frame(PING, b"x" * 126),
    "message inside a message": frame(TEXT, b"{", fin=False) + frame(TEXT, b"{}"),
    "close of one byte": frame(CLOSE, b"\x03"),
    "reserved close code": frame(CLOSE, struct.pack("!H", 1005)),
}


@pytest.mark.usefixtures("ws_path")
@pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
async def test_a_broken_frame_closes_with_1002(
    web_server: WebServer, server_log: pytest.LogCaptureFixture, ws_path: str, data: bytes
) -> None:
    async with raw_socket(web_server, "/ws") as ws:
        await ws.send(data)
        code = await ws.close_code_or_end()
    # Served directly: a close frame with 1002. Hypercorn (wsproto) ends the
    # connection without one.
    assert code == (1002 if ws_path == "direct" else None)
    assert not [r for r in server_log.records if r.exc_info]


@pytest.mark.usefixtures("ws_path")
async def test_text_that_is_not_utf8_closes_with_1007(web_server: WebServer, ws_path: str) -> None:
    async with raw_socket(web_server, "/ws") as ws:
        await ws.send(frame(TEXT, b'{"action": "\xff"}'))
        code = await ws.close_code_or_end()
    assert code == (1007 if ws_path == "direct" else None)


async def test_a_message_over_the_ceiling_is_closed_with_1009_before_its_payload(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(max_body=1024)
    ceiling = server.config.websocket_message_ceiling
    async with raw_socket(server, "/ws") as ws:
        head = frame(TEXT, b"x" * (ceiling + 1))[:14]  # the header and mask only
        await ws.send(head)
        assert await ws.close_code() == 1009
    async with raw_socket(server, "/ws") as ws:  # fragments count together
        await ws.send(frame(TEXT, b"x" * ceiling, fin=False) + frame(0x0, b"x")[:6])
        assert await ws.close_code() == 1009
    assert server.executor.runs == {}


# -- one run's frames, once, on one descriptor ------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_a_websocket_holds_one_descriptor_in_the_server(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=50))
    run_id = await start_run(server)
    async with trio.open_nursery() as nursery:
        ready = trio.Semaphore(0)
        done = trio.Event()

        async def client(path: str) -> None:
            async with raw_socket(server, path) as ws:
                if path == "/ws":
                    await ws.send(frame(TEXT, start()))
                await ws.message()
                ready.release()
                await done.wait()

        for i in range(20):
            nursery.start_soon(client, "/ws" if i % 4 == 0 else f"/runs/{run_id}/ws")
        for _ in range(20):
            await ready.acquire()
        held = server_descriptors(address(server)[1])
        done.set()
    assert held == 20


async def test_a_late_joiner_gets_the_bytes_a_live_client_got(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=300, pace=400))
    run_id = await start_run(server)
    path = f"/runs/{run_id}/ws"
    async with raw_socket(server, path) as live:
        for _ in range(40):
            await live.frame()
        async with raw_socket(server, path) as late:  # a replay from the cache, then the fan-out
            late_bytes = await late.until_eof()
        live_bytes = await live.until_eof()
    async with raw_socket(server, path) as replay:  # after the run: all from the cache
        replay_bytes = await replay.until_eof()
    assert live_bytes == late_bytes == replay_bytes
    last = server.executor.get_run(run_id).last_seq
    assert live_bytes.count(b'{"id":') == last
    assert live_bytes.endswith(b"\x88\x02\x03\xe8")  # close, 1000


@pytest.mark.parametrize("path", ["/runs/{run_id}/ws", "/ws"])
async def test_a_client_that_keeps_up_gets_every_event_and_is_never_evicted(
    start_web_server: StartWebServer, socket_clock: trio.testing.MockClock, path: str
) -> None:
    # An unpaced run of many events (more bytes than the socket buffers
    # hold), with a small buffer of events per connection: what the kernel
    # cannot take at once waits for the connection's task, and a client
    # reading as fast as it can is never evicted. The run's tokens start once
    # the client follows it (the model's delay, on the mock clock: it passes
    # when everything waits).
    events = 20_000
    server = await start_web_server(agent=talker(words=events, delay=1), buffer=64)
    run_id = await start_run(server)
    async with raw_socket(server, path.format(run_id=run_id)) as ws:
        if path == "/ws":
            await ws.send(frame(TEXT, json.dumps({"action": "resume", "run_id": run_id}).encode()))
        ids = []
        with trio.fail_after(120):
            while True:
                message = await ws.message()
                assert "id" in message, message  # never an error frame (evicted)
                ids.append(message["id"])
                if message["type"] == "flow.completed":
                    break
    run = server.executor.get_run(run_id)
    assert ids == list(range(1, run.last_seq + 1))
    assert run.last_seq > events


async def test_an_unexpected_error_deciding_a_handshake_is_a_logged_500_both_ways(
    start_web_server: StartWebServer, server_log: pytest.LogCaptureFixture
) -> None:
    statuses = []
    for server in await both(start_web_server):

        def broken(run_id: str) -> Any:
            raise RuntimeError("the hub broke")

        server.hub.get = broken  # type: ignore[method-assign]
        status, _, body = await answer(server, handshake(server, "/runs/run_x/ws"))
        statuses.append(status.split()[1])
        if len(statuses) == 1:  # served directly: a JSON error (Hypercorn: no body)
            assert json.loads(body)["error"]["code"] == "internal_error"
        async with raw_socket(server, "/ws") as ws:  # the server goes on
            await ws.send(frame(CLOSE))
            assert await ws.close_code() is None
    assert statuses == [b"500", b"500"]
    logged = [r for r in server_log.records if r.exc_info and "the hub broke" in str(r.exc_info[1])]
    assert len(logged) >= 2


async def test_control_frames_never_land_inside_an_event_frame(
    start_web_server: StartWebServer, socket_clock: trio.testing.MockClock
) -> None:
    # The fan-out writes the run's frames to the socket itself, the kernel
    # often taking part of one (a small receive buffer); meanwhile the client
    # pings, and every pong and error frame is written by the connection's
    # task. Every frame arrives whole, in order.
    server = await start_web_server(agent=talker(words=5_000, delay=1))
    run_id = await start_run(server)
    async with raw_socket(server, f"/runs/{run_id}/ws", rcvbuf=16 * 1024) as ws:
        fanout = await joined_fanout(server.hub, run_id, 1, name="ws-frames")
        ids: list[int] = []
        pongs: list[bytes] = []
        errors = 0
        sent = 0
        with trio.fail_after(120):
            while True:
                if sent < 300 and len(ids) % 10 == 0:
                    await ws.send(frame(PING, b"%d" % sent))
                    if sent % 30 == 0:
                        await ws.send(frame(TEXT, b"not json"))  # an error frame
                    sent += 1
                opcode, payload = await ws.frame()
                if opcode == PONG:
                    pongs.append(payload)
                    continue
                if opcode == CLOSE:
                    break
                assert opcode == TEXT
                message = json.loads(payload)
                if "id" in message:
                    ids.append(message["id"])
                else:
                    assert message["code"] == "invalid_json", message
                    errors += 1
    run = server.executor.get_run(run_id)
    assert ids == list(range(1, run.last_seq + 1))
    assert pongs == [b"%d" % i for i in range(len(pongs))]
    assert len(pongs) >= 100 and errors >= 1
    stats = fanout.statistics()
    # Both kinds of writes happened: by the fan-out, and by the connection's task.
    assert stats.direct_writes > 0 and stats.queued_writes > 0


async def test_frames_sent_with_the_handshake_are_read(web_server: WebServer) -> None:
    async with await trio.open_tcp_stream(*address(web_server)) as stream:
        ping = frame(PING, b"early")
        await stream.send_all(handshake(web_server, "/ws") + ping)
        received = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(1 << 16)
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await RawSocket(stream, rest).frame() == (PONG, b"early")


async def test_a_joiner_sends_its_replay_before_what_the_fanout_queued_meanwhile(
    start_web_server: StartWebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A connection to a live run someone watches joins the run's fan-out at
    # once, then sends its replay from the cache itself; a batch the fan-out
    # queues for it in between goes out after the replay, not before it.
    import trio.testing

    from trioflow.web._direct_ws import _SocketOutput

    server = await start_web_server(agent=talker(words=200, pace=100))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    path = f"/runs/{run_id}/ws"
    async with raw_socket(server, path) as live:
        for _ in range(10):
            await live.frame()
        await joined_fanout(server.hub, run_id, 1, name="ws-frames")
        batches = 0

        async def start_after_a_batch(self: _SocketOutput) -> None:
            nonlocal batches
            async with run.subscribe(after=run.last_seq) as sub:
                await sub.receive_batch()  # the fan-out has this batch for the joiner too
            await trio.testing.wait_all_tasks_blocked()
            batches += 1

        monkeypatch.setattr(_SocketOutput, "start", start_after_a_batch)
        async with raw_socket(server, path) as late:
            late_bytes = await late.until_eof()
        live_bytes = await live.until_eof()
    assert batches == 1
    assert late_bytes == live_bytes
    assert late_bytes.count(b'{"id":') == run.last_seq
