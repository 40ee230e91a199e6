"""One run's event stream, encoded once and written to every watching connection.

An event stream with a thousand clients on ten runs carries each event to a
hundred connections. Reading the run through one subscription per connection
costs a task switch per connection and an encoding per connection for every
event. :class:`EventFanout` reads the run once (one subscription, one task),
encodes each batch of events once, and appends the same bytes to every
connection's :class:`FanoutTarget`. A run has one fan-out per encoding
(:class:`~trioflow.web._streams.Encoding`): one for its event-stream frames,
one for its WebSocket messages, each reading the run once.

Where the connection is served by trioflow itself (an event stream under
:func:`~trioflow.web.serve`, :mod:`trioflow.web._direct`, or a WebSocket
following one run, :mod:`trioflow.web._direct_ws`), a target is *direct*:
the fan-out writes the HTTP/1.1 chunk (the WebSocket frames) to the
connection's own socket without blocking (``os.write`` on its non-blocking
descriptor; no second descriptor), so a client that keeps up costs one system call per
batch and no task switch at all. What the kernel does not take at once goes
to the target's pending bytes, which the connection's task (the socket's
owner) sends with its ``send_all`` (which has the write timeout); the target
writes directly again once they are out. The direct write is the fan-out
writing on the owner's behalf while the owner waits for it (in
:meth:`FanoutTarget.wait`), never while the owner writes: the target is
direct only between :meth:`FanoutTarget.go_direct` and the next partial
write, and the owner calls ``go_direct`` only with nothing of its own to
send. The descriptor is read from the socket at every write, so a socket
the owner has closed is never written to (its descriptor reads ``-1``).
A target without a socket (any other ASGI server, or middleware) is never
direct: its task sends the pending bytes with the ASGI ``send``.

Every target is bounded: when more than ``limit`` events wait in its pending
bytes, it is evicted. Bytes already handed to the kernel, or the part of a
chunk the kernel took half of, are never taken back; the client receives the
events up to :attr:`FanoutTarget.committed_through` completely, then an
``evicted`` error event, then the end of the stream, and can resume with
``Last-Event-ID``.

The fan-out ends with the run (after its terminal event), when the run's
event bus closes, when its own subscription is evicted (the process could not
keep up with the run at all: every target is evicted), or when its last
target leaves. Connections read the run through a subscription of their own
until they have caught up with the fan-out, then join it (see
:func:`~trioflow.web._streams.stream_run`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar, cast

import trio

from trioflow.bus import Overflow, SubscriberEvicted, Subscription
from trioflow.events import FlowEvent
from trioflow.history import HistoryExpired

if TYPE_CHECKING:
    from trioflow.handle import RunHandle

__all__ = [
    "EventFanout",
    "FanoutStatistics",
    "FanoutTarget",
    "chunk",
]


F = TypeVar("F")
"""One event's frame (``bytes`` for SSE, ``str`` for a WebSocket message)."""
P = TypeVar("P")
"""A batch's frames as handed to a target at once (``bytes`` for SSE, a list of messages for WS)."""


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk: its size in hex, CRLF, ``data``, CRLF."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclasses.dataclass(frozen=True, slots=True)
class FanoutStatistics:
    """A snapshot of an :class:`EventFanout`'s figures."""

    run_id: str
    targets: int
    """Connections receiving the run's events now."""
    direct: int
    """Of those, how many the fan-out writes to directly at this moment."""
    position: int
    """The seq of the last event the fan-out has written out (or it started after)."""
    batches: int
    """Batches of events read from the run."""
    direct_writes: int
    """Writes straight to a socket (one per batch and direct target)."""
    queued_writes: int
    """Writes left to a connection's task (no socket, or the socket was full)."""
    evicted: int
    """Targets evicted for falling more than their limit behind."""


