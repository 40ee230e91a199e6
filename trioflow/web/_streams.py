"""One run's events to one connection, encoded once: the part event streams and WebSockets share.

An event stream (:mod:`trioflow.web._sse`) and a WebSocket following a run
(:mod:`trioflow.web._ws`) do the same thing with different frames: replay
the run's retained events after a resume point, go on live, stop at the
terminal event, and tell a client that fell behind where to resume. What a
protocol makes of events is its :class:`Encoding`; the rest is here, once:

* :class:`FrameCache` holds a run's newest frames of one encoding, each
  encoded once, in step with the run's history (a late joiner's replay is
  the frames a live client got, byte for byte);
* :func:`stream_run` joins the run's fan-out for that encoding
  (:class:`~trioflow.web._fanout.EventFanout`, one per run and encoding,
  :meth:`~trioflow.web._runs.RunHub.fanout`) and sends what the fan-out
  leaves to the connection until the stream is over. When the fan-out is
  running and the cache holds the replay, the connection joins it at once
  (no subscription of its own; the usual case for a live run someone
  watches); otherwise it first reads the run through a subscription of its
  own (bounded, :attr:`~trioflow.Overflow.EVICT`: the replay from the
  history, ``HistoryExpired`` included) until it has caught up;
* a :class:`StreamOutput` is where one connection's stream of one run goes
  (the ASGI ``send`` or the socket for an event stream, the WebSocket's
  send lock for a followed run).

The two protocols differ only in what a :class:`StreamOutput` does with
the frames and with the end: an event stream *ends* (its response is over,
eviction included), while a WebSocket stays open after a run's stream
stops (an ``evicted`` error frame, then ``resume`` on the same socket), so
:func:`stream_run` tells its caller whether the end of the run was
delivered.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from trioflow.bus import Overflow, SubscriberEvicted, Subscription
from trioflow.events import FlowEvent
from trioflow.handle import RunHandle as Run
from trioflow.web._fanout import EventFanout, FanoutTarget

if TYPE_CHECKING:
    from trioflow.web._config import WebConfig
    from trioflow.web._runs import RunHub

__all__ = [
    "Encoding",
    "FrameCache",
    "StreamOutput",
    "frame_cache",
    "new_fanout",
    "stream_run",
]

F = TypeVar("F")
"""One event's frame: ``bytes`` (an SSE frame), ``str`` (a WebSocket text message)."""
P = TypeVar("P")
"""The frames of a batch as written at once: ``bytes`` joined (SSE), a ``list`` of messages (WS)."""


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Encoding(Generic[F, P]):
    """What a protocol makes of a run's events.

    One instance per protocol (module level): its :attr:`name` keys the
    run's :class:`FrameCache` and fan-out, and names the subscriptions.
    """

    name: str
    """``"sse"`` or ``"ws"``: beside the run id, the key of the run's cache and fan-out."""
    event: Callable[[FlowEvent], F]
    """One event's frame (called once per event and run, by the :class:`FrameCache`)."""
    join: Callable[[list[F]], P]
    """The frames of a batch as one piece, written at once."""
    evicted: Callable[[str, int], F]
    """The ``evicted`` error frame, given the run id and the last seq the client got."""
    keepalive: F | None = None
    """The frame sent after ``keepalive`` seconds of silence (``None``: none)."""


# -- encoded once -----------------------------------------------------------------------


