"""The event stream served on the connection itself, before any generic machinery.

Under :func:`~trioflow.web.serve`, each connection's task reads the head of
the first request itself (:func:`read_request`, within the header timeout)
and parses it strictly (:func:`parse_head`: an HTTP/1.1 request line, RFC
9110 header lines, one ``Host``; anything odd goes to Hypercorn, which
answers it as it answers any request).
When it is ``GET /runs/{id}/events`` over cleartext HTTP/1.1, without a
body, and the application has no middleware of its own
(:func:`~trioflow.web._app.direct_writes`), trioflow serves the whole
connection (:func:`serve_event_stream`): the same decision as the Starlette
route (:func:`~trioflow.web._sse.event_stream_answer`: ``Host``, token and
``Origin``, the run, the resume point), the same answers (JSON errors,
``204``), the same access-log line, then the frames, and ``Connection:
close``. A WebSocket handshake (``GET /runs/{id}/ws``, ``GET /ws``) is
served on the connection too, by :mod:`trioflow.web._direct_ws`. Every other
connection goes to Hypercorn with the bytes already read pushed back in
front of the stream (:meth:`~trioflow.web._connections.GuardedStream.unread`).

One owner at any moment
    From accept to close, the connection's socket belongs to its task. The
    task writes the response head, the catch-up and every pending byte with
    the connection's ``send_all`` (write timeout included); a child of it
    reads, only to notice the client leaving. Once caught up, the run's
    fan-out writes chunks to the same socket (the same descriptor, without
    blocking) on the owner's behalf, only while the owner waits for it with
    nothing of its own to send (:mod:`trioflow.web._fanout`). The owner
    closes the socket when the stream ends; the server's forced close
    (:meth:`~trioflow.web._connections.Connections.close_all`) may close it
    first, after which nothing writes to it. One descriptor per connection.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import trio
from starlette.responses import Response

from trioflow.web._errors import ApiError, error_response
from trioflow.web._fanout import chunk
from trioflow.web._formats import choose_format
from trioflow.web._sse import EVENTS_PATH, HEADERS, EventOutput, event_stream_answer, stream_events

if TYPE_CHECKING:
    from hypercorn.config import Config as HypercornConfig

    from trioflow.web._auth import AccessPolicy
    from trioflow.web._connections import GuardedStream
    from trioflow.web._runs import RunHub

__all__ = ["RequestHead", "parse_head", "read_request", "serve_event_stream", "stream_target"]

_log = logging.getLogger("trioflow.web")

_RECEIVE = 64 * 1024


_PREFIXES = (b"GET /runs/", b"GET /ws")
"""How every request this module (or :mod:`trioflow.web._direct_ws`) may serve begins:
anything else goes to Hypercorn at its first bytes, unparsed (Hypercorn parses it)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHead:
    """The head of a request read by :func:`read_request` (the fields of an ``h11.Request``).

    ``headers`` are ``(name, value)`` pairs in order, names lower-cased,
    values stripped of surrounding whitespace.
    """

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]


_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[\x21-\x7e]*) HTTP/(1\.1)")
_HEADER_LINE = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?)[ \t]*\r\n"
)


def parse_head(head: bytes) -> RequestHead | None:
    """``head`` (a request head up to its blank line, excluded) parsed strictly, or ``None``.

    Strict on purpose: an HTTP/1.1 request line, header lines as RFC 9110
    spells them (no line folding, no bare ``LF``, no control characters)
    and exactly one ``Host``. Anything else is ``None``: the connection
    then goes to Hypercorn, which gives every odd request its proper
    answer, so this parser never has to.
    """
    line_end = head.find(b"\r\n")
    if line_end == -1:
        line_end = len(head)
    line = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if line is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    pos = line_end + 2
    block = head + b"\r\n"
    hosts = 0
    match = _HEADER_LINE.match
    while pos < len(block):
        field = match(block, pos)
        if field is None:
            return None
        name = field[1].lower()
        if name == b"host":
            hosts += 1
        headers.append((name, field[2]))
        pos = field.end()
    if hosts != 1:
        return None
    return RequestHead(line[1], line[2], line[3], headers)