class FanoutTarget(Generic[P]):
    """One connection's share of an :class:`EventFanout`: its pending pieces and its state.

    Made by :meth:`EventFanout.add`; the connection's task calls
    :meth:`wait`, :meth:`take` and :meth:`go_direct` (see
    :func:`~trioflow.web._streams.stream_run`) and leaves with
    :meth:`EventFanout.discard`. A *piece* is the frames of one batch as
    the fan-out hands them on: bytes for an event stream, a list of
    messages for a WebSocket.

    Args:
        skip_through: events up to this seq were sent by the connection
            itself before it joined; the fan-out skips them.
        limit: the most events that may wait in the pending bytes.
        sock: the connection's own non-blocking socket, to write to
            directly (owned by the connection's task, which closes it;
            never by the target), or ``None`` to leave every write to the
            connection's task. Only a target of byte pieces has one. The
            owner may take it away (:meth:`close`) while it writes
            something of its own, and give it back once that is out
            (:mod:`trioflow.web._direct_ws`).
        encode: how to frame a piece for this connection (:func:`chunk`
            for a raw HTTP/1.1 socket, identity for ASGI).
    """

    __slots__ = (
        "_event",
        "_pending",
        "_pending_events",
        "_queued_through",
        "_remainder",
        "broken",
        "committed_through",
        "direct",
        "encode",
        "evicted",
        "finished",
        "limit",
        "skip_through",
        "sock",
    )

    def __init__(
        self,
        *,
        skip_through: int,
        limit: int,
        sock: trio.socket.SocketType | None,
        encode: Callable[[P], P],
    ) -> None:
        self.skip_through = skip_through
        self.limit = limit
        self.sock = sock
        self.encode = encode
        self.direct = False
        """Whether the fan-out writes straight to :attr:`sock` now."""
        self.finished = False
        """Whether the stream is over: after the pending bytes, nothing more comes."""
        self.broken = False
        """Whether the socket failed (the client has gone)."""
        self.evicted = False
        """Whether the target was evicted (its last piece is the ``evicted`` frame)."""
        self.committed_through = skip_through
        """Every event up to this seq is written out or on its way (never taken back)."""
        self._queued_through = skip_through
        self._remainder: P | None = None  # the rest of a chunk the kernel took part of: committed
        self._pending: list[P] = []  # queued, not committed: dropped on eviction
        self._pending_events = 0
        self._event = trio.Event()

    # -- the connection's side -----------------------------------------------

    @property
    def partial(self) -> bool:
        """Whether the rest of a piece the kernel took part of waits: it goes out before anything else."""
        return self._remainder is not None

    @property
    def pending(self) -> int:
        """How many events wait in the pending pieces (the ones an eviction would drop)."""
        return self._pending_events

    async def wait(self) -> None:
        """Wait until there are bytes to send or the target has finished."""
        if self._remainder is not None or self._pending or self.finished:
            await trio.lowlevel.checkpoint()
            return
        await self._event.wait()
        self._event = trio.Event()

    def take(self) -> list[P]:
        """Every pending piece, in order, to be sent by the connection's task; ``[]`` if none."""
        pieces = self._pending
        if self._remainder is not None:
            pieces.insert(0, self._remainder)
            self._remainder = None
        self._pending = []
        self._pending_events = 0
        self.committed_through = self._queued_through
        return pieces

    def go_direct(self) -> None:
        """Let the fan-out write straight to the socket again (once :meth:`take` emptied it)."""
        if self.sock is not None and not (
            self._remainder is not None or self._pending or self.finished
        ):
            self.direct = True

    def close(self) -> None:
        """Stop direct writes and forget the socket (its owner closes it); idempotent."""
        self.direct = False
        self.sock = None

    # -- the fan-out's side ----------------------------------------------------

    def _write(self, piece: P, events: int, last_seq: int) -> bool:
        """Hand ``piece`` (``events`` events, the last one ``last_seq``) on; False: evict."""
        if self.direct:
            assert self.sock is not None
            data = cast("bytes", piece)  # a target with a socket has byte pieces
            try:
                # The owner's own descriptor, read now: -1 (EBADF) once closed.
                # Python ignores SIGPIPE: a peer gone is an OSError here.
                sent = os.write(self.sock.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._break()
                return True
            # A chunk the kernel took part of must be completed: it is committed.
            self.committed_through = self._queued_through = last_seq
            if sent < len(data):
                self.direct = False
                self._remainder = cast("P", data[sent:])
                self._event.set()
            return True
        self._pending.append(piece)
        self._pending_events += events
        self._queued_through = last_seq
        self._event.set()
        return self._pending_events <= self.limit

    def _evict(self, error: P) -> None:
        """Drop the uncommitted pieces and finish with ``error`` (framed already)."""
        self.evicted = True
        self._pending = [error]
        self._pending_events = 0
        self._queued_through = self.committed_through
        self._finish()

    def _finish(self) -> None:
        self.direct = False
        self.finished = True
        self._event.set()

    def _break(self) -> None:
        self.broken = True
        self._remainder = None
        self._pending.clear()
        self._pending_events = 0
        self._finish()


class EventFanout(Generic[F, P]):
    """Reads one run once and writes each batch of its events to every :class:`FanoutTarget`.

    Made and started by :meth:`~trioflow.web._runs.RunHub.fanout`; see the
    module documentation.

    Args:
        run: the run (or a replay served as one).
        encode: the frames of a batch of events, one per event (a
            :meth:`~trioflow.web._streams.FrameCache.frames`: encoded once per run).
        join: the frames of a batch as one piece (``b"".join`` for SSE,
            ``list`` for WebSocket messages).
        evicted: makes the ``evicted`` error frame for a target, given the
            last seq it received.
        keepalive: seconds of silence after which every target gets
            ``keepalive_frame``.
        keepalive_frame: the frame sent after ``keepalive`` seconds of
            silence (``None``: nothing is sent).
        buffer: the bound of the fan-out's own subscription (it is evicted,
            and every target with it, only if the process cannot keep up).
        name: the encoding's name, for the subscription's (``"sse fanout <run id>"``).
    """

    def __init__(
        self,
        run: RunHandle,
        *,
        encode: Callable[[list[FlowEvent]], list[F]],
        join: Callable[[list[F]], P],
        evicted: Callable[[int], F],
        keepalive: float,
        keepalive_frame: F | None,
        buffer: int = 4096,
        name: str = "sse",
    ) -> None:
        self.run = run
        self.name = name
        self._encode = encode
        self._join = join
        self._evicted_frame = evicted
        self._keepalive = keepalive if keepalive_frame is not None else math.inf
        self._keepalive_frame = keepalive_frame
        self._buffer = buffer
        self._targets: list[FanoutTarget[P]] = []
        self._claims = 0
        self._sub: Subscription | None = None
        self._scope = trio.CancelScope()
        self._done = False
        self.ready = False
        """Whether the fan-out has subscribed: :attr:`position` is set and targets may join."""
        self.position = 0
        """The seq of the last event written to the targets (or the fan-out started after)."""
        self._batches = 0
        self._direct_writes = 0
        self._queued_writes = 0
        self._evicted = 0
        self.on_close: Callable[[EventFanout[F, P]], None] | None = None
        """Called once when the fan-out stops (the hub forgets it)."""
        self.on_change: Callable[[], None] | None = None
        """Called when a target joins or leaves (the hub wakes those waiting on it)."""

    @property
    def open(self) -> bool:
        """Whether targets may still join (False once the fan-out has stopped or is stopping)."""
        return not self._done

    def statistics(self) -> FanoutStatistics:
        """A snapshot of the fan-out's figures."""
        return FanoutStatistics(
            run_id=self.run.run_id,
            targets=len(self._targets),
            direct=sum(1 for t in self._targets if t.direct),
            position=self.position,
            batches=self._batches,
            direct_writes=self._direct_writes,
            queued_writes=self._queued_writes,
            evicted=self._evicted,
        )

    def add(self, target: FanoutTarget[P]) -> None:
        """Add ``target``; the next batch after its ``skip_through`` goes to it.

        Raises:
            RuntimeError: the fan-out is not ready or has stopped, or
                ``target`` would miss events (its ``skip_through`` is before
                :attr:`position`).
        """
        if self._done or not self.ready:
            raise RuntimeError("the fan-out is not running")
        if target.skip_through < self.position:
            raise RuntimeError(
                f"target starts after {target.skip_through}, the fan-out is at {self.position}"
            )
        self._targets.append(target)
        if self.on_change is not None:
            self.on_change()

    def discard(self, target: FanoutTarget[P]) -> None:
        """Remove ``target`` (idempotent); the fan-out writes to its socket no more.

        The fan-out stops when its last target leaves and no connection
        holds a :meth:`claim` on it.
        """
        target.close()
        try:
            self._targets.remove(target)
        except ValueError:
            return
        if self.on_change is not None:
            self.on_change()
        self._stop_if_unused()

    def claim(self) -> None:
        """Keep the fan-out going, with no target, until :meth:`release` (a connection about to join)."""
        self._claims += 1

    def release(self) -> None:
        """Give back a :meth:`claim`; with no claim and no target left, the fan-out stops."""
        self._claims -= 1
        self._stop_if_unused()

    def _stop_if_unused(self) -> None:
        if not self._targets and self._claims <= 0:
            self._stop()

    async def run_until_done(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Subscribe to the run, report ready, then fan its events out until it ends.

        Start it with :meth:`trio.Nursery.start`: once started, :attr:`position`
        is where the fan-out's subscription begins.
        """
        try:
            with self._scope:
                self.position = self.run.last_seq
                try:
                    async with self.run.subscribe(
                        after=self.position,
                        buffer=self._buffer,
                        overflow=Overflow.EVICT,
                        name=f"{self.name} fanout {self.run.run_id}",
                    ) as sub:
                        self._sub = sub
                        self.ready = True
                        task_status.started()
                        await self._pump(sub)
                except HistoryExpired:  # pragma: no cover - last_seq is always retained
                    task_status.started()
        finally:
            self._stop()
            for target in self._targets:
                target._finish()

    async def _pump(self, sub: Subscription) -> None:
        while True:
            batch: list[FlowEvent] | None = None
            with trio.move_on_after(self._keepalive):
                try:
                    batch = await sub.receive_batch()
                except (trio.EndOfChannel, trio.ClosedResourceError):  # ended, or stopped (_stop)
                    return
                except SubscriberEvicted:
                    for target in list(self._targets):
                        self._evict(target)
                    return
            if batch is None:
                if self._keepalive_frame is not None:
                    self._broadcast([], self._join([self._keepalive_frame]), 0, self.position)
                continue
            self._batches += 1
            frames = self._encode(batch)
            last = batch[-1].seq
            self._broadcast(batch, self._join(frames), len(batch), last, frames)
            self.position = last
            if batch[-1].is_terminal():
                for target in self._targets:
                    target._finish()
                self._targets.clear()
                return

    def _broadcast(
        self,
        batch: list[FlowEvent],
        data: P,
        events: int,
        last: int,
        frames: list[F] | None = None,
    ) -> None:
        framed: dict[Callable[[P], P], P] = {}
        for target in list(self._targets):
            if batch and target.skip_through >= batch[0].seq:
                # It joined with events of this batch sent already: only the rest.
                assert frames is not None
                kept = [
                    f for e, f in zip(batch, frames, strict=True) if e.seq > target.skip_through
                ]
                if not kept:
                    continue
                events_here = len(kept)
                out = target.encode(self._join(kept))
            else:
                events_here = events
                cached = framed.get(target.encode)
                if cached is None:
                    cached = framed[target.encode] = target.encode(data)
                out = cached
            if target.direct:
                self._direct_writes += 1
            else:
                self._queued_writes += 1
            if not target._write(out, events_here, last):
                self._evict(target)
            elif target.broken:
                self._targets.remove(target)

    def _evict(self, target: FanoutTarget[P]) -> None:
        self._evicted += 1
        error = self._join([self._evicted_frame(target.committed_through)])
        target._evict(target.encode(error))
        try:
            self._targets.remove(target)
        except ValueError:
            pass

    def _stop(self) -> None:
        if self._done:
            return
        self._done = True
        self._scope.cancel()
        if self._sub is not None:
            self._sub.close()  # at once, not when the task next runs
        if self.on_close is not None:
            self.on_close(self)