class FrameCache(Generic[F]):
    """The frames of a run's newest events in one encoding, each encoded once.

    In step with the run's history: it holds at most ``capacity`` frames
    (the history's bound), of consecutive seqs. It is only ever asked for
    the frames of events in hand (read from the run's history or live by a
    subscription), so it never serves a frame the history no longer holds:
    a resume from too far back fails with :exc:`~trioflow.history.HistoryExpired`
    in the subscription, exactly as without the cache.

    Args:
        capacity: the most frames kept (``0``: none, every frame is encoded).
        encode: one event's frame (:attr:`Encoding.event`).
    """

    __slots__ = ("_encode", "_first", "_frames", "capacity")

    def __init__(self, capacity: int, encode: Callable[[FlowEvent], F]) -> None:
        self.capacity = capacity
        self._encode = encode
        self._frames: collections.deque[F] = collections.deque(maxlen=capacity)
        self._first = 1  # the seq of _frames[0]

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def first_seq(self) -> int:
        """The seq of the oldest frame held (``last_seq + 1`` when none is)."""
        return self._first

    def get(self, seq: int) -> F | None:
        """The frame of event ``seq``, or ``None`` if it is not held."""
        index = seq - self._first
        if 0 <= index < len(self._frames):
            return self._frames[index]
        return None

    def frames(self, events: list[FlowEvent]) -> list[F]:
        """The frames of ``events`` (consecutive seqs): held ones as they are, the others encoded and kept."""
        frames = self._frames
        if not events:
            return []
        held = len(frames)
        index = events[0].seq - self._first
        # The two usual cases, a batch at a time: a live batch (the next
        # events, none held) and a replay (all held).
        if index == held:
            encode = self._encode
            new = [encode(event) for event in events]
            if self.capacity:
                frames.extend(new)  # the oldest may fall out
                self._first += held + len(new) - len(frames)
            return new
        if index >= 0 and index + len(events) <= held:
            return [frames[i] for i in range(index, index + len(events))]
        out: list[F] = []
        for event in events:
            seq = event.seq
            index = seq - self._first
            if 0 <= index < len(frames):
                out.append(frames[index])
                continue
            frame = self._encode(event)
            out.append(frame)
            if not self.capacity:
                continue
            if index == len(frames):  # the next one: keep it (the oldest may fall out)
                if len(frames) == self.capacity:
                    self._first += 1
                frames.append(frame)
            elif index > len(frames):  # a gap (the run went on unwatched): start again here
                frames.clear()
                frames.append(frame)
                self._first = seq
            # an event older than the oldest held: encoded, not kept
        return out


_caches: weakref.WeakKeyDictionary[Run, dict[str, FrameCache[Any]]] = weakref.WeakKeyDictionary()


def frame_cache(run: Run, hub: RunHub, encoding: Encoding[F, Any]) -> FrameCache[F]:
    """The run's :class:`FrameCache` for ``encoding`` (made on first use, bounded like the run's history).

    It lives as long as the run object does.
    """
    caches = _caches.get(run)
    if caches is None:
        caches = _caches[run] = {}
    cache: FrameCache[F] | None = caches.get(encoding.name)
    if cache is None:
        capacity = hub.executor.history
        try:
            capacity = run.bus.history.capacity  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            pass
        cache = caches[encoding.name] = FrameCache(capacity, encoding.event)
    return cache


def new_fanout(
    run: Run, config: WebConfig, encoding: Encoding[F, P], cache: FrameCache[F] | None = None
) -> EventFanout[F, P]:
    """The :class:`~trioflow.web._fanout.EventFanout` writing ``run``'s frames of ``encoding`` (from ``cache``)."""
    return EventFanout(
        run,
        encode=(cache or FrameCache(0, encoding.event)).frames,
        join=encoding.join,
        evicted=functools.partial(encoding.evicted, run.run_id),
        keepalive=config.keepalive if encoding.keepalive is not None else math.inf,
        keepalive_frame=encoding.keepalive,
        buffer=max(4096, config.buffer),
        name=encoding.name,
    )


# -- one connection's stream of one run ---------------------------------------------------


