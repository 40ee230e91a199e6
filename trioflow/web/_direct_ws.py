"""The WebSocket endpoints served on the connection itself, before any generic machinery.

Under :func:`~trioflow.web.serve`, on cleartext HTTP/1.1 and for an
application without middleware of its own (the condition of the event
stream served directly, :mod:`trioflow.web._direct`), a WebSocket handshake
for ``/runs/{id}/ws`` or ``/ws`` is served by trioflow: no wsproto, ASGI nor
Starlette between the run and the socket. The protocol is the one of
:mod:`trioflow.web._ws` (the same code: its connection runs over a
:class:`~trioflow.web._ws.Transport`, here :class:`SocketTransport`); only
the framing is here.

The handshake
    :func:`socket_target` takes a request only when Hypercorn would accept
    it as a WebSocket handshake (``GET``, HTTP/1.1, ``Connection: upgrade``,
    ``Upgrade: websocket``, a ``Sec-WebSocket-Key``, version ``13``, no
    body); any other request, a bad handshake included, goes to Hypercorn,
    which answers it as it always has. Then the one access decision
    (:func:`~trioflow.web._ws.socket_answer`: ``Host``, token, ``Origin``,
    the run, ``?after=``) refuses it with the same HTTP answer as through
    Hypercorn (status and JSON body), or accepts it: ``101`` with a
    ``Sec-WebSocket-Accept``, no extension (``permessage-deflate`` is
    declined: the frames are encoded once for every client). The access log
    says what Hypercorn's does (one line when the handshake is answered).

Frames
    Server frames are unmasked text frames. A run's events are framed once
    per run (:data:`WS_FRAMES`: the header and the UTF-8 of
    :meth:`FlowEvent.to_json() <trioflow.FlowEvent.to_json>`, the same
    message as on the ASGI path), cached with the run's other encodings (a
    late joiner replays the bytes a live client got) and fanned out as
    bytes. Client frames must be masked; a text message may be fragmented;
    ``ping`` gets its ``pong``; a ``close`` is echoed and ends the
    connection. An unmasked frame, a reserved bit or opcode, a bad control
    frame or continuation closes with ``1002``, text that is not UTF-8 with
    ``1007``, a message above
    :attr:`~trioflow.web.WebConfig.websocket_message_ceiling` with ``1009``
    as soon as its header says so (its payload is never read). Binary
    messages reach the protocol as on the ASGI path.

One owner at any moment
    The connection's task owns the socket from accept to close. Every write
    of its own (the ``101``, a followed run's catch-up and pending frames,
    control frames, ``pong``, ``close``) is queued synchronously, in program
    order, then written by whichever of its tasks holds the send lock, with
    the connection's ``send_all`` (write timeout included), shielded: a
    frame is never cut. For ``/runs/{id}/ws`` the run's fan-out may write
    frames straight to the socket (``os.write``, as for an event stream,
    :mod:`trioflow.web._fanout`) only while the owner has nothing queued and
    no write under way: queueing anything first stops direct mode on every
    fan-out place of the connection and, where the kernel took part of a
    frame, takes back the rest of it (and what is pending behind it) to go
    first, so that a control frame never lands inside an event's frame;
    whole frames pending stay for the run's stream to send in its order
    (after its own replay). Direct mode resumes only once the queue is
    written out. ``/ws`` (several runs, so several
    fan-outs) is never written to directly: its followed runs' frames go out
    through the same queue, one ``send_all`` per batch. One descriptor per
    connection; the server's forced close may close it at any moment, after
    which nothing writes to it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import struct
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import trio
from starlette.responses import Response

from trioflow.events import FlowEvent
from trioflow.web._direct import RequestHead, _log_access
from trioflow.web._direct import _head as response_head
from trioflow.web._errors import ApiError, error_response
from trioflow.web._streams import Encoding, StreamOutput
from trioflow.web._ws import Transport, evicted_frame, follow_run, follow_runs, socket_answer

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

    from trioflow.web._auth import AccessPolicy
    from trioflow.web._connections import GuardedStream
    from trioflow.web._fanout import FanoutTarget
    from trioflow.web._runs import RunHub

__all__ = ["WS_FRAMES", "SocketTransport", "serve_socket", "socket_target", "text_frame"]

_log = logging.getLogger("trioflow.web")

_RECEIVE = 64 * 1024
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_RUN_PATH = re.compile(r"/runs/([^/]+)/ws")

_CLOSE_WAIT = 2.0
"""Seconds the server waits for the client's answer to its ``close`` (then closes anyway)."""

