"""The event bus: sequences events, keeps a bounded history and fans events out.

:class:`EventBus` stamps every event it emits with the next seq (1, 2, ...
with no gaps), appends it to its :class:`~trioflow.EventHistory` and offers it
to every matching :class:`~trioflow.bus.Subscription`; :func:`open_event_bus`
opens one with a nursery for its listeners' tasks.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from trioflow._frozen import _FLAT, EMPTY, FrozenDict, freeze_data
from trioflow._listeners import ListenerFn, ListenerStatistics, ListenerSupervisor
from trioflow._named import DEFAULT_EVENTS, STREAMING_EVENTS, NamedEvents
from trioflow._subscription import (
    EventFilter,
    Overflow,
    Subscription,
    SubscriptionStatistics,
)
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
from trioflow.supervise import RestartPolicy

_now = time.time

# The trio primitives of the hot paths, looked up once.
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_cancel_shielded_checkpoint = trio.lowlevel.cancel_shielded_checkpoint
_reschedule = trio.lowlevel.reschedule

_BUILTIN_TYPES: frozenset[str] = frozenset(str(t) for t in EventType)
_KNOWN_TYPES_MAX = 4096  # the bound of a bus's cache of validated type names


def _frozen_or_empty(data: Mapping[str, Any] | None) -> FrozenDict:
    """``data`` frozen (:func:`freeze_data`); the shared empty payload for ``None``."""
    return EMPTY if data is None else freeze_data(data)


def _extender(history: EventHistory) -> Callable[[list[FlowEvent]], None]:
    """How the bus appends several events to ``history`` at once.

    The store's own ``extend`` when it has one (:class:`MemoryHistory`,
    :class:`~trioflow.redis.RedisHistory`); else its ``append`` per event
    (the :class:`EventHistory` protocol has no ``extend``).
    """
    if isinstance(history, MemoryHistory):
        return history.extend
    own: Callable[[list[FlowEvent]], None] | None = getattr(history, "extend", None)
    if callable(own):
        return own
    append = history.append

    def extend(events: list[FlowEvent]) -> None:
        for event in events:
            append(event)

    return extend


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
        self.name = name
        self._seq = self._first_seq = history.last_seq
        self._hist_append = history.append
        self._hist_extend = _extender(history)
        self._subs: tuple[Subscription, ...] = ()
        self._block_subs: tuple[Subscription, ...] = ()
        self._ids = itertools.count(1)
        self._listeners = ListenerSupervisor(self, nursery, restart)
        self._lock = trio.StrictFIFOLock()
        self._blocked_emits = 0  # emits waiting on a full BLOCK subscriber (or the lock)
        self._closed = False
        self._evicted = 0
        self._dropped_gone = 0
        self._named = NamedEvents()
        # The type names this bus has validated (emitted or named), so that
        # emitting a known type skips validate_event_type: the hot path's check.
        self._known_types: set[str] = set(_BUILTIN_TYPES)
        # Where the hot path looks a type up: the known types, on a bus of
        # plain FlowEvents (a bus of a subclass builds every event the general way).
        self._hot_types: Collection[str] = (
            self._known_types if event_class is FlowEvent else frozenset()
        )

    def __repr__(self) -> str:
        return f"<EventBus {self.name!r} seq={self._seq} subscribers={len(self._subs)}>"

    def _check_types(self, types: Iterable[str]) -> frozenset[str]:
        """A filter's type names, checked (:func:`~trioflow.events.check_event_types`).

        Known on this bus besides the built-in and registered types: the
        types of its named events (:meth:`register_event`).
        """
        return check_event_types(types, extra=self._named.types())

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

    def _next_event(
        self, type: str | FlowEvent, data: Mapping[str, Any] | None, run_id: str | None
    ) -> FlowEvent:
        """Stamp the next seq on a new event and append it to the history.

        The one hot path of :meth:`emit` and :meth:`emit_nowait` (each checks
        first that the bus is open): a known type on a bus of plain
        :class:`FlowEvent` is built here with ``events._stamp`` and
        ``freeze_data`` inlined; anything else the general way.

        Raises:
            TypeError, ValueError: ``type`` is not a valid event type.
        """
        seq = self._seq + 1
        if isinstance(type, str) and type in self._hot_types:
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
        elif isinstance(type, FlowEvent):
            event = _stamp(
                type.__class__,
                type.type,
                type.data,
                type.timestamp,
                seq,
                type.run_id if run_id is None else run_id,
            )
        else:
            if type not in self._known_types:
                self._learn_type(type)
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

    def _learn_type(self, type: str) -> str:
        """Validate ``type`` (:func:`validate_event_type`) and remember it as known."""
        checked = validate_event_type(type)
        if len(self._known_types) < _KNOWN_TYPES_MAX:
            self._known_types.add(type)
        return checked

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
        if self._closed:
            raise trio.ClosedResourceError(f"event bus {self.name!r} is closed")
        event = self._next_event(type, data, run_id)
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
        event = self._next_event(type, data, run_id)
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

    def _emit_batch_nowait(
        self, type: str, datas: Sequence[Mapping[str, Any]], run_id: str | None
    ) -> list[FlowEvent]:
        """Emit one event of ``type`` per item of ``datas``, in order, as many as fit now.

        The same as calling :meth:`emit_nowait` for each item until one
        raises :exc:`trio.WouldBlock`: the events emitted are the longest
        prefix of ``datas`` that every matching :attr:`Overflow.BLOCK`
        subscriber has room for (none while another emit waits on one);
        each has its own seq, timestamp and history entry; DROP and EVICT
        subscribers apply their policy event by event. What changes is the
        cost: the checks are made once for the batch, each subscriber gets
        the events in one step and a waiting receiver is woken once.

        This is the executor's path for a run's ``token.received`` events,
        whose ``data`` the agent builds read-only (a :class:`FrozenDict` is
        taken as it is; anything else is frozen, as by :meth:`emit`).

        Returns:
            The events emitted (possibly none), in seq order.

        Raises:
            trio.ClosedResourceError: the bus is closed.
            TypeError, ValueError: ``type`` is not a valid event type.
        """
        if self._closed:
            raise trio.ClosedResourceError(f"event bus {self.name!r} is closed")
        count = len(datas)
        if not count:
            return []
        block_subs = self._block_subs
        if type not in self._hot_types or any(sub._accepts is not None for sub in block_subs):
            # The general way: a type to validate, a subclass to build, or a
            # BLOCK subscriber whose predicate must see each event.
            return self._emit_each_nowait(type, datas, run_id)
        if block_subs:
            if self._blocked_emits:
                return []
            for sub in block_subs:
                room = sub._capacity - len(sub._buf)
                if room < count and (sub._types is None or type in sub._types):
                    count = max(room, 0)
            if not count:
                return []
        # The events, built as in _next_event (a known type on a bus of plain FlowEvents).
        now, frozen_dict, flow_event = _now, FrozenDict, FlowEvent
        seq = self._seq
        events: list[FlowEvent] = []
        append = events.append
        for data in datas[:count] if count < len(datas) else datas:
            seq += 1
            blank: Any = _Unfrozen()
            blank.type = type
            blank.data = data if data.__class__ is frozen_dict else _frozen_or_empty(data)
            blank.timestamp = now()
            blank.seq = seq
            blank.run_id = run_id
            blank.__class__ = flow_event
            append(blank)
        self._seq = seq
        self._hist_extend(events)
        for sub in self._subs:
            if sub._all:
                chosen = events
            elif sub._types is not None:
                if type not in sub._types:
                    continue
                chosen = events
            else:
                chosen = [event for event in events if sub._matches(event)]
                if not chosen:
                    continue
            buf = sub._buf
            if len(buf) + len(chosen) <= sub._capacity:
                buf.extend(chosen)
            else:
                # Full on the way (a DROP or EVICT subscriber): event by event.
                for event in chosen:
                    if sub._ended:
                        break
                    if len(buf) < sub._capacity:
                        buf.append(event)
                    else:
                        sub._overflowed(event)
            task = sub._receiver
            if task is not None:
                sub._receiver = None
                _reschedule(task)
        return events

    def _emit_each_nowait(
        self, type: str, datas: Sequence[Mapping[str, Any]], run_id: str | None
    ) -> list[FlowEvent]:
        """:meth:`_emit_batch_nowait` the general way: :meth:`emit_nowait` per item."""
        events: list[FlowEvent] = []
        for data in datas:
            try:
                events.append(self.emit_nowait(type, data, run_id=run_id))
            except trio.WouldBlock:
                break
        return events

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
        self._learn_type(self._named.register(name, type))
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
        return self._named.as_dict()

    async def emit_named(
        self, name: str, data: Mapping[str, Any] | None = None, *, run_id: str | None = None
    ) -> FlowEvent:
        """Emit the type registered as ``name``; see :meth:`emit`.

        Raises:
            KeyError: nothing is registered as ``name``.
            trio.ClosedResourceError: the bus is closed.
        """
        return await self.emit(self._named.type_of(name), data, run_id=run_id)

    def emit_named_nowait(
        self, name: str, data: Mapping[str, Any] | None = None, *, run_id: str | None = None
    ) -> FlowEvent:
        """Emit the type registered as ``name``; see :meth:`emit_nowait`.

        Raises:
            KeyError: nothing is registered as ``name``.
            trio.WouldBlock: a matching BLOCK subscriber has no room.
            trio.ClosedResourceError: the bus is closed.
        """
        return self.emit_nowait(self._named.type_of(name), data, run_id=run_id)

    # -- subscribing -----------------------------------------------------------

    def _register(
        self,
        *,
        name: str | None,
        types: EventFilter,
        buffer: int,
        overflow: Overflow,
    ) -> Subscription:
        checked: frozenset[str] | Callable[[FlowEvent], bool] | None
        if types is None or callable(types):
            checked = types
        else:
            checked = self._check_types((types,) if isinstance(types, str) else types)
        sub = Subscription(
            next(self._ids),
            name=name,
            types=checked,
            buffer=buffer,
            overflow=overflow,
            on_leave=self._unsubscribe,
        )
        if self._closed:
            sub._end()
        else:
            self._subs = (*self._subs, sub)
            if sub.overflow is Overflow.BLOCK:
                self._block_subs = (*self._block_subs, sub)
        return sub

    def _unsubscribe(self, sub: Subscription, evicted: bool = False) -> None:
        if evicted:
            self._evicted += 1
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
        return self._listeners.start(fn, sub, lname, restart)

    def remove_listener(self, listener_id: int) -> None:
        """Stop a listener now; events it had not handled yet are discarded.

        Raises:
            KeyError: no running listener has that id.
        """
        self._listeners.remove(listener_id)

    # -- statistics and closing -------------------------------------------------

    def statistics(self) -> BusStatistics:
        """A snapshot of the bus's figures."""
        subs = tuple(s.statistics() for s in self._subs)
        listeners = self._listeners.statistics()
        return BusStatistics(
            emitted=self._seq - self._first_seq,
            last_seq=self._seq,
            subscribers=subs,
            listeners=listeners,
            history_size=len(self._history),
            history_capacity=self._history.capacity,
            dropped=self._dropped_gone + sum(s.dropped for s in subs),
            evicted=self._evicted,
            listener_crashes=self._listeners.crashes,
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
        await self._listeners.wait()


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
