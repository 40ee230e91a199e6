"""The event bus: it sequences events, keeps a history and fans them out to subscribers.

A bus stamps every event it emits with a sequence number (1, 2, ... with no
gaps), keeps the newest ones in a bounded history, and fans each one out to
its subscribers. Every subscriber reads a bounded channel of its own, with an
:class:`Overflow` policy that says what happens when it falls behind:

* :attr:`Overflow.BLOCK`: backpressure; :meth:`EventBus.emit` waits for room
  and nothing is lost.
* :attr:`Overflow.DROP_OLDEST`: keep the newest ``buffer`` events.
* :attr:`Overflow.DROP_NEWEST`: discard the new event (the PHP queue's policy).
* :attr:`Overflow.EVICT`: close the subscriber with :exc:`SubscriberEvicted`
  once it has read what was buffered; it can resume from the history with
  ``after=error.last_seq``.

The channel (:class:`Subscription`) is a bounded single-consumer channel with
the semantics and exceptions of :func:`trio.open_memory_channel`
(:exc:`trio.EndOfChannel`, :exc:`trio.ClosedResourceError`,
:exc:`trio.WouldBlock`, and :exc:`SubscriberEvicted`, a
:exc:`trio.BrokenResourceError`), built on a deque and
:func:`trio.lowlevel.wait_task_rescheduled` so that the bus appends to every
subscriber without a task switch and :meth:`Subscription.receive_batch` takes
every ready event in one step.

Callback listeners (:meth:`EventBus.add_listener`) are subscribers with a task
of their own in the bus's nursery, supervised by a
:class:`~trioflow.RestartPolicy`: a listener that raises is reported and
restarted, or removed once it has crashed too often, never silently lost.

Named events (:meth:`EventBus.register_event`, :meth:`EventBus.emit_named`)
give event types ``on_...`` names, with the presets :data:`DEFAULT_EVENTS`
and :data:`STREAMING_EVENTS`.

Usage::

    async with trioflow.open_event_bus(history=1024) as bus:
        async with bus.subscribe(types={"token.received"}) as sub:
            await bus.emit("token.received", {"token": "Hi"})
            event = await sub.receive()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeAlias

from trioflow import _named, _subscription
from trioflow._event_bus import BusStatistics, EventBus, open_event_bus
from trioflow._listeners import Listener, ListenerStatistics
from trioflow._subscription import (
    Overflow,
    SubscriberEvicted,
    Subscription,
    SubscriptionStatistics,
)

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

# Constants carry no __module__: autodoc reads their docstrings from the source
# of the module it documents, so the public ones are bound, and described, here.

EventFilter: TypeAlias = _subscription.EventFilter
"""Which events a subscriber wants: ``None`` for all, a type, a collection of
types, or a predicate such as ``FlowEvent.is_token``."""

DEFAULT_EVENTS: Final[Mapping[str, str]] = _named.DEFAULT_EVENTS
"""The named events :meth:`EventBus.register_default_events` registers (Langflow's names)."""

STREAMING_EVENTS: Final[Mapping[str, str]] = _named.STREAMING_EVENTS
"""The token-streaming preset :meth:`EventBus.register_streaming_events` registers."""
