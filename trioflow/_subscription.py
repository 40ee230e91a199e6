"""A subscriber's channel: a bounded single-consumer channel of events with an overflow policy.

:class:`Subscription` has the semantics and exceptions of a
:func:`trio.open_memory_channel` receive side (``receive`` is a checkpoint and
takes nothing if cancelled; :exc:`trio.EndOfChannel` once the bus closed and
every event was read, :exc:`trio.ClosedResourceError` once its owner closed it,
:exc:`trio.WouldBlock` from ``receive_nowait``), with one producer, the bus.
It is a :class:`collections.deque` and at most one parked receiver, woken with
:func:`trio.lowlevel.reschedule` (parked with
:func:`trio.lowlevel.wait_task_rescheduled`), rather than a trio memory
channel, for the batch path: the bus appends to every subscriber without a
task switch or a checkpoint per event, and :meth:`Subscription.receive_batch`
takes every ready event in one step.

A full channel applies its :class:`Overflow` policy; under
:attr:`Overflow.EVICT` the subscriber ends with :exc:`SubscriberEvicted`, a
:exc:`trio.BrokenResourceError`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeAlias

import trio

from trioflow.events import FlowEvent

# The trio primitives of the hot paths, looked up once.
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_current_task = trio.lowlevel.current_task
_reschedule = trio.lowlevel.reschedule
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_ABORTED = trio.lowlevel.Abort.SUCCEEDED


class Overflow(enum.StrEnum):
    """What a subscriber's channel does when an event arrives and it is full."""

    BLOCK = "block"
    """Backpressure: the emitter waits until there is room. Nothing is lost."""
    DROP_OLDEST = "drop_oldest"
    """Discard the oldest buffered event to make room: keep the newest ``buffer``."""
    DROP_NEWEST = "drop_newest"
    """Discard the arriving event: keep the oldest ``buffer``."""
    EVICT = "evict"
    """Close the subscriber; it reads what was buffered, then gets :exc:`SubscriberEvicted`."""


class SubscriberEvicted(trio.BrokenResourceError):
    """The subscriber fell behind under :attr:`Overflow.EVICT` and was closed.

    Everything up to and including :attr:`last_seq` was delivered; subscribe
    again with ``after=last_seq`` to resume with no gap (as long as the
    history still holds the events).

    Attributes:
        last_seq: the seq of the last event delivered to this subscriber.
    """

    def __init__(self, last_seq: int, capacity: int) -> None:
        super().__init__(
            f"subscriber evicted: it fell behind with {capacity} events buffered; "
            f"resume with after={last_seq}"
        )
        self.last_seq = last_seq


# Which events a subscriber wants (described in trioflow.bus, which exports it).
EventFilter: TypeAlias = Collection[str] | str | Callable[[FlowEvent], bool] | None


@dataclasses.dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of one subscriber's channel."""

    id: int
    """The subscription's id, unique per bus."""
    name: str
    """The name given at subscribe time (or ``"subscription-<id>"``)."""
    size: int
    """Events buffered now (replay backlog included)."""
    capacity: int
    """The channel's bound (``buffer``)."""
    utilization: float
    """``size`` as a percentage of ``capacity`` (may pass 100 during a replay)."""
    dropped: int
    """Events discarded by the overflow policy."""
    delivered: int
    """Events the consumer has received."""
    overflow: Overflow
    """The overflow policy."""
    evicted: bool
    """Whether the subscriber was evicted (:attr:`Overflow.EVICT`)."""
    closed: bool
    """Whether the subscription has ended."""


