"""Buffered streaming: coalesce ``token.received`` events into ``token.chunk`` events."""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager

import trio

from trioflow._util import collapse_single_group
from trioflow.bus import EventBus
from trioflow.events import EventType, FlowEvent

__all__ = ["TokenCoalescer", "coalesce_into", "coalesce_tokens"]

_TOKEN = str(EventType.TOKEN_RECEIVED)
_CHUNK = str(EventType.TOKEN_CHUNK)


class TokenCoalescer:
    """The state machine that turns token deltas into chunks: no I/O, no tasks.

    Feed it every event of a stream in order with :meth:`feed`; send on what
    it returns. ``token.received`` events are held until their text reaches
    ``min_chars`` characters, then come out as one ``token.chunk`` event with
    data ``{"chunk": text, "tokens": n}``. Every other event first flushes the
    held tokens (so the order of the stream is kept) and then passes through
    unchanged. Tokens of different runs are never mixed: a token of another
    ``run_id`` flushes the held ones first.

    A chunk carries the ``run_id``, ``timestamp`` and ``seq`` of the *last*
    token it holds, so seqs stay increasing and a client that resumes after
    a chunk's seq misses nothing and sees nothing twice.

    :meth:`deadline` tells when held tokens become older than ``interval``;
    whoever drives the coalescer calls :meth:`flush` then.
    :func:`coalesce_tokens` does all of this for an async stream.

    Args:
        min_chars: the smallest chunk, in characters (>= 1); a chunk is
            flushed as soon as its text reaches it.
        interval: the longest time, in seconds, a token is held before it is
            flushed in a smaller chunk; ``None`` for no time limit (chunks
            then end only on size, another event or the end of the stream).

    Raises:
        ValueError: ``min_chars`` < 1, or ``interval`` not a positive number.
    """

    __slots__ = ("_chars", "_first_at", "_interval", "_last", "_min_chars", "_parts")

    def __init__(self, *, min_chars: int = 20, interval: float | None = 0.05) -> None:
        if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 1:
            raise ValueError(f"min_chars must be an int >= 1, not {min_chars!r}")
        if interval is not None and not (
            isinstance(interval, (int, float))
            and not isinstance(interval, bool)
            and 0 < interval <= math.inf
        ):
            raise ValueError(
                f"interval must be a positive number of seconds or None, not {interval!r}"
            )
        self._min_chars = min_chars
        self._interval = math.inf if interval is None else float(interval)
        self._parts: list[str] = []
        self._chars = 0
        self._first_at = math.inf
        self._last: FlowEvent | None = None

    def __repr__(self) -> str:
        return (
            f"TokenCoalescer(min_chars={self._min_chars}, interval={self._interval}, "
            f"pending={len(self._parts)})"
        )

    @property
    def min_chars(self) -> int:
        """The smallest chunk, in characters."""
        return self._min_chars

    @property
    def interval(self) -> float:
        """The longest hold, in seconds (``math.inf`` for none)."""
        return self._interval

    @property
    def pending(self) -> int:
        """How many tokens are held now."""
        return len(self._parts)

    def deadline(self) -> float:
        """When the held tokens must be flushed, on Trio's clock; ``math.inf`` if none are held."""
        return self._first_at + self._interval if self._parts else math.inf

    def feed(self, event: FlowEvent) -> list[FlowEvent]:
        """Take the next event of the stream; return the events to send on now, in order.

        Must be called from within Trio (the hold time is measured with
        :func:`trio.current_time`) unless ``interval`` is ``None``.

        Returns:
            Zero, one or two events: a chunk that is complete, and/or
            ``event`` itself when it is not a token.
        """
        if event.type != _TOKEN:
            out = self.flush()
            out.append(event)
            return out
        out = []
        if self._parts and self._last is not None and event.run_id != self._last.run_id:
            out = self.flush()
        token = event.data.get("token", "")
        text = token if isinstance(token, str) else str(token)
        if not self._parts and self._interval != math.inf:
            self._first_at = trio.current_time()
        self._parts.append(text)
        self._chars += len(text)
        self._last = event
        if self._chars >= self._min_chars:
            out.extend(self.flush())
        return out

    def flush(self) -> list[FlowEvent]:
        """Return the held tokens as one chunk (an empty list if none are held)."""
        last = self._last
        if not self._parts or last is None:
            return []
        chunk = type(last)(
            _CHUNK,
            {"chunk": "".join(self._parts), "tokens": len(self._parts)},
            last.timestamp,
            last.seq,
            last.run_id,
        )
        self._parts = []
        self._chars = 0
        self._first_at = math.inf
        self._last = None
        return [chunk]


class _ErrorBox:
    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Exception | None = None