class StreamOutput(Generic[F, P]):
    """Where one connection's stream of one run goes.

    Its methods raise :exc:`trio.BrokenResourceError` or
    :exc:`trio.ClosedResourceError` when the client has gone.
    :attr:`sock` is the socket the fan-out may write to directly (``None``:
    never), :meth:`frame` how a piece is framed for this connection (an
    HTTP/1.1 chunk on a raw socket; as it is elsewhere).
    """

    sock: trio.socket.SocketType | None = None
    broken = False
    """Whether the client went away mid-stream."""

    @staticmethod
    def frame(data: P) -> P:
        """``data`` (a piece) as this output frames it (as it is, by default)."""
        return data

    async def start(self) -> None:
        """Begin the stream (the subscription is open: the resume point is valid)."""
        await trio.lowlevel.checkpoint()

    async def send_frames(self, frames: list[F]) -> None:
        """Send ``frames`` (the connection's own, during the catch-up)."""
        raise NotImplementedError

    async def send_pieces(self, pieces: list[P]) -> None:
        """Send what the fan-out left to this connection (framed by :meth:`frame` already)."""
        raise NotImplementedError

    async def finish(self, frames: list[F]) -> None:
        """Send ``frames`` (maybe none), the last of the stream."""
        raise NotImplementedError

    def holds(self) -> bool:
        """Whether something is held back for the first write (:meth:`flush` sends it)."""
        return False

    async def flush(self) -> None:
        """Send what :meth:`holds` (before the fan-out may write on the connection's behalf)."""
        await trio.lowlevel.checkpoint()

    def joined(self, target: FanoutTarget[P]) -> None:
        """``target`` joined the run's fan-out for this stream (nothing to do, by default)."""

    def left(self, target: FanoutTarget[P]) -> None:
        """``target`` left the fan-out (discarded: it writes no more; nothing to do, by default)."""


class _Ended(enum.Enum):
    DELIVERED = "delivered"  # the terminal event (or the end of the run's events) was sent
    EVICTED = "evicted"  # the client fell behind: the evicted frame was sent


async def stream_run(
    hub: RunHub, run: Run, after: int, out: StreamOutput[F, P], encoding: Encoding[F, P]
) -> bool:
    """Stream ``run``'s events after ``after`` to ``out``; True once the end of the run was delivered.

    False when the client fell behind (the ``evicted`` frame was sent) or
    went away. The connection joins the run's fan-out for ``encoding`` at
    once when it can (:func:`_join_now`); else it reads the run through a
    subscription of its own until it has caught up with the fan-out, then
    joins it.

    Raises:
        HistoryExpired: ``after`` is older than the run's retained history
            (nothing was sent; :meth:`StreamOutput.start` was not called).
    """
    config = hub.config
    cache = frame_cache(run, hub, encoding)
    now = _join_now(hub, run, after, out, encoding, cache)
    if now is not None:
        fanout, target, replay = now
        try:
            await out.start()
            if replay or out.holds():
                await out.send_frames(replay)
        except BaseException:
            fanout.discard(target)
            out.left(target)
            raise
        return await _follow(fanout, target, out)
    async with run.subscribe(
        after=after,
        buffer=config.buffer,
        overflow=Overflow.EVICT,
        name=f"{encoding.name} {run.run_id}",
    ) as sub:
        await out.start()
        claims: list[EventFanout[F, P]] = []
        try:
            joined = await _catch_up(hub, run, after, sub, out, claims, encoding, cache)
        finally:
            for fanout in claims:
                fanout.release()
    if isinstance(joined, _Ended):
        return joined is _Ended.DELIVERED
    return await _follow(*joined, out)


def _join_now(
    hub: RunHub,
    run: Run,
    after: int,
    out: StreamOutput[F, P],
    encoding: Encoding[F, P],
    cache: FrameCache[F],
) -> tuple[EventFanout[F, P], FanoutTarget[P], list[F]] | None:
    """Join the run's running fan-out at once, with the replay from ``cache``, if it can be done.

    The usual way in for a connection to a live run someone already
    watches: no subscription of its own, no await between reading the
    fan-out's position and joining it. Returns the fan-out, the joined
    target and the frames after ``after`` up to the fan-out's position (for
    the connection to send itself before what the fan-out queues for it);
    ``None`` when the connection must catch up through a subscription: no
    fan-out ready, the run has ended, ``after`` is ahead of the fan-out, or
    the replay is not all in the cache or may be older than the run's
    history holds (the subscription then raises
    :exc:`~trioflow.history.HistoryExpired` as it should).
    """
    if run.done:
        return None
    fanout: EventFanout[F, P] | None = hub.running_fanout(run.run_id, encoding.name)
    if fanout is None:
        return None
    position = fanout.position
    if after > position:
        return None
    replay: list[F] = []
    if after < position:
        # The history holds the newest `capacity` events: after + 1 is
        # among them only if no more than that many came since.
        if run.last_seq - after > cache.capacity:
            return None
        for seq in range(after + 1, position + 1):
            frame = cache.get(seq)
            if frame is None:
                return None
            replay.append(frame)
    target: FanoutTarget[P] = FanoutTarget(
        skip_through=position, limit=hub.config.buffer, sock=out.sock, encode=out.frame
    )
    fanout.add(target)
    out.joined(target)
    return fanout, target, replay