class Subscription:
    """One subscriber: a bounded channel of events and its overflow policy.

    Made by :meth:`EventBus.subscribe`; iterate it with ``async for``, or call
    :meth:`receive` / :meth:`receive_batch`. Iteration ends cleanly when the
    bus closes (after the last buffered event) and raises
    :exc:`SubscriberEvicted` when an :attr:`Overflow.EVICT` subscriber fell
    behind.

    The channel is a bounded single-consumer memory channel with the
    semantics (and exceptions) of :func:`trio.open_memory_channel`,
    specialised for fan-out: the bus appends without a task switch, and
    :meth:`receive_batch` takes every ready event in one step.
    """

    __slots__ = (
        "_accepts",
        "_all",
        "_buf",
        "_capacity",
        "_closed",
        "_delivered",
        "_dropped",
        "_ended",
        "_evicted",
        "_last_seq",
        "_on_leave",
        "_receiver",
        "_replay",
        "_senders",
        "_types",
        "_waiting_senders",
        "id",
        "name",
        "overflow",
    )

    def __init__(
        self,
        sub_id: int,
        *,
        name: str | None,
        types: frozenset[str] | Callable[[FlowEvent], bool] | None,
        buffer: int,
        overflow: Overflow,
        on_leave: Callable[[Subscription, bool], None],
    ) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"subscription buffer must be an int >= 1, not {buffer!r}")
        self._on_leave = on_leave  # the bus forgets it (True: it was evicted)
        self.id = sub_id
        self.name = name or f"subscription-{sub_id}"
        self.overflow = Overflow(overflow)
        self._capacity = buffer
        self._types: frozenset[str] | None = None
        self._accepts: Callable[[FlowEvent], bool] | None = None
        if isinstance(types, frozenset):
            self._types = types
        elif types is not None:
            self._accepts = types
        self._all = self._types is None and self._accepts is None
        self._buf: deque[FlowEvent] = deque()
        self._replay: deque[FlowEvent] = deque()
        self._receiver: trio.lowlevel.Task | None = None
        self._senders = trio.lowlevel.ParkingLot()
        self._waiting_senders = 0  # tasks parked in _senders (cheaper to test than the lot)
        self._delivered = 0
        self._dropped = 0
        self._last_seq = 0
        self._evicted: SubscriberEvicted | None = None
        self._ended = False  # producer side closed: EndOfChannel once drained
        self._closed = False  # consumer side closed: ClosedResourceError

    def __repr__(self) -> str:
        return (
            f"<Subscription {self.name!r} overflow={self.overflow.value} "
            f"size={len(self._buf) + len(self._replay)}/{self._capacity}>"
        )

    def _matches(self, event: FlowEvent) -> bool:
        if self._types is not None:
            return event.type in self._types
        if self._accepts is not None:
            return self._accepts(event)
        return True

    @property
    def last_seq(self) -> int:
        """The seq of the last event received (``after`` for a resume); 0 before any."""
        return self._last_seq

    @property
    def closed(self) -> bool:
        """Whether the subscription has ended (closed by either side or evicted)."""
        return self._closed or self._ended

    # -- consumer side ---------------------------------------------------------

    async def receive(self) -> FlowEvent:
        """Wait for the next event and return it.

        Replayed history comes first, then live events, in seq order. If
        cancelled, no event was taken.

        Raises:
            trio.EndOfChannel: the bus closed and every event was received.
            SubscriberEvicted: the subscriber was evicted (after the buffered events).
            trio.ClosedResourceError: the subscription was closed by its owner.
        """
        await _checkpoint_if_cancelled()
        if self._replay or self._buf:
            event = self._take_one()
            await _cancel_shielded_checkpoint()
            return event
        while not (self._replay or self._buf):
            await self._park()
        return self._take_one()

    def receive_nowait(self) -> FlowEvent:
        """Return the next event if one is ready.

        Raises:
            trio.WouldBlock: no event is ready.
            trio.EndOfChannel: the bus closed and every event was received.
            SubscriberEvicted: the subscriber was evicted (after the buffered events).
            trio.ClosedResourceError: the subscription was closed by its owner.
        """
        if self._closed:
            raise trio.ClosedResourceError("subscription is closed")
        if not (self._replay or self._buf):
            self._raise_if_ended()
            raise trio.WouldBlock
        return self._take_one()

    async def receive_batch(self, max_items: int = 256) -> list[FlowEvent]:
        """Wait for at least one event, then return every ready one, up to ``max_items``.

        Transports use this to write several events with one send. The batch
        is in seq order and never empty. If cancelled, no event was taken.

        Raises:
            ValueError: ``max_items`` is below 1.
            trio.EndOfChannel: the bus closed and every event was received.
            SubscriberEvicted: the subscriber was evicted (after the buffered events).
            trio.ClosedResourceError: the subscription was closed by its owner.
        """
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, not {max_items}")
        await _checkpoint_if_cancelled()
        if self._replay or self._buf:
            await _cancel_shielded_checkpoint()
        else:
            while not (self._replay or self._buf):
                await self._park()
        if self._closed:
            raise trio.ClosedResourceError("subscription is closed")
        source = self._replay or self._buf
        if len(source) <= max_items:
            batch = list(source)
            source.clear()
        else:
            batch = [source.popleft() for _ in range(max_items)]
        if self._waiting_senders:
            self._senders.unpark_all()
        self._delivered += len(batch)
        self._last_seq = batch[-1].seq
        return batch

    def _park(self) -> Awaitable[object]:
        """Raise at the end of the channel; else return the wait for the next event.

        A plain function returning trio's wait, so that waiting adds no
        coroutine frame of its own to the consumer's hot path.
        """
        if self._closed:
            raise trio.ClosedResourceError("subscription is closed")
        self._raise_if_ended()
        self._receiver = _current_task()
        return _wait_task_rescheduled(self._abort_park)

    def _abort_park(self, _: Any) -> trio.lowlevel.Abort:
        self._receiver = None
        return _ABORTED

    def _raise_if_ended(self) -> None:
        if self._ended:
            if self._evicted is not None:
                raise self._evicted
            raise trio.EndOfChannel

    def _take_one(self) -> FlowEvent:
        if self._closed:
            raise trio.ClosedResourceError("subscription is closed")
        if self._replay:
            event = self._replay.popleft()
        else:
            event = self._buf.popleft()
            if self._waiting_senders:
                self._senders.unpark()
        self._delivered += 1
        self._last_seq = event.seq
        return event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> FlowEvent:
        # receive(), inlined: one coroutine frame less per event.
        try:
            await _checkpoint_if_cancelled()
            if self._replay or self._buf:
                event = self._take_one()
                await _cancel_shielded_checkpoint()
                return event
            while not (self._replay or self._buf):
                await self._park()
            return self._take_one()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def statistics(self) -> SubscriptionStatistics:
        """A snapshot of this subscriber's figures."""
        size = len(self._buf) + len(self._replay)
        return SubscriptionStatistics(
            id=self.id,
            name=self.name,
            size=size,
            capacity=self._capacity,
            utilization=round(size / self._capacity * 100.0, 2),
            dropped=self._dropped,
            delivered=self._delivered,
            overflow=self.overflow,
            evicted=self._evicted is not None,
            closed=self.closed,
        )

    def close(self) -> None:
        """Unsubscribe now: the bus stops delivering and buffered events are discarded.

        Idempotent. A task waiting in :meth:`receive` gets
        :exc:`trio.ClosedResourceError`; an emitter blocked on this
        subscriber moves on.
        """
        if self._closed:
            return
        self._closed = True
        self._on_leave(self, False)
        self._replay.clear()
        self._buf.clear()
        self._wake_receiver()
        self._senders.unpark_all()

    async def aclose(self) -> None:
        """:meth:`close`, with a checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()

    # -- producer side (called by the bus) -------------------------------------

    def _wake_receiver(self) -> None:
        task = self._receiver
        if task is not None:
            self._receiver = None
            _reschedule(task)

    def _overflowed(self, event: FlowEvent) -> bool:
        """Apply the overflow policy to ``event`` arriving at a full buffer.

        Returns False for BLOCK (nothing done: the emitter must wait).
        """
        overflow = self.overflow
        if overflow is Overflow.BLOCK:
            return False
        self._dropped += 1 if overflow is not Overflow.EVICT else 0
        if overflow is Overflow.DROP_OLDEST:
            self._buf.popleft()
            self._buf.append(event)
        elif overflow is Overflow.EVICT:
            self._evict()
        return True

    def _offer(self, event: FlowEvent) -> bool:
        """Deliver without blocking, applying the overflow policy.

        Returns False only for a full BLOCK subscriber (nothing done).
        """
        if self._ended or self._closed:
            return True
        buf = self._buf
        if len(buf) < self._capacity:
            buf.append(event)
            if self._receiver is not None:
                self._wake_receiver()
            return True
        return self._overflowed(event)

    async def _offer_blocking(self, event: FlowEvent) -> None:
        """Deliver, waiting for room (BLOCK). Returns early if either side closes."""
        while not self._offer(event):
            self._waiting_senders += 1
            try:
                await self._senders.park()
            finally:
                self._waiting_senders -= 1

    def _evict(self) -> None:
        # Everything buffered will still be read, so the resume point is the
        # newest buffered event (or replayed, or received).
        if self._buf:
            last = self._buf[-1].seq
        elif self._replay:
            last = self._replay[-1].seq
        else:
            last = self._last_seq
        self._evicted = SubscriberEvicted(last, self._capacity)
        self._on_leave(self, True)
        self._end()

    def _end(self) -> None:
        """Close the producer side: the consumer reads what is buffered, then the end."""
        self._ended = True
        self._wake_receiver()
        self._senders.unpark_all()
