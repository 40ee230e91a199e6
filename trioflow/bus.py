"""The event bus: bounded memory channels, one per subscriber, replace the queue.

A bus stamps every event it emits with a sequence number (1, 2, ... with no
gaps), keeps the newest ones in a bounded history, and fans each one out to
its subscribers. Every subscriber owns a bounded :func:`trio.open_memory_channel`
and an :class:`Overflow` policy that says what happens when it falls behind:

* :attr:`Overflow.BLOCK`: backpressure; :meth:`EventBus.emit` waits for room
  and nothing is lost.
* :attr:`Overflow.DROP_OLDEST`: keep the newest ``buffer`` events.
* :attr:`Overflow.DROP_NEWEST`: discard the new event (the PHP queue's policy).
* :attr:`Overflow.EVICT`: close the subscriber with :exc:`SubscriberEvicted`
  once it has read what was buffered; it can resume from the history with
  ``after=error.last_seq``.

Callback listeners (:meth:`EventBus.add_listener`) are subscribers with a task
of their own in the bus's nursery, supervised by a
:class:`~trioflow.RestartPolicy`: a listener that raises is reported and
restarted, or removed once it has crashed too often, never silently lost.

Usage::

    async with trioflow.open_event_bus(history=1024) as bus:
        async with bus.subscribe(types={"token.received"}) as sub:
            await bus.emit("token.received", {"token": "Hi"})
            event = await sub.receive()
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, TypeAlias

import trio

from trioflow._frozen import _FLAT, EMPTY, FrozenDict, freeze_data
from trioflow._util import collapse_single_group
from trioflow.events import (
    EventType,
    FlowEvent,
    _stamp,
    _Unfrozen,
    check_event_types,
    validate_event_type,
)
from trioflow.history import EventHistory, MemoryHistory
from trioflow.protocol import error_info
from trioflow.supervise import Crash, RestartPolicy, SupervisorGaveUp, supervise

__all__ = [
    "DEFAULT_EVENTS",
    "STREAMING_EVENTS",
    "BusStatistics",
    "EventBus",
    "EventFilter",
    "Listener",
    "ListenerStatistics",
    "Overflow",
    "SubscriberEvicted",
    "Subscription",
    "SubscriptionStatistics",
    "open_event_bus",
]


_now = time.time
_known_types: set[str] = {str(t) for t in EventType}

# The trio primitives of the hot paths, looked up once.
_checkpoint = trio.lowlevel.checkpoint
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


EventFilter: TypeAlias = Collection[str] | str | Callable[[FlowEvent], bool] | None
"""Which events a subscriber wants: ``None`` for all, a type, a collection of
types, or a predicate such as ``FlowEvent.is_token``."""


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


@dataclasses.dataclass(frozen=True, slots=True)
class ListenerStatistics:
    """A snapshot of one callback listener."""

    id: int
    """The listener id :meth:`EventBus.add_listener` returned."""
    name: str
    """The listener's name (its callable's name by default)."""
    calls: int
    """Events handed to the callback."""
    crashes: int
    """Times the callback raised."""
    restarts: int
    """Times the listener was restarted after a crash."""
    gave_up: bool
    """Whether the restart policy gave up and the listener was removed."""
    running: bool
    """Whether the listener's task is still running."""
    subscription: SubscriptionStatistics
    """Its channel's figures."""