# Opcodes (RFC 6455, 5.2).
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = frozenset({_CONTINUATION, _TEXT, _BINARY})
_CONTROL = frozenset({_CLOSE, _PING, _PONG})

# Close codes.
_PROTOCOL_ERROR, _INVALID_DATA, _TOO_BIG = 1002, 1007, 1009


def _frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (a server's)."""
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", 0x80 | opcode, size) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


def text_frame(text: str) -> bytes:
    """``text`` as one unmasked text frame (a server's), UTF-8."""
    return _frame(_TEXT, text.encode("utf-8"))


def _close_frame(code: int | None, reason: str | None = None) -> bytes:
    if code is None:
        return _frame(_CLOSE, b"")
    return _frame(_CLOSE, struct.pack("!H", code) + (reason or "").encode("utf-8")[:123])


WS_FRAMES: Encoding[bytes, bytes] = Encoding(
    name="ws-frames",
    event=lambda event: text_frame(FlowEvent.to_json(event)),
    join=b"".join,
    evicted=lambda run_id, last_seq: text_frame(evicted_frame(run_id, last_seq)),
)
"""The WebSocket encoding of the socket served directly: one text frame per event, ready to write."""


def socket_target(request: RequestHead) -> tuple[str | None, bytes, bytes, bytes] | None:
    """``(run_id, path, query, accept)`` when ``request`` is a WebSocket handshake served here, else ``None``.

    ``run_id`` is ``None`` for ``/ws``; ``accept`` is the
    ``Sec-WebSocket-Accept`` of the handshake's key. A handshake Hypercorn
    would refuse (``400``) is not one: Hypercorn answers it.
    """
    if request.method != b"GET" or request.http_version != b"1.1":
        return None
    raw, _, query = request.target.partition(b"?")
    upgrade = key = version = None
    connection: list[bytes] = []
    for name, value in request.headers:
        if name == b"upgrade":
            upgrade = value.strip().lower()
        elif name == b"connection":
            connection += [token.strip().lower() for token in value.split(b",")]
        elif name == b"sec-websocket-key":
            key = value
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return None  # a body: Hypercorn's
    if upgrade != b"websocket" or b"upgrade" not in connection or key is None or version != b"13":
        return None
    try:
        path = unquote(raw.decode("ascii"))
    except UnicodeDecodeError:
        return None
    if path == "/ws":
        run_id = None
    else:
        match = _RUN_PATH.fullmatch(path)
        if match is None:
            return None
        run_id = match[1]
    accept = base64.b64encode(hashlib.sha1(key + _GUID, usedforsecurity=False).digest())
    return run_id, raw, query, accept


def _handshake(accept: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: %s\r\n\r\n" % accept
    )


def _after_head(data: bytes) -> bytes:
    """What follows the request head in ``data`` (read by :func:`~trioflow.web._direct.read_request`)."""
    return data.partition(b"\r\n\r\n")[2]


class _Closing(Exception):
    """The client broke the protocol: close with this code (and stop reading)."""

    def __init__(self, code: int) -> None:
        self.code = code


def _unmask(mask: bytes, payload: bytes) -> bytes:
    size = len(payload)
    if not size:
        return payload
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(size, "big")


class SocketTransport(Transport):
    """The connection's own socket as a :class:`~trioflow.web._ws.Transport` (see the module documentation).

    Args:
        stream: the connection (its task owns it).
        ceiling: the largest message read at all (``1009`` beyond).
        head: the handshake's answer (the first bytes written).
        received: bytes the client sent after its handshake, read already.
    """

    encoding = WS_FRAMES

    def __init__(
        self, stream: GuardedStream, *, ceiling: int, head: bytes, received: bytes
    ) -> None:
        self._stream = stream
        self._ceiling = ceiling
        self._queue: list[bytes] = [head]
        self._lock = trio.Lock()
        self._targets: list[FanoutTarget[bytes]] = []
        self._received = bytearray(received)
        self._close_sent = False
        self._close_received = False

    # -- writing: the queue, then the send lock ------------------------------------

    def queue(self, data: bytes) -> None:
        """Queue ``data`` to go out after everything before it (see the module documentation)."""
        for target in self._targets:
            target.close()  # no direct write until the queue is written out
            if target.partial:  # a frame half on the wire: its rest (and what follows) first
                self._queue.extend(target.take())
        self._queue.append(data)

    def _idle(self) -> bool:
        return not self._queue and not self._lock.locked()

    async def flush(self) -> None:
        """Write everything queued (shielded: a frame is never cut; the write timeout bounds it)."""
        with trio.CancelScope(shield=True):
            async with self._lock:
                while self._queue:
                    data = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
                    self._queue.clear()
                    try:
                        await self._stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.closed = self._close_sent = True
                        self.on_gone()
                        raise
                sock = self._direct_sock()
                for target in self._targets:  # nothing queued: direct writes may resume
                    target.sock = sock

    async def _send(self, data: bytes) -> None:
        if self._close_sent:
            raise trio.ClosedResourceError("the WebSocket is closed")
        self.queue(data)
        await self.flush()

    async def accept(self) -> None:
        await self.flush()  # the 101

    async def send_text(self, text: str) -> None:
        await self._send(text_frame(text))

    def output(self) -> StreamOutput[bytes, bytes]:
        return _SocketOutput(self)

    def _direct_sock(self) -> trio.socket.SocketType | None:
        """The socket the fan-out may write to now: one run followed, nothing queued, no close sent."""
        return self._stream.socket if len(self._targets) == 1 and not self._close_sent else None

    def joined(self, target: FanoutTarget[bytes]) -> None:
        """A followed run's fan-out place (direct writes only while it is the only one and nothing is queued)."""
        self._targets.append(target)
        if len(self._targets) > 1 or not self._idle():
            for each in self._targets:
                each.close()  # direct writes stop (what they left is taken by the next write)

    def left(self, target: FanoutTarget[bytes]) -> None:
        """The place left: the rest of a frame it cut goes out with the next write (a frame is never cut)."""
        self._targets.remove(target)
        if target.partial and not target.broken and not self._close_sent:
            self._queue.extend(target.take())

    async def close(self, code: int, reason: str | None) -> None:
        self.closed = True
        await self._send_close(code, reason)

    async def _send_close(self, code: int | None, reason: str | None = None) -> None:
        """Send the close frame, once (the client being gone is no matter any more)."""
        if self._close_sent:
            await trio.lowlevel.checkpoint()
            return
        self._close_sent = True
        try:
            self.queue(_close_frame(code, reason))
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- reading ---------------------------------------------------------------------

    async def _fill(self, size: int) -> None:
        """Read until ``size`` bytes are received; EndOfChannel if the client has gone."""
        while len(self._received) < size:
            try:
                data = await self._stream.receive_some(_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise trio.EndOfChannel from None
            if not data:
                raise trio.EndOfChannel
            self._received += data

    async def _next_frame(self, pending: int) -> tuple[bool, int, bytes]:
        """The next frame, ``(fin, opcode, payload)``; ``pending``: the size of the message so far."""
        await self._fill(2)
        first, second = self._received[0], self._received[1]
        fin, opcode, size = bool(first & 0x80), first & 0x0F, second & 0x7F
        if first & 0x70 or not second & 0x80 or opcode not in _DATA | _CONTROL:
            raise _Closing(_PROTOCOL_ERROR)  # reserved bits, unmasked, unknown opcode
        if opcode in _CONTROL and (not fin or size > 125):
            raise _Closing(_PROTOCOL_ERROR)
        offset = 2
        if size == 126:
            await self._fill(4)
            (size,) = struct.unpack_from("!H", self._received, 2)
            offset = 4
        elif size == 127:
            await self._fill(10)
            (size,) = struct.unpack_from("!Q", self._received, 2)
            if size >> 63:
                raise _Closing(_PROTOCOL_ERROR)
            offset = 10
        if opcode in _DATA and pending + size > self._ceiling:
            raise _Closing(_TOO_BIG)  # never read
        await self._fill(offset + 4 + size)
        mask = bytes(self._received[offset : offset + 4])
        payload = _unmask(mask, bytes(self._received[offset + 4 : offset + 4 + size]))
        del self._received[: offset + 4 + size]
        return fin, opcode, payload

    async def receive(self) -> str | bytes | None:
        if self._close_sent or self._close_received:
            await trio.lowlevel.checkpoint()
            return None
        try:
            return await self._receive()
        except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
            self._close_received = True  # the client has gone (or a pong found it gone)
            return None
        except _Closing as closing:  # the client broke the protocol: it sees the connection end
            await self._send_close(closing.code)
            return None

    async def _receive(self) -> str | bytes | None:
        parts: list[bytes] = []
        size = 0
        kind: int | None = None
        while True:
            fin, opcode, payload = await self._next_frame(size)
            if opcode == _PING:
                await self._send(_frame(_PONG, payload))
                continue
            if opcode == _PONG:
                continue
            if opcode == _CLOSE:
                await self._closed_by_client(payload)
                return None
            if (opcode == _CONTINUATION) != (kind is not None):
                raise _Closing(
                    _PROTOCOL_ERROR
                )  # a continuation of nothing, or a message inside one
            if kind is None:
                kind = opcode
            parts.append(payload)
            size += len(payload)
            if fin:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                if kind == _BINARY:
                    return data
                try:
                    return data.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Closing(_INVALID_DATA) from None

    async def _closed_by_client(self, payload: bytes) -> None:
        self._close_received = True
        code: int | None = None
        if payload:
            if len(payload) < 2:
                raise _Closing(_PROTOCOL_ERROR)
            (code,) = struct.unpack_from("!H", payload)
            if not (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) and not (
                3000 <= code <= 4999
            ):
                raise _Closing(_PROTOCOL_ERROR)
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise _Closing(_INVALID_DATA) from None
        await self._send_close(code)  # echoed (if the server has not sent its own)

    async def linger(self) -> None:
        """After the close frames: wait (a little) for the client's ``close`` or its leaving."""
        with trio.move_on_after(_CLOSE_WAIT):
            while not self._close_received:
                try:
                    _, opcode, _ = await self._next_frame(0)  # anything but a close is dropped
                except (trio.EndOfChannel, _Closing):
                    return
                self._close_received = opcode == _CLOSE


class _SocketOutput(StreamOutput[bytes, bytes]):
    """One followed run's stream on a :class:`SocketTransport`: through its queue, or by the fan-out."""

    def __init__(self, transport: SocketTransport) -> None:
        self._transport = transport
        self.sock = transport._stream.socket  # the fan-out's place gets it while it may write

    async def send_frames(self, frames: list[bytes]) -> None:
        await self._transport._send(b"".join(frames))

    async def send_pieces(self, pieces: list[bytes]) -> None:
        await self._transport._send(b"".join(pieces))

    async def finish(self, frames: list[bytes]) -> None:
        if frames:
            await self.send_frames(frames)
        else:
            await trio.lowlevel.checkpoint()

    def joined(self, target: FanoutTarget[bytes]) -> None:
        self._transport.joined(target)

    def left(self, target: FanoutTarget[bytes]) -> None:
        self._transport.left(target)


async def serve_socket(
    stream: GuardedStream,
    request: RequestHead,
    target: tuple[str | None, bytes, bytes, bytes],
    data: bytes,
    *,
    hub: RunHub,
    access: AccessPolicy,
    hconfig: HypercornConfig,
) -> None:
    """Serve the connection's WebSocket (see the module documentation), then return.

    ``data``: every byte read so far (the head, and anything the client sent
    after it). The caller closes the connection. The client leaving at any
    point ends it quietly; an error is logged.
    """
    run_id, raw_path, query, accept = target
    scope: dict[str, Any] = {
        "type": "websocket",
        "http_version": "1.1",
        "scheme": "ws",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": list(request.headers),
        "subprotocols": [],
    }
    started = time.time()
    try:
        answer = socket_answer(hub, access, scope, run_id)
    except Exception as exc:
        await _refuse(stream, scope, exc, hconfig, started)
        return
    transport = SocketTransport(
        stream,
        ceiling=hub.config.websocket_message_ceiling,
        head=_handshake(accept),
        received=_after_head(data),
    )
    try:
        try:
            await transport.accept()
        finally:
            if hconfig.accesslog is not None:
                await _log_access(stream, scope, 101, [], hconfig, time.time() - started)
        if answer is None:
            await follow_runs(transport, hub)
        else:
            await follow_run(transport, hub, *answer)
        await transport.linger()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left; the protocol released everything on the way out
    except Exception:
        _log.exception("error serving WebSocket %s", scope["path"])


async def _refuse(
    stream: GuardedStream,
    scope: dict[str, Any],
    exc: Exception,
    hconfig: HypercornConfig,
    started: float,
) -> None:
    """Answer a refused handshake with ``exc`` (an :class:`ApiError`, else a logged ``500``)."""
    if isinstance(exc, ApiError):
        response: Response = exc.response()
    else:  # as the application's own handler does: 500, logged
        _log.error("error in WebSocket %s", scope["path"], exc_info=exc)
        response = error_response(500, "internal_error", "the server failed to handle this request")
    try:
        await stream.send_all(
            response_head(response.status_code, response.raw_headers) + response.body
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    if hconfig.accesslog is not None:
        elapsed = time.time() - started
        await _log_access(
            stream, scope, response.status_code, response.raw_headers, hconfig, elapsed
        )