async def _catch_up(
    hub: RunHub,
    run: Run,
    after: int,
    sub: Subscription,
    out: StreamOutput[F, P],
    claims: list[EventFanout[F, P]],
    encoding: Encoding[F, P],
    cache: FrameCache[F],
) -> tuple[EventFanout[F, P], FanoutTarget[P]] | _Ended:
    """Stream from the connection's own subscription until it can join the fan-out.

    Returns the fan-out and the joined target, or how the stream ended here
    (terminal event or end of the run's events, eviction). Every fan-out it
    claimed is added to ``claims`` (for the caller to release). The
    replay's frames come from ``cache`` (encoded once per run).
    """
    config = hub.config
    sent_through = after
    fanout: EventFanout[F, P] | None = None
    solo = False  # no fan-out to be had (no nursery for it): stream alone to the end
    keepalive = config.keepalive if encoding.keepalive is not None else math.inf

    def fanout_for(run: Run, config: WebConfig) -> EventFanout[F, P]:
        return new_fanout(run, config, encoding, cache)

    while True:
        # One look at the subscription per turn: every await below may let
        # events in, so each one is followed by a new turn.
        if not solo and sub.statistics().size == 0:
            if fanout is None or not fanout.open:
                fanout = await hub.fanout(run, fanout_for, key=encoding.name)
                solo = fanout is None
                if fanout is not None:
                    claims.append(fanout)
                continue
            if fanout.ready and fanout.position <= sent_through:
                if out.holds():
                    await out.flush()
                    continue
                target: FanoutTarget[P] = FanoutTarget(
                    skip_through=sent_through,
                    limit=config.buffer,
                    sock=out.sock,
                    encode=out.frame,
                )
                fanout.add(target)
                out.joined(target)
                return fanout, target
        batch: list[FlowEvent] | None = None
        ended = False
        evicted: SubscriberEvicted | None = None
        with trio.move_on_after(keepalive):
            try:
                batch = await sub.receive_batch()
            except trio.EndOfChannel:
                ended = True
            except SubscriberEvicted as exc:
                evicted = exc
        if evicted is not None:
            await out.finish([encoding.evicted(run.run_id, evicted.last_seq)])
            return _Ended.EVICTED
        if ended:
            await out.finish([])
            return _Ended.DELIVERED
        if batch is None:
            assert encoding.keepalive is not None
            await out.send_frames([encoding.keepalive])
            continue
        frames = cache.frames(batch)
        sent_through = batch[-1].seq
        if batch[-1].is_terminal():
            await out.finish(frames)
            return _Ended.DELIVERED
        await out.send_frames(frames)


async def _follow(
    fanout: EventFanout[F, P], target: FanoutTarget[P], out: StreamOutput[F, P]
) -> bool:
    """Send what the fan-out leaves to this connection until the stream is over.

    True once the end of the run was delivered (not an eviction, not a
    client gone).
    """
    try:
        while True:
            pieces = target.take()
            if pieces:
                await out.send_pieces(pieces)
                continue
            if target.finished:
                break
            target.go_direct()  # all sent: the fan-out may write itself again
            await target.wait()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        target.broken = True
    finally:
        fanout.discard(target)
        out.left(target)
    if target.broken:
        out.broken = True
        return False
    try:
        await out.finish([])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        out.broken = True
        return False
    return not target.evicted
