"""The WebSocket endpoints: ``/runs/{id}/ws`` follows one run, ``/ws`` starts and follows many.

Frames from the server are JSON text frames of two kinds:

* **events**: exactly :meth:`FlowEvent.to_json() <trioflow.FlowEvent.to_json>`
  (the ``data:`` of the event stream), so they always have an integer
  ``"id"`` (the seq) and a ``"run_id"``;
* **control frames**, which never have an ``"id"``:
  ``{"type": "error", "code": ..., "message": ..., ...}`` for a message the
  server could not act on or a stream it had to stop (the connection stays
  open), and, on ``/ws``, ``{"type": "accepted", "run_id": ..., "ref": ...}``
  when a run was started.

``/runs/{id}/ws`` (``?after=<seq>`` to start after an event) sends the run's
events from the first (or after ``after``) and closes with code ``1000``
after the terminal event. The client may send:

* ``{"action": "cancel", "mode"?}``: cancel the run (an ``error`` frame with
  code ``run_finished`` if it has finished; ``"mode": "after_turn"`` lets
  the current turn finish first);
* ``{"action": "resume", "after": <seq>}``: replay the run's events after
  ``<seq>`` and go on live (the current stream is replaced);
* ``{"action": "decide", "call_id", "decision", "reason"?, "input"?}``:
  approve, deny or edit a tool call waiting for approval (as ``POST
  /runs/{id}/approvals/{call_id}``); answered ``{"type": "decided", ...}``.

``/ws`` follows any number of runs (up to
:attr:`~trioflow.web.WebConfig.max_runs_per_socket` at once); every event
says which run it belongs to. The client may send:

* ``{"action": "start", "task": ..., "timeout"?, "max_iterations"?,
  "on_disconnect"?, "ref"?}``: start a run (the fields of ``POST /runs``);
  the server answers ``accepted`` (with ``ref`` echoed, to match replies to
  requests), then sends the run's events;
* ``{"action": "message", "thread_id": ..., "message": ..., ...}``: the
  next run of a conversation (as ``POST /threads/{id}/runs``), answered
  ``accepted`` with the ``thread_id``, then followed;
* ``{"action": "cancel", "run_id": ..., "mode"?}``,
  ``{"action": "resume", "run_id": ..., "after": <seq>}`` and
  ``{"action": "decide", "run_id": ..., "call_id": ..., ...}``: as above,
  for any run (``resume`` with ``after: 0`` also follows a run started
  elsewhere).

Error codes: ``invalid_json``, ``invalid_message``, ``unknown_action``,
``invalid_request``, ``invalid_after``, ``run_not_found``, ``run_finished``,
``too_many_runs``, ``shutting_down``, ``message_too_large``,
``approval_not_found``, ``approval_decided``, ``invalid_input``,
``thread_not_found``, ``thread_busy``, ``thread_full``, and for a
stream: ``evicted`` (the client fell behind by more than the connection's
buffer; ``last_seq`` is the last event sent: ``resume`` after it, with no
gap) and ``history_expired``. An error caused by a message echoes its
``action`` and ``ref``. A message larger than
:attr:`~trioflow.web.WebConfig.max_body` gets ``message_too_large``; one
larger than :attr:`~trioflow.web.WebConfig.websocket_message_ceiling` is
never read: the server closes the connection with code ``1009``.

Each followed run is streamed as an event stream is
(:func:`~trioflow.web._streams.stream_run`): through a subscription of the
connection's own (bounded, :attr:`~trioflow.Overflow.EVICT`) until it has
caught up, then through the run's WebSocket fan-out
(:class:`~trioflow.web._fanout.EventFanout`, one per run for every
WebSocket following it, beside the run's event-stream fan-out), which
encodes each event once (:data:`WS`; the run's cache of these messages
serves late joiners the messages a live client got) and hands the same
messages to every connection, bounded by ``buffer`` events per connection
and run. The messages of a batch go out back to back under one hold of the
connection's send lock (one lock for the control frames and every followed
run). The protocol runs over a :class:`Transport`: Starlette's
``WebSocket`` here (any ASGI server; :func:`~trioflow.web.serve` over TLS
or with middleware), or the connection's socket served directly
(:mod:`trioflow.web._direct_ws`, whose module documentation states how its
one owner shares the socket with the run's fan-out); both take the one
handshake decision, :func:`socket_answer`. A client that disconnects
releases its subscriptions and places in the fan-outs at once, and runs
started with ``"on_disconnect": "cancel"`` that no one else watches are
cancelled. On a graceful shutdown, connections
close with code ``1001`` once their runs' terminal events are delivered.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import trio
from starlette.datastructures import QueryParams
from starlette.types import Scope
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from trioflow._json import InvalidJSON, loads
from trioflow._util import collapse_single_group
from trioflow.events import FlowEvent
from trioflow.handle import RunHandle
from trioflow.history import HistoryExpired
from trioflow.protocol import EVICTED, HISTORY_EXPIRED
from trioflow.web._auth import AccessPolicy, deny_websocket
from trioflow.web._errors import ApiError
from trioflow.web._runs import RunHub, RunRequest, Watch, cancel_mode, resume_point
from trioflow.web._streams import Encoding, StreamOutput, stream_run

__all__ = [
    "WS",
    "Transport",
    "evicted_frame",
    "follow_run",
    "follow_runs",
    "run_socket",
    "socket",
    "socket_answer",
]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def _error_frame(code: str, message: str, **details: Any) -> str:
    """An ``error`` control frame; members whose value is ``None`` are left out."""
    extra = {k: v for k, v in details.items() if v is not None}
    return _dumps({"type": "error", "code": code, "message": message, **extra})


def evicted_frame(run_id: str, last_seq: int) -> str:
    """The ``evicted`` error frame of ``run_id``, the client having got every event up to ``last_seq``."""
    return _error_frame(
        EVICTED,
        "this client fell behind and the stream stopped; send "
        f'{{"action": "resume", "run_id": "{run_id}", "after": {last_seq}}} to go on',
        run_id=run_id,
        last_seq=last_seq,
    )


WS: Encoding[str, list[str]] = Encoding(
    name="ws", event=FlowEvent.to_json, join=list, evicted=evicted_frame
)
"""The WebSocket encoding: one text message per event (:meth:`FlowEvent.to_json`), no keepalive."""

Handler = Callable[[Mapping[str, Any]], Awaitable[None]]


def _hub(websocket: WebSocket) -> RunHub:
    return cast("RunHub", websocket.app.state.trioflow)


def _only(message: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(message) - allowed - {"action", "ref"})
    if unknown:
        raise ApiError(
            400,
            "invalid_message",
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for action {message.get('action')!r}",
        )


def _run_id(message: Mapping[str, Any]) -> str:
    run_id = message.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise ApiError(400, "invalid_message", "'run_id' (a string) is required")
    return run_id


def _after(message: Mapping[str, Any], run: RunHandle, default: int | None = None) -> int:
    after = message.get("after", default)
    if not isinstance(after, int):  # JSON numbers only: no "3"
        raise ApiError(
            400, "invalid_after", f"'after' must be the seq of an event (an integer), not {after!r}"
        )
    return resume_point(after, run)


def _utf8_size(text: str) -> int:
    """The size of ``text`` in UTF-8, in bytes (a WebSocket text frame is valid UTF-8)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class Transport:
    """What a :class:`_Connection` speaks through: the ASGI ``WebSocket``, or the socket itself.

    The protocol of this module runs over either: :class:`_AsgiTransport`
    (Starlette's :class:`~starlette.websockets.WebSocket`: any ASGI server,
    and :func:`~trioflow.web.serve` over TLS or with middleware) and the
    connection served directly (:mod:`trioflow.web._direct_ws`). Sends raise
    :exc:`trio.BrokenResourceError` or :exc:`trio.ClosedResourceError` once
    the client has gone (after calling :attr:`on_gone`) or the connection
    was closed.
    """

    encoding: Encoding[Any, Any]
    """How the run's events are framed (:data:`WS`, or pre-framed bytes on the socket)."""
    closed = False
    """Whether :meth:`close` was called (nothing is sent after it)."""
    on_gone: Callable[[], None] = staticmethod(lambda: None)
    """Called when a send finds the client gone (set by the connection)."""

    async def accept(self) -> None:
        """Complete the handshake."""
        raise NotImplementedError

    async def receive(self) -> str | bytes | None:
        """The client's next message (a text or binary one); ``None`` once the connection is over."""
        raise NotImplementedError

    async def send_text(self, text: str) -> None:
        """Send one text message (a control frame)."""
        raise NotImplementedError

    def output(self) -> StreamOutput[Any, Any]:
        """Where one followed run's stream goes (one per stream)."""
        raise NotImplementedError

    async def close(self, code: int, reason: str | None) -> None:
        """Close the connection with ``code`` (the caller does it once)."""
        raise NotImplementedError