async def read_request(
    stream: GuardedStream, *, limit: int
) -> tuple[RequestHead | None, bytes] | None:
    """Read the head of the connection's first request, if it may be an event stream.

    Returns ``(request, data)``: the head, or ``None`` when it cannot be an
    event stream (its first bytes are not ``GET /runs/``) or is not one
    :func:`parse_head` accepts (Hypercorn answers it then), and every byte
    read; or ``None`` when the peer left before a head arrived. The caller
    bounds the time it may take (the header timeout).
    """
    data = b""
    while True:
        if not data.startswith(_PREFIXES):
            if data and not any(prefix.startswith(data) for prefix in _PREFIXES):
                return None, data  # not an event stream: Hypercorn's
        else:
            end = data.find(b"\r\n\r\n")
            if end != -1:
                return parse_head(data[:end]), data
            if len(data) > limit:
                return None, data  # Hypercorn answers a head this large
        try:
            part = await stream.receive_some(_RECEIVE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not part:
            return None if not data else (None, data)
        data += part


def stream_target(request: RequestHead) -> tuple[str, bytes, bytes] | None:
    """``(run_id, path, query)`` when ``request`` is an event stream this module serves, else ``None``.

    A ``GET /runs/{id}/events`` in HTTP/1.1 without a body and without
    ``Upgrade``, in trioflow's SSE format (:func:`~trioflow.web._formats.choose_format`);
    anything else goes to Hypercorn.
    """
    if request.method != b"GET" or request.http_version != b"1.1":
        return None
    raw, _, query = request.target.partition(b"?")
    if not (raw.startswith(b"/runs/") and raw.endswith(b"/events")):
        return None
    for name, value in request.headers:
        if name == b"upgrade" or name == b"transfer-encoding":
            return None
        if name == b"content-length" and value.strip() != b"0":
            return None
    try:  # another format than trioflow's SSE (or a bad one): the application answers
        if choose_format(query, request.headers) != "sse":
            return None
    except ApiError:
        return None
    try:
        path = unquote(raw.decode("ascii"))
    except UnicodeDecodeError:
        return None
    match = EVENTS_PATH.fullmatch(path)
    if match is None:
        return None
    return match[1], raw, query


def _head(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [b"HTTP/1.1 %d %s" % (status, phrase.encode("ascii"))]
    lines += [b"%s: %s" % (name, value) for name, value in headers]
    lines.append(b"connection: close\r\n\r\n")
    return b"\r\n".join(lines)


_STREAM_HEAD = _head(200, [*HEADERS, (b"transfer-encoding", b"chunked")])
_END = b"0\r\n\r\n"


class _SocketOutput(EventOutput):
    """The connection's socket, written by its owner; HTTP/1.1 chunks."""

    frame = staticmethod(chunk)

    def __init__(self, stream: GuardedStream) -> None:
        self._stream = stream
        self.sock = stream.socket
        self._head = b""

    async def start(self) -> None:
        self._head = _STREAM_HEAD  # goes out with the first write
        await trio.lowlevel.checkpoint()

    async def _send(self, data: bytes) -> None:
        data, self._head = self._head + data, b""
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            raise

    async def write(self, data: bytes) -> None:
        await self._send(chunk(data))

    async def write_framed(self, data: bytes) -> None:
        await self._send(data)

    async def end(self, data: bytes) -> None:
        self.ending = True
        with trio.CancelScope(shield=True):  # bounded: send_all has the write timeout
            await self._send((chunk(data) if data else b"") + _END)

    async def wait_disconnect(self) -> None:
        while True:
            try:
                data = await self._stream.receive_some(_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            # Anything else (a pipelined request) is ignored: the response
            # says Connection: close.


async def serve_event_stream(
    stream: GuardedStream,
    request: RequestHead,
    target: tuple[str, bytes, bytes],
    *,
    hub: RunHub,
    access: AccessPolicy,
    hconfig: HypercornConfig,
) -> None:
    """Serve the connection's event-stream request (see the module documentation), then return.

    The caller closes the connection. The client leaving at any point ends
    it quietly.
    """
    run_id, raw_path, query = target
    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": list(request.headers),
    }
    started = time.time()
    status = 200
    headers: list[tuple[bytes, bytes]] = list(HEADERS)
    try:
        try:
            answer = event_stream_answer(hub, access, scope, run_id)
        except ApiError as error:
            answer = error.response()
        except Exception:  # as the application's own handler does: 500, logged
            _log.exception("error in GET %s", scope["path"])
            answer = error_response(
                500, "internal_error", "the server failed to handle this request"
            )
        if isinstance(answer, Response):
            status, headers = answer.status_code, answer.raw_headers
            await stream.send_all(_head(status, headers) + answer.body)
        else:
            await stream_events(hub, *answer, _SocketOutput(stream))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left; the stream released everything on the way out
    finally:
        if hconfig.accesslog is not None:
            await _log_access(stream, scope, status, headers, hconfig, time.time() - started)


async def _log_access(
    stream: GuardedStream,
    scope: dict[str, Any],
    status: int,
    headers: list[tuple[bytes, bytes]],
    hconfig: HypercornConfig,
    elapsed: float,
) -> None:
    """The access-log line Hypercorn writes for a request, in its format."""
    try:
        client = stream.socket.getpeername()[:2]
        server = stream.socket.getsockname()[:2]
    except OSError:
        client = server = None
    scope = {**scope, "client": client, "server": server}
    with trio.CancelScope(shield=True):
        await hconfig.log.access(scope, {"status": status, "headers": headers}, elapsed)  # type: ignore[arg-type]