@dataclasses.dataclass(frozen=True, slots=True)
class BusStatistics:
    """A snapshot of the bus: what :meth:`EventBus.statistics` returns."""

    emitted: int
    """Events emitted since the bus opened."""
    last_seq: int
    """The newest seq (equal to ``emitted`` unless the bus resumed a history)."""
    subscribers: tuple[SubscriptionStatistics, ...]
    """Live subscriptions, listeners' included."""
    listeners: tuple[ListenerStatistics, ...]
    """Callback listeners, including removed ones that gave up."""
    history_size: int
    """Events retained in the history."""
    history_capacity: int
    """The most events the history retains."""
    dropped: int
    """Events dropped across all subscriptions, past and present."""
    evicted: int
    """Subscribers evicted since the bus opened."""
    listener_crashes: int
    """Listener crashes since the bus opened."""
    closed: bool
    """Whether the bus is closed."""


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
        "_bus",
        "_capacity",
        "_closed",
        "_delivered",
        "_dropped",
        "_ended",
        "_evicted",
        "_last_seq",
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
        bus: EventBus,
        sub_id: int,
        *,
        name: str | None,
        types: EventFilter,
        buffer: int,
        overflow: Overflow,
    ) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"subscription buffer must be an int >= 1, not {buffer!r}")
        self._bus = bus
        self.id = sub_id
        self.name = name or f"subscription-{sub_id}"
        self.overflow = Overflow(overflow)
        self._capacity = buffer
        self._types: frozenset[str] | None = None
        self._accepts: Callable[[FlowEvent], bool] | None = None
        if types is None:
            pass
        elif isinstance(types, str):
            self._types = bus._check_types((types,))
        elif callable(types):
            self._accepts = types
        else:
            self._types = bus._check_types(types)
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
        self._bus._unsubscribe(self)
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
        self._bus._evicted += 1
        self._bus._unsubscribe(self)
        self._end()

    def _end(self) -> None:
        """Close the producer side: the consumer reads what is buffered, then the end."""
        self._ended = True
        self._wake_receiver()
        self._senders.unpark_all()


ListenerFn: TypeAlias = Callable[[FlowEvent], Awaitable[object] | object]


class Listener:
    """A callback listener: a subscription drained by a supervised task in the bus's nursery.

    Made by :meth:`EventBus.add_listener`; :meth:`statistics` and
    :meth:`EventBus.remove_listener` are the public surface.
    """

    __slots__ = (
        "_calls",
        "_cancel_scope",
        "_crashes",
        "_done",
        "_fn",
        "_gave_up",
        "_is_async",
        "_restart",
        "_restarts",
        "_sub",
        "id",
        "name",
    )

    def __init__(
        self, lid: int, fn: ListenerFn, sub: Subscription, name: str, restart: RestartPolicy
    ) -> None:
        self.id = lid
        self.name = name
        self._fn = fn
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004
        )
        self._sub = sub
        self._restart = restart
        self._calls = 0
        self._crashes = 0
        self._restarts = 0
        self._gave_up = False
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()

    def statistics(self) -> ListenerStatistics:
        """A snapshot of this listener's figures."""
        return ListenerStatistics(
            id=self.id,
            name=self.name,
            calls=self._calls,
            crashes=self._crashes,
            restarts=self._restarts,
            gave_up=self._gave_up,
            running=not self._done.is_set(),
            subscription=self._sub.statistics(),
        )

    async def _drain(self) -> None:
        sub = self._sub
        fn = self._fn
        while True:
            try:
                batch = await sub.receive_batch()
            except (trio.EndOfChannel, trio.ClosedResourceError, SubscriberEvicted):
                return
            for event in batch:
                self._calls += 1
                if self._is_async:
                    await fn(event)  # type: ignore[misc]
                else:
                    result = fn(event)
                    if inspect.isawaitable(result):
                        await result


DEFAULT_EVENTS: Final[Mapping[str, str]] = {
    "on_token": EventType.TOKEN_RECEIVED,
    "on_end": EventType.FLOW_COMPLETED,
    "on_error": EventType.ERROR,
    "on_add_message": EventType.ADD_MESSAGE,
    "on_remove_message": EventType.REMOVE_MESSAGE,
    "on_build_start": EventType.BUILD_START,
    "on_build_end": EventType.BUILD_END,
    "on_vertex_started": EventType.VERTEX_STARTED,
    "on_end_vertex": EventType.END_VERTEX,
    "on_vertices_sorted": EventType.VERTICES_SORTED,
    "on_log": EventType.INFO,
    "on_warning": EventType.WARNING,
}
"""The named events :meth:`EventBus.register_default_events` registers (Langflow's names)."""

STREAMING_EVENTS: Final[Mapping[str, str]] = {
    "on_token": EventType.TOKEN_RECEIVED,
    "on_message": EventType.ADD_MESSAGE,
    "on_end": EventType.FLOW_COMPLETED,
    "on_error": EventType.ERROR,
}
"""The token-streaming preset :meth:`EventBus.register_streaming_events` registers."""