class _AsgiTransport(Transport):
    """Starlette's ``WebSocket``: every message through the ASGI ``send``, under one send lock."""

    encoding = WS

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket
        self._lock = trio.Lock()

    async def accept(self) -> None:
        await self._ws.accept()

    async def receive(self) -> str | bytes | None:
        message = await self._ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text: str | None = message.get("text")
        return (message.get("bytes") or b"") if text is None else text

    async def send(self, *batches: list[str]) -> None:
        """Send the text messages of ``batches`` back to back, under the send lock."""
        async with self._lock:
            if self.closed:
                raise trio.ClosedResourceError("the WebSocket is closed")
            send = self._ws.send
            try:
                for frames in batches:
                    for frame in frames:
                        await send({"type": "websocket.send", "text": frame})
            except (WebSocketDisconnect, WebSocketDisconnected):
                self.closed = True
                self.on_gone()
                raise trio.ClosedResourceError("the client has gone") from None

    async def send_text(self, text: str) -> None:
        await self.send([text])

    def output(self) -> StreamOutput[str, list[str]]:
        return _RunOutput(self)

    async def close(self, code: int, reason: str | None) -> None:
        async with self._lock:
            if self.closed:
                return
            self.closed = True
            with trio.CancelScope(shield=True):
                try:
                    await self._ws.close(code, reason)
                except (WebSocketDisconnect, RuntimeError):
                    pass