class _CoalescedStream:
    """The consumer's end: the coalesced events, then the source's error if it failed."""

    __slots__ = ("_box", "_receive")

    def __init__(self, receive: trio.MemoryReceiveChannel[FlowEvent], box: _ErrorBox) -> None:
        self._receive = receive
        self._box = box

    def __aiter__(self) -> _CoalescedStream:
        return self

    async def __anext__(self) -> FlowEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            error, self._box.error = self._box.error, None
            if error is not None:
                raise error from None
            raise StopAsyncIteration from None


async def _pump(
    events: AsyncIterable[FlowEvent], send: trio.MemorySendChannel[FlowEvent], box: _ErrorBox
) -> None:
    async with send:
        try:
            async for event in events:
                await send.send(event)
        except Exception as exc:  # handed to the consumer after the events before it
            box.error = exc


async def _coalesce(
    coalescer: TokenCoalescer,
    receive: trio.MemoryReceiveChannel[FlowEvent],
    send: trio.MemorySendChannel[FlowEvent],
) -> None:
    async with receive, send:
        ended = False
        while not ended:
            event: FlowEvent | None = None
            # Only the receive runs under the deadline: it is cancel-safe, a send is not.
            with trio.move_on_at(coalescer.deadline()):
                try:
                    event = await receive.receive()
                except trio.EndOfChannel:
                    ended = True
            out = coalescer.flush() if event is None else coalescer.feed(event)
            for item in out:
                await send.send(item)


@asynccontextmanager
async def coalesce_tokens(
    events: AsyncIterable[FlowEvent],
    *,
    min_chars: int = 20,
    interval: float | None = 0.05,
    buffer: int = 16,
) -> AsyncIterator[AsyncIterator[FlowEvent]]:
    """Coalesce the ``token.received`` events of a stream into ``token.chunk`` events.

    Buffered streaming: fewer, larger writes to a slow client. Tokens are
    held until their text reaches ``min_chars`` characters or the first of
    them is ``interval`` seconds old, whichever comes first, and then come out
    as one ``token.chunk`` (data ``{"chunk", "tokens"}``, the ``run_id`` of its
    tokens). Every other event passes through, in order, after the tokens
    before it. Held tokens are flushed when the stream ends. See
    :class:`TokenCoalescer` for the details::

        async with executor.stream(agent, task) as events:
            async with coalesce_tokens(events, min_chars=20, interval=0.05) as chunks:
                async for event in chunks:
                    ...

    The source is read by a task of its own, so the interval is kept also
    while the source waits. Backpressure is kept: the source is not read
    faster than the consumer takes events (beyond ``buffer``).

    Args:
        events: any async iterable of events (a subscription, a replay, ...).
        min_chars: the smallest chunk, in characters.
        interval: the longest hold, in seconds, measured on Trio's clock;
            ``None`` for no time limit.
        buffer: how many coalesced events may wait for the consumer (>= 0).

    Yields:
        An async iterator of the coalesced stream. When the source raises an
        exception (say :exc:`~trioflow.recording.RecordingError`), the
        iterator first yields every event before it (held tokens included)
        and then raises that exception.

    Leaving the block early stops reading the source.

    Raises:
        ValueError: ``min_chars``, ``interval`` or ``buffer`` is out of range.
    """
    coalescer = TokenCoalescer(min_chars=min_chars, interval=interval)
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 0:
        raise ValueError(f"buffer must be an int >= 0, not {buffer!r}")
    raw_send, raw_receive = trio.open_memory_channel[FlowEvent](0)
    out_send, out_receive = trio.open_memory_channel[FlowEvent](buffer)
    box = _ErrorBox()
    with collapse_single_group():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, events, raw_send, box, name="trioflow coalesce source")
            nursery.start_soon(_coalesce, coalescer, raw_receive, out_send)
            try:
                yield _CoalescedStream(out_receive, box)
            finally:
                nursery.cancel_scope.cancel()
                out_receive.close()


async def coalesce_into(
    events: AsyncIterable[FlowEvent],
    bus: EventBus,
    *,
    min_chars: int = 20,
    interval: float | None = 0.05,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Re-emit a stream into ``bus`` with its tokens coalesced (see :func:`coalesce_tokens`).

    Every event, chunk or passed-through, is emitted with :meth:`EventBus.emit`,
    which gives it the bus's next seq and keeps its ``run_id``, data and
    timestamp. Typical use: a bus for slow clients fed from a run::

        async with run.subscribe() as events:
            nursery.start_soon(coalesce_into, events, client_bus)

    Args:
        events: the source stream.
        bus: where to emit.
        min_chars: as :func:`coalesce_tokens`.
        interval: as :func:`coalesce_tokens`.
        task_status: for ``nursery.start``: started once the source is being read.

    Returns:
        How many events were emitted, once the source ended.

    Raises:
        trio.ClosedResourceError: ``bus`` closed before the source ended.
        Exception: whatever the source raised, after the events before it were emitted.
    """
    emitted = 0
    async with coalesce_tokens(events, min_chars=min_chars, interval=interval) as chunks:
        task_status.started()
        async for event in chunks:
            await bus.emit(event)
            emitted += 1
    return emitted