class EventBus:
    """Sequences events, keeps a bounded history and fans events out to subscribers.

    Open one with :func:`open_event_bus`; the bus owns a nursery for its
    listener tasks and closes every subscription when the block exits.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        history: EventHistory,
        event_class: type[FlowEvent] = FlowEvent,
        restart: RestartPolicy,
        name: str = "bus",
    ) -> None:
        self._nursery = nursery
        self._history = history
        self._event_class = event_class
        self._default_restart = restart
        self.name = name
        self._seq = self._first_seq = history.last_seq
        self._hist_append = history.append
        self._subs: tuple[Subscription, ...] = ()
        self._block_subs: tuple[Subscription, ...] = ()
        self._ids = itertools.count(1)
        self._listeners: dict[int, Listener] = {}
        self._finished_listeners: list[Listener] = []
        self._lock = trio.StrictFIFOLock()
        self._blocked_emits = 0  # emits waiting on a full BLOCK subscriber (or the lock)
        self._closed = False
        self._evicted = 0
        self._dropped_gone = 0
        self._listener_crashes = 0
        self._named: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"<EventBus {self.name!r} seq={self._seq} subscribers={len(self._subs)}>"

    def _check_types(self, types: Iterable[str]) -> frozenset[str]:
        """A filter's type names, checked (:func:`~trioflow.events.check_event_types`).

        Known on this bus besides the built-in and registered types: the
        types of its named events (:meth:`register_event`).
        """
        return check_event_types(types, extra=frozenset(self._named.values()))

    # -- emitting --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the bus is closed (no more emits)."""
        return self._closed

    @property
    def last_seq(self) -> int:
        """The seq of the newest event, 0 before the first."""
        return self._seq

    @property
    def history(self) -> EventHistory:
        """The history store."""
        return self._history

    def _make(
        self, type: str | FlowEvent, data: Mapping[str, Any] | None, run_id: str | None
    ) -> FlowEvent:
        """Stamp the next seq on a new event and append it to the history."""
        if self._closed:
            raise trio.ClosedResourceError(f"event bus {self.name!r} is closed")
        seq = self._seq + 1
        if isinstance(type, FlowEvent):
            event = _stamp(
                type.__class__,
                type.type,
                type.data,
                type.timestamp,
                seq,
                type.run_id if run_id is None else run_id,
            )
        else:
            if type not in _known_types:
                validate_event_type(type)
                if len(_known_types) < 4096:
                    _known_types.add(type)
            event = _stamp(
                self._event_class,
                type,
                EMPTY if data is None else freeze_data(data),
                _now(),
                seq,
                run_id,
            )
        self._seq = seq
        self._hist_append(event)
        return event

    async def emit(
        self,
        type: str | FlowEvent,
        data: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> FlowEvent:
        """Emit an event to every matching subscriber and return it, stamped with its seq.

        ``type`` is an event type (a read-only deep copy of ``data`` goes into the event) or a
        ready :class:`FlowEvent` (for example from a factory or a subclass),
        which is re-stamped with the next seq and keeps its class, data and
        timestamp. ``run_id`` overrides the event's run id when given.

        Waits only for :attr:`Overflow.BLOCK` subscribers that are full;
        events reach every subscriber in seq order even when emitters wait.

        Cancellation: if cancelled before it starts, nothing is emitted; once
        delivered, the event is returned even if a cancellation arrives. If
        cancelled while waiting on a full BLOCK subscriber,
        the event stays in the history and the subscribers it did not reach
        are evicted (:exc:`SubscriberEvicted`), so none misses it silently.

        Raises:
            trio.ClosedResourceError: the bus is closed.
            TypeError, ValueError: ``type`` is not a valid event type.
        """
        # Like trio's channel send: a cancelled emit has sent nothing.
        await _checkpoint_if_cancelled()
        if (
            isinstance(type, str)
            and type in _known_types
            and self._event_class is FlowEvent
            and not self._closed
        ):
            # Inlined _make and events._stamp for the common case: this is the hot path.
            seq = self._seq + 1
            blank: Any = _Unfrozen()
            blank.type = type
            # freeze_data, inlined (a flat payload: one C-level copy and a pass over
            # its values); ``type`` is the event type here, not the builtin.
            if data is None:
                frozen: Any = EMPTY
            elif data.__class__ is FrozenDict:
                frozen = data
            else:
                frozen = FrozenDict(data)
                for value in frozen.values():
                    if value.__class__ not in _FLAT:
                        frozen = freeze_data(data)
                        break
            blank.data = frozen
            blank.timestamp = _now()
            blank.seq = seq
            blank.run_id = run_id
            blank.__class__ = FlowEvent
            event: FlowEvent = blank
            self._seq = seq
            self._hist_append(event)
        else:
            event = self._make(type, data, run_id)
        subs = self._subs
        if self._blocked_emits:
            await self._deliver_blocking(event, subs, 0)
            return event
        for sub in subs:
            if sub._all or sub._matches(event):
                # Inlined Subscription._offer: this loop is the hot path.
                buf = sub._buf
                if len(buf) < sub._capacity:
                    buf.append(event)
                    task = sub._receiver
                    if task is not None:
                        sub._receiver = None
                        _reschedule(task)
                elif not sub._overflowed(event):
                    await self._deliver_blocking(event, subs, subs.index(sub))
                    return event
        await _cancel_shielded_checkpoint()
        return event

    async def _deliver_blocking(
        self, event: FlowEvent, subs: tuple[Subscription, ...], start: int
    ) -> None:
        i = start
        self._blocked_emits += 1
        try:
            async with self._lock:
                for i in range(start, len(subs)):
                    sub = subs[i]
                    if sub._matches(event):
                        await sub._offer_blocking(event)
                i = len(subs)
        except trio.Cancelled:
            # The subscribers from i on miss this event: evict them rather than
            # leave a silent gap; they can resume from the history.
            for sub in subs[i:]:
                if not sub.closed and sub._matches(event):
                    sub._evict()
            raise
        finally:
            self._blocked_emits -= 1

    def emit_nowait(
        self,
        type: str | FlowEvent,
        data: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> FlowEvent:
        """Emit from synchronous code; never blocks.

        DROP and EVICT subscribers apply their policy as usual. If a matching
        :attr:`Overflow.BLOCK` subscriber is full (or another emit is waiting
        on one), nothing happens: no seq is used and no subscriber sees the
        event.

        Raises:
            trio.WouldBlock: a matching BLOCK subscriber has no room.
            trio.ClosedResourceError: the bus is closed.
            TypeError, ValueError: ``type`` is not a valid event type.
        """
        if self._closed:
            raise trio.ClosedResourceError(f"event bus {self.name!r} is closed")
        block_subs = self._block_subs
        if block_subs:
            if self._blocked_emits:
                raise trio.WouldBlock
            probe = type if isinstance(type, FlowEvent) else None
            for sub in block_subs:
                if len(sub._buf) >= sub._capacity:
                    if probe is None:
                        probe = FlowEvent(validate_event_type(type), EMPTY, 0.0, 0, run_id)
                    if sub._matches(probe):
                        raise trio.WouldBlock
        if isinstance(type, str) and type in _known_types and self._event_class is FlowEvent:
            # Inlined _make and events._stamp for the common case: this is the hot path.
            seq = self._seq + 1
            blank: Any = _Unfrozen()
            blank.type = type
            # freeze_data, inlined (a flat payload: one C-level copy and a pass over
            # its values); ``type`` is the event type here, not the builtin.
            if data is None:
                frozen: Any = EMPTY
            elif data.__class__ is FrozenDict:
                frozen = data
            else:
                frozen = FrozenDict(data)
                for value in frozen.values():
                    if value.__class__ not in _FLAT:
                        frozen = freeze_data(data)
                        break
            blank.data = frozen
            blank.timestamp = _now()
            blank.seq = seq
            blank.run_id = run_id
            blank.__class__ = FlowEvent
            event: FlowEvent = blank
            self._seq = seq
            self._hist_append(event)
        else:
            event = self._make(type, data, run_id)
        for sub in self._subs:
            if sub._all or sub._matches(event):
                buf = sub._buf
                if len(buf) < sub._capacity:
                    buf.append(event)
                    task = sub._receiver
                    if task is not None:
                        sub._receiver = None
                        _reschedule(task)
                else:
                    sub._overflowed(event)
        return event

    # -- named events -----------------------------------------------------------

    def register_event(
        self, name: str, type: str, callback: ListenerFn | None = None
    ) -> int | None:
        """Give event ``type`` the name ``name`` (the PHP ``registerEvent``).

        ``name`` must start with ``on_`` (``"on_token"``). With ``callback``,
        also adds a listener for that type and returns its id.

        Raises:
            ValueError: ``name`` does not start with ``on_`` or is not an identifier,
                or ``type`` is invalid.
        """
        if not (isinstance(name, str) and name.startswith("on_") and name.isidentifier()):
            raise ValueError(
                f"event name {name!r} must be an identifier starting with 'on_' (e.g. 'on_token')"
            )
        self._named[name] = validate_event_type(type)
        if callback is not None:
            return self.add_listener(callback, types={type}, name=name)
        return None

    def register_default_events(self) -> None:
        """Register every name of :data:`DEFAULT_EVENTS`."""
        for name, etype in DEFAULT_EVENTS.items():
            self.register_event(name, etype)

    def register_streaming_events(self) -> None:
        """Register the token-streaming preset, :data:`STREAMING_EVENTS`."""
        for name, etype in STREAMING_EVENTS.items():
            self.register_event(name, etype)

    @property
    def registered_events(self) -> Mapping[str, str]:
        """The registered names and the types they stand for."""
        return dict(self._named)

    def _named_type(self, name: str) -> str:
        try:
            return self._named[name]
        except KeyError:
            raise KeyError(
                f"no event registered as {name!r}; known: {sorted(self._named) or 'none'}"
            ) from None

    async def emit_named(
        self, name: str, data: Mapping[str, Any] | None = None, *, run_id: str | None = None
    ) -> FlowEvent:
        """Emit the type registered as ``name``; see :meth:`emit`.

        Raises:
            KeyError: nothing is registered as ``name``.
            trio.ClosedResourceError: the bus is closed.
        """
        return await self.emit(self._named_type(name), data, run_id=run_id)

    def emit_named_nowait(
        self, name: str, data: Mapping[str, Any] | None = None, *, run_id: str | None = None
    ) -> FlowEvent:
        """Emit the type registered as ``name``; see :meth:`emit_nowait`.

        Raises:
            KeyError: nothing is registered as ``name``.
            trio.WouldBlock: a matching BLOCK subscriber has no room.
            trio.ClosedResourceError: the bus is closed.
        """
        return self.emit_nowait(self._named_type(name), data, run_id=run_id)

    # -- subscribing -----------------------------------------------------------

    def _register(
        self,
        *,
        name: str | None,
        types: EventFilter,
        buffer: int,
        overflow: Overflow,
    ) -> Subscription:
        sub = Subscription(
            self, next(self._ids), name=name, types=types, buffer=buffer, overflow=overflow
        )
        if self._closed:
            sub._end()
        else:
            self._subs = (*self._subs, sub)
            if sub.overflow is Overflow.BLOCK:
                self._block_subs = (*self._block_subs, sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs = tuple(s for s in self._subs if s is not sub)
            self._block_subs = tuple(s for s in self._block_subs if s is not sub)
            self._dropped_gone += sub._dropped

    @asynccontextmanager
    async def subscribe(
        self,
        *,
        types: EventFilter = None,
        buffer: int = 256,
        overflow: Overflow = Overflow.BLOCK,
        after: int | None = None,
        name: str | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe for the duration of the ``async with`` block.

        Args:
            types: which events to receive: ``None`` for all, a type, a
                collection of types, or a predicate (``FlowEvent.is_token``).
                Type names must be known: an :class:`~trioflow.EventType`
                value, a custom type declared with
                :func:`~trioflow.register_event_type` or as a constant of a
                :class:`~trioflow.FlowEvent` subclass, or the type of a
                named event of this bus (:meth:`register_event`). An unknown
                name (a typo, an old short name such as ``"token"``) raises
                :exc:`ValueError` listing the valid names, instead of
                silently matching nothing.
            buffer: the channel's bound (>= 1).
            overflow: what happens when the channel is full (:class:`Overflow`).
            after: replay every retained event with ``seq > after`` first,
                then continue live, with no gap and no duplicate even while
                events are emitted concurrently. ``None`` (the default)
                means live events only; ``0`` means from the very first event.
            name: a name for statistics.

        On a closed bus, the subscription replays the history (if ``after``
        is given) and then ends.

        Raises:
            HistoryExpired: ``after`` is older than the history retains.
            ValueError: ``buffer`` < 1, ``after`` < 0, or ``types`` names an
                unknown or invalid event type.
            TypeError: a type name in ``types`` is not a string.
        """
        sub = await self._open_subscription(
            types=types, buffer=buffer, overflow=overflow, after=after, name=name
        )
        try:
            yield sub
        finally:
            sub.close()

    async def _open_subscription(
        self,
        *,
        types: EventFilter,
        buffer: int,
        overflow: Overflow,
        after: int | None,
        name: str | None,
    ) -> Subscription:
        if after is not None and (
            isinstance(after, bool) or not isinstance(after, int) or after < 0
        ):
            raise ValueError(f"'after' must be an int >= 0 or None, not {after!r}")
        # Register first: live events from now on go to the channel. Then
        # replay up to the horizon: everything at or before it comes from the
        # history, everything after it from the channel. No gap, no duplicate.
        sub = self._register(name=name, types=types, buffer=buffer, overflow=overflow)
        horizon = self._seq
        try:
            if after is not None and after < horizon:
                events = await self._history.read(after, horizon)
                sub._replay.extend(e for e in events if sub._matches(e))
                sub._last_seq = after
            else:
                await trio.lowlevel.checkpoint()
        except BaseException:
            # Cancelled (or the history failed) before the caller got it: unsubscribe.
            sub.close()
            raise
        return sub

    # -- listeners ---------------------------------------------------------------

    def add_listener(
        self,
        fn: ListenerFn,
        *,
        types: EventFilter = None,
        buffer: int = 1024,
        overflow: Overflow = Overflow.DROP_OLDEST,
        restart: RestartPolicy | None = None,
        name: str | None = None,
    ) -> int:
        """Call ``fn(event)`` for every matching event, in a task of the bus's own.

        ``fn`` may be sync or async. It runs in its own task fed by its own
        channel, so a slow listener stalls nobody (unless ``overflow`` is
        BLOCK). A listener that raises is isolated: the failing event is
        skipped, a ``warning`` event reports the crash and the listener is
        restarted after the ``restart`` policy's backoff; once it crashes more
        often than the policy allows, it is removed and an ``error`` event says
        so. :meth:`statistics` counts calls, crashes and restarts.

        Returns:
            The listener id, for :meth:`remove_listener`.

        Raises:
            trio.ClosedResourceError: the bus is closed.
            ValueError: ``buffer`` < 1, or ``types`` names an unknown event
                type (as :meth:`subscribe`).
        """
        if self._closed:
            raise trio.ClosedResourceError(f"event bus {self.name!r} is closed")
        lname = name or getattr(fn, "__name__", None) or repr(fn)
        sub = self._register(
            name=f"listener:{lname}", types=types, buffer=buffer, overflow=overflow
        )
        listener = Listener(sub.id, fn, sub, lname, restart or self._default_restart)
        self._listeners[listener.id] = listener
        self._nursery.start_soon(self._run_listener, listener, name=f"trioflow listener {lname}")
        return listener.id

    def remove_listener(self, listener_id: int) -> None:
        """Stop a listener now; events it had not handled yet are discarded.

        Raises:
            KeyError: no running listener has that id.
        """
        try:
            listener = self._listeners[listener_id]
        except KeyError:
            raise KeyError(f"no listener with id {listener_id}") from None
        listener._cancel_scope.cancel()
        listener._sub.close()

    async def _run_listener(self, listener: Listener) -> None:
        async def on_crash(crash: Crash) -> None:
            listener._crashes += 1
            self._listener_crashes += 1
            error = error_info(crash.error)
            if crash.giving_up:
                listener._gave_up = True
                await self._report(
                    EventType.ERROR,
                    {
                        "message": f"listener {listener.name!r} removed after {listener._crashes} "
                        "crashes",
                        "listener": listener.name,
                        "error": error,
                    },
                )
            else:
                listener._restarts += 1
                await self._report(
                    EventType.WARNING,
                    {
                        "message": f"listener {listener.name!r} crashed; restarting in "
                        f"{crash.delay:.3g} s",
                        "listener": listener.name,
                        "error": error,
                        "restart": crash.restart,
                        "delay": crash.delay,
                    },
                )

        try:
            with listener._cancel_scope:
                await supervise(
                    listener._drain, listener._restart, name=listener.name, on_crash=on_crash
                )
        except SupervisorGaveUp:
            pass
        finally:
            listener._sub.close()
            listener._done.set()
            self._listeners.pop(listener.id, None)
            self._finished_listeners.append(listener)
            del self._finished_listeners[:-64]

    async def _report(self, type: str, data: Mapping[str, Any]) -> None:
        # A crashing listener must not wait on its own full channel: report
        # without blocking, or from a task of its own when a BLOCK subscriber is full.
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            self.emit_nowait(type, data)
        except trio.WouldBlock:
            self._nursery.start_soon(self._emit_quietly, type, data)
        await trio.lowlevel.checkpoint()

    async def _emit_quietly(self, type: str, data: Mapping[str, Any]) -> None:
        try:
            await self.emit(type, data)
        except trio.ClosedResourceError:
            pass

    # -- statistics and closing -------------------------------------------------

    def statistics(self) -> BusStatistics:
        """A snapshot of the bus's figures."""
        subs = tuple(s.statistics() for s in self._subs)
        listeners = tuple(
            lst.statistics()
            for lst in itertools.chain(self._listeners.values(), self._finished_listeners)
        )
        return BusStatistics(
            emitted=self._seq - self._first_seq,
            last_seq=self._seq,
            subscribers=subs,
            listeners=listeners,
            history_size=len(self._history),
            history_capacity=self._history.capacity,
            dropped=self._dropped_gone + sum(s.dropped for s in subs),
            evicted=self._evicted,
            listener_crashes=self._listener_crashes,
            closed=self._closed,
        )

    def close(self) -> None:
        """Stop accepting events; every subscriber reads what is buffered and then ends.

        Idempotent. Listener tasks finish the events they have buffered.
        """
        if self._closed:
            return
        self._closed = True
        for sub in self._subs:
            sub._end()

    async def aclose(self) -> None:
        """:meth:`close`, with a checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()

    async def _wait_listeners(self) -> None:
        for listener in list(self._listeners.values()):
            await listener._done.wait()


@asynccontextmanager
async def open_event_bus(
    *,
    history: int | EventHistory = 1024,
    event_class: type[FlowEvent] = FlowEvent,
    restart: RestartPolicy | None = None,
    drain_timeout: float = 5.0,
    name: str = "bus",
) -> AsyncIterator[EventBus]:
    """Open an event bus for the duration of the ``async with`` block.

    Args:
        history: how many events to retain for replay (an int, for an
            in-memory history), or an :class:`~trioflow.EventHistory` store.
        event_class: the class of the events :meth:`EventBus.emit` builds
            from a type string (a :class:`FlowEvent` subclass).
        restart: the default :class:`~trioflow.RestartPolicy` of listeners.
        drain_timeout: on exit, how long listeners may take to handle their
            buffered events before they are cancelled.
        name: a name for statistics and error messages.

    On exit the bus closes: subscribers read their buffered events and then
    their iteration ends; listeners drain, then the bus's nursery ends.

    Raises:
        ValueError: ``history`` is negative.
    """
    store = MemoryHistory(history) if isinstance(history, int) else history
    with collapse_single_group():
        async with trio.open_nursery() as nursery:
            bus = EventBus(
                nursery,
                history=store,
                event_class=event_class,
                restart=restart or RestartPolicy(),
                name=name,
            )
            try:
                yield bus
            finally:
                bus.close()
                with trio.move_on_after(
                    drain_timeout if math.isfinite(drain_timeout) else math.inf
                ):
                    await bus._wait_listeners()
                nursery.cancel_scope.cancel()