class _RunOutput(StreamOutput[str, list[str]]):
    """One followed run's stream on an :class:`_AsgiTransport`: its messages, under the send lock."""

    def __init__(self, transport: _AsgiTransport) -> None:
        self._transport = transport

    async def send_frames(self, frames: list[str]) -> None:
        await self._transport.send(frames)

    async def send_pieces(self, pieces: list[list[str]]) -> None:
        await self._transport.send(*pieces)

    async def finish(self, frames: list[str]) -> None:
        if frames:
            await self.send_frames(frames)
        else:
            await trio.lowlevel.checkpoint()


class _Connection:
    """One accepted WebSocket: its transport, the runs it follows, its lifetime."""

    def __init__(self, transport: Transport, hub: RunHub, *, per_run: bool) -> None:
        self.transport = transport
        self.hub = hub
        self.per_run = per_run
        self.disconnected = False
        self._nursery: trio.Nursery | None = None
        self._streams: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self._watches: dict[str, Watch] = {}
        transport.on_gone = self._gone

    async def serve(self, handle: Handler, first: RunHandle | None = None, after: int = 0) -> None:
        """Accept, then read messages (and follow ``first``) until either side closes."""
        await self.transport.accept()
        try:
            with self.hub.connection(), collapse_single_group():
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._receive_loop, handle)
                    nursery.start_soon(self._close_on_shutdown)
                    if first is not None:
                        await self.follow(first, after)
        finally:
            for watch in self._watches.values():
                watch.release(disconnected=self.disconnected)
            self._watches.clear()

    def _finish(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _gone(self) -> None:
        self.disconnected = True
        self._finish()

    # -- sending -------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one control frame (nothing if the connection is closed or the client gone)."""
        try:
            await self.transport.send_text(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def control(self, frame: Mapping[str, Any]) -> None:
        """Send one control frame."""
        await self.send_text(_dumps(frame))

    async def error(self, code: str, message: str, **details: Any) -> None:
        """Send an ``error`` control frame; members whose value is ``None`` are left out."""
        await self.send_text(_error_frame(code, message, **details))

    async def close(self, code: int, reason: str | None = None) -> None:
        """Close the connection with ``code`` (once) and stop serving it."""
        if not self.transport.closed:
            await self.transport.close(code, reason)
        self._finish()

    # -- receiving -----------------------------------------------------------------

    async def _receive_loop(self, handle: Handler) -> None:
        limit = self.hub.config.max_body
        while True:
            message = await self.transport.receive()
            if message is None:
                # Not after our own close (its end is reported so), unless the client went first.
                self.disconnected = self.disconnected or not self.transport.closed
                self._finish()
                return
            size = len(message) if isinstance(message, bytes) else _utf8_size(message)
            if size > limit:
                await self.error(
                    "message_too_large",
                    f"a message may have at most {limit} bytes (this one has {size})",
                )
                continue
            try:
                # Lone surrogates pass here: RunRequest.parse names the member holding one.
                obj = loads(message, unicode=False)
            except InvalidJSON as exc:
                await self.error("invalid_json", f"a message must be UTF-8 JSON: {exc}")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("action"), str):
                await self.error(
                    "invalid_message",
                    'a message must be a JSON object with an "action" (for example '
                    '{"action": "cancel"})',
                )
                continue
            try:
                await handle(obj)
            except ApiError as exc:
                await self.error(
                    exc.code, exc.message, action=obj["action"], ref=obj.get("ref"), **exc.details
                )

    async def _close_on_shutdown(self) -> None:
        await self.hub.wait_closing()
        if not self._streams:
            await self.close(1001, "server shutting down")

    # -- following runs --------------------------------------------------------------

    def check_capacity(self, run_id: str | None = None) -> None:
        """Raise ``too_many_runs`` if this connection follows as many unfinished runs as allowed."""
        if run_id is not None and run_id in self._watches:
            return
        limit = self.hub.config.max_runs_per_socket
        if sum(1 for w in self._watches.values() if not w.run.done) >= limit:
            raise ApiError(
                429, "too_many_runs", f"a connection may follow at most {limit} runs at once"
            )

    async def follow(self, run: RunHandle, after: int) -> None:
        """Stream ``run``'s events after ``after``, replacing a stream of the same run."""
        current = self._streams.get(run.run_id)
        if current is not None:
            scope, done = current
            scope.cancel()
            await done.wait()
        if run.run_id not in self._watches:
            self._watches[run.run_id] = self.hub.attach(run)
        assert self._nursery is not None
        await self._nursery.start(self._stream, run, after)

    async def _stream(
        self,
        run: RunHandle,
        after: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        done = trio.Event()
        finished = False
        with trio.CancelScope() as scope:
            self._streams[run.run_id] = (scope, done)
            task_status.started()
            try:
                finished = await self._pump(run, after)
            finally:
                if self._streams.get(run.run_id, (None,))[0] is scope:
                    del self._streams[run.run_id]
                done.set()
        if scope.cancelled_caught:
            return
        if finished:
            watch = self._watches.pop(run.run_id, None)
            if watch is not None:
                watch.release(disconnected=False)
            if self.per_run:
                await self.close(1000)
                return
        if self.hub.closing and not self._streams:
            await self.close(1001, "server shutting down")

    async def _pump(self, run: RunHandle, after: int) -> bool:
        """Send the run's events; True once its end was delivered."""
        try:
            transport = self.transport
            return await stream_run(self.hub, run, after, transport.output(), transport.encoding)
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # the connection closed
            return False
        except HistoryExpired as exc:
            await self.error(
                HISTORY_EXPIRED,
                str(exc),
                run_id=run.run_id,
                requested=exc.requested,
                first_available=exc.first_available,
            )
            return False


def socket_answer(
    hub: RunHub, access: AccessPolicy | None, scope: Scope, run_id: str | None
) -> tuple[RunHandle, int] | None:
    """Whether a WebSocket handshake is accepted: the run and the resume point, or ``None`` for ``/ws``.

    The one decision for the Starlette routes and for the connection served
    directly (:mod:`trioflow.web._direct_ws`): the access rules (``Host``,
    token, ``Origin``; ``access`` ``None`` when they were applied already),
    then for ``/runs/{run_id}/ws`` the run and ``?after=``.

    Raises:
        ApiError: ``403``/``401`` (access), ``404`` ``run_not_found``, ``400``
            ``invalid_after``: the handshake is refused with it as an HTTP
            response.
    """
    if access is not None:
        error = access.check(scope)
        if error is not None:
            raise error
    if run_id is None:
        return None
    run = hub.get(run_id)
    return run, resume_point(QueryParams(scope.get("query_string", b"")).get("after", "0"), run)


async def _decide(
    conn: _Connection, hub: RunHub, run: RunHandle, message: Mapping[str, Any]
) -> None:
    """``{"action": "decide", "call_id", "decision", "reason"?, "input"?}``: answered ``decided``."""
    _only(message, {"run_id", "call_id", "decision", "reason", "input"})
    call_id = message.get("call_id")
    if not isinstance(call_id, str):
        raise ApiError(400, "invalid_message", "'call_id' must be the id of a waiting tool call")
    body = {k: message[k] for k in ("decision", "reason", "input") if k in message}
    decided = await hub.decide(run, call_id, body)
    frame: dict[str, Any] = {
        "type": "decided",
        "run_id": run.run_id,
        "call_id": call_id,
        "decision": str(decided.decision),
    }
    if "ref" in message:
        frame["ref"] = message["ref"]
    await conn.control(frame)


async def follow_run(transport: Transport, hub: RunHub, run: RunHandle, after: int) -> None:
    """Serve ``/runs/{run_id}/ws`` over ``transport``: follow ``run``; ``cancel`` and ``resume`` messages."""
    conn = _Connection(transport, hub, per_run=True)

    async def handle(message: Mapping[str, Any]) -> None:
        action = message["action"]
        if message.get("run_id", run.run_id) != run.run_id:
            raise ApiError(400, "invalid_message", f"this connection follows run {run.run_id} only")
        if action == "cancel":
            _only(message, {"run_id", "mode"})
            hub.cancel(run, mode=cancel_mode(message.get("mode", "immediate")))
        elif action == "resume":
            _only(message, {"run_id", "after"})
            await conn.follow(run, _after(message, run))
        elif action == "decide":
            await _decide(conn, hub, run, message)
        else:
            raise ApiError(
                400,
                "unknown_action",
                f"unknown action {action!r}; use 'cancel', 'resume' or 'decide'",
            )

    await conn.serve(handle, run, after)


async def _resolved(hub: RunHub, message: Mapping[str, Any]) -> RunHandle:
    """The run ``message`` names, looked up in the store first (:meth:`RunHub.resolve`).

    A run of the store that this node has never served is found too.

    Raises:
        ApiError: ``400`` without a run id, ``404`` for no such run, ``503``
            when the store fails.
    """
    run_id = _run_id(message)
    await hub.resolve(run_id)
    return hub.get(run_id)


async def follow_runs(transport: Transport, hub: RunHub) -> None:
    """Serve ``/ws`` over ``transport``: start runs and follow any number of them."""
    conn = _Connection(transport, hub, per_run=False)

    async def handle(message: Mapping[str, Any]) -> None:
        action = message["action"]
        if action in ("start", "message"):
            thread = None
            fields = {k: v for k, v in message.items() if k not in ("action", "ref", "thread_id")}
            if action == "message":
                thread_id = message.get("thread_id")
                if not isinstance(thread_id, str):
                    raise ApiError(400, "invalid_message", "'thread_id' must be a thread's id")
                thread = await hub.thread(thread_id)
            elif "thread_id" in message:
                _only(message, set())  # names the unknown member
            try:
                request = RunRequest.parse(
                    fields, task_field="message" if thread is not None else "task"
                )
            except ValueError as exc:
                raise ApiError(400, "invalid_request", str(exc)) from None
            conn.check_capacity()
            run = await hub.start(request, source="ws", thread=thread)
            accepted: dict[str, Any] = {"type": "accepted", "run_id": run.run_id}
            if thread is not None:
                accepted["thread_id"] = thread.thread_id
            if "ref" in message:
                accepted["ref"] = message["ref"]
            await conn.control(accepted)
            await conn.follow(run, 0)
        elif action == "cancel":
            _only(message, {"run_id", "mode"})
            hub.cancel(
                await _resolved(hub, message), mode=cancel_mode(message.get("mode", "immediate"))
            )
        elif action == "decide":
            await _decide(conn, hub, await _resolved(hub, message), message)
        elif action == "resume":
            _only(message, {"run_id", "after"})
            run = await _resolved(hub, message)
            after = _after(message, run, 0)
            conn.check_capacity(run.run_id)
            await conn.follow(run, after)
        else:
            raise ApiError(
                400,
                "unknown_action",
                f"unknown action {action!r}; use 'start', 'message', 'cancel', 'resume' or 'decide'",
            )

    await conn.serve(handle)


async def run_socket(websocket: WebSocket) -> None:
    """``/runs/{run_id}/ws`` (the Starlette route): follow one run; ``cancel`` and ``resume`` messages."""
    hub = _hub(websocket)
    try:
        answer = socket_answer(hub, None, websocket.scope, websocket.path_params["run_id"])
    except ApiError as exc:
        await deny_websocket(websocket.scope, websocket.receive, websocket.send, exc)
        return
    assert answer is not None
    await follow_run(_AsgiTransport(websocket), hub, *answer)


async def socket(websocket: WebSocket) -> None:
    """``/ws`` (the Starlette route): start runs and follow any number of them over one connection."""
    await follow_runs(_AsgiTransport(websocket), _hub(websocket))
