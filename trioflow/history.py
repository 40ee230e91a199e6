"""Event history: the bounded log a bus keeps so late subscribers can catch up.

The bus appends every event it emits to an :class:`EventHistory` and reads it
back to replay events to a subscriber that asks for ``after=seq``. The
in-memory :class:`MemoryHistory` is the default; other stores (Redis Streams)
implement the same small protocol, so subscribers never know which one is in
use.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import trio

from trioflow.events import FlowEvent

__all__ = ["EventHistory", "Fenced", "HistoryExpired", "MemoryHistory"]


class HistoryExpired(LookupError):
    """The events after ``requested`` are no longer all retained.

    Raised instead of silently skipping: a consumer that resumes after
    ``requested`` would miss the events ``requested + 1`` to
    ``first_available - 1``.

    Attributes:
        requested: the ``after`` seq that was asked for.
        first_available: the oldest seq still retained (``last_seq + 1`` when
            nothing is retained).
    """

    def __init__(self, requested: int, first_available: int) -> None:
        super().__init__(
            f"events after seq {requested} are no longer retained: the history starts at "
            f"seq {first_available}; subscribe without 'after' to follow live events, or "
            "increase the history size"
        )
        self.requested = requested
        self.first_available = first_available


class Fenced(trio.BrokenResourceError):
    """A durable history refused a writer: another writer has claimed the run since.

    Stores shared between processes (:class:`trioflow.redis.RedisHistory`)
    give each writer of a run an *epoch*; claiming the run again bumps it, and
    every write carries the writer's epoch, so a writer that was paused or
    cut off while another took the run over is refused instead of writing
    duplicate or conflicting seqs. The refused writer stops writing for good.

    A :exc:`trio.BrokenResourceError`: this writer's hold on the run is gone.

    Attributes:
        run_id: the run.
        epoch: the refused writer's epoch.
        current: the epoch of the run's owner now.
    """

    def __init__(self, run_id: str, epoch: int, current: int) -> None:
        super().__init__(
            f"run {run_id}: the writer of epoch {epoch} was fenced off (the run was claimed "
            f"again, epoch {current}); it writes nothing more"
        )
        self.run_id = run_id
        self.epoch = epoch
        self.current = current

    def __reduce__(self) -> tuple[type[Fenced], tuple[str, int, int]]:
        return (type(self), (self.run_id, self.epoch, self.current))


@runtime_checkable
class EventHistory(Protocol):
    """What a bus needs from its history store.

    ``append`` is synchronous and cheap (it runs on every emit); a store with
    slow I/O buffers appends and writes them behind. ``read`` may do I/O.
    """

    @property
    def capacity(self) -> int:
        """The most events retained."""
        ...

    @property
    def first_seq(self) -> int:
        """The oldest retained seq, or ``last_seq + 1`` when nothing is retained."""
        ...

    @property
    def last_seq(self) -> int:
        """The newest appended seq, ``0`` before the first append."""
        ...

    def __len__(self) -> int:
        """How many events are retained."""
        ...

    def append(self, event: FlowEvent) -> None:
        """Record ``event``; its seq must be ``last_seq + 1``."""
        ...

    async def read(self, after: int, until: int | None = None) -> Sequence[FlowEvent]:
        """The retained events with ``after < seq <= until`` (``until`` defaults to the newest).

        Raises:
            HistoryExpired: some event after ``after`` is no longer retained.
            ValueError: ``after`` is negative.
        """
        ...


class MemoryHistory:
    """An :class:`EventHistory` in memory: the newest ``capacity`` events in a deque.

    ``capacity`` may be 0 (no history: only live subscriptions are possible).

    Raises:
        ValueError: ``capacity`` is negative.
    """

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 0:
            raise ValueError(f"history capacity must be >= 0, not {capacity}")
        self._capacity = capacity
        self._events: collections.deque[FlowEvent] = collections.deque(maxlen=capacity)
        self._last_seq = 0
        if capacity:
            # Hot path: appending is the deque's own append (last_seq is read
            # off the newest event).
            self.append = self._events.append  # type: ignore[method-assign,assignment]
            self.extend = self._events.extend  # type: ignore[method-assign,assignment]

    @property
    def capacity(self) -> int:
        """The most events retained."""
        return self._capacity

    @property
    def first_seq(self) -> int:
        """The oldest retained seq, or ``last_seq + 1`` when nothing is retained."""
        return self._events[0].seq if self._events else self._last_seq + 1

    @property
    def last_seq(self) -> int:
        """The newest appended seq, ``0`` before the first append."""
        return self._events[-1].seq if self._events else self._last_seq

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event: FlowEvent) -> None:
        """Record ``event`` (the oldest falls out when full)."""
        self._last_seq = event.seq
        if self._capacity:
            self._events.append(event)

    def extend(self, events: Iterable[FlowEvent]) -> None:
        """Record ``events`` in order: :meth:`append` for each (their seqs must follow on)."""
        for event in events:
            self.append(event)

    def snapshot(self, after: int, until: int | None = None) -> list[FlowEvent]:
        """:meth:`read` without the checkpoint, for synchronous callers.

        Raises:
            HistoryExpired: some event after ``after`` is no longer retained.
            ValueError: ``after`` is negative.
        """
        if after < 0:
            raise ValueError(f"'after' must be >= 0, not {after}")
        newest = self.last_seq
        last = newest if until is None else min(until, newest)
        if after >= last:
            return []
        first = self.first_seq
        if after + 1 < first:
            raise HistoryExpired(after, first)
        events = self._events
        # Seqs in the deque are consecutive: index arithmetic, no scan.
        start = after + 1 - first
        stop = last + 1 - first
        if start == 0 and stop == len(events):
            return list(events)
        return [events[i] for i in range(start, stop)]

    async def read(self, after: int, until: int | None = None) -> list[FlowEvent]:
        """The retained events with ``after < seq <= until``.

        Raises:
            HistoryExpired: some event after ``after`` is no longer retained.
            ValueError: ``after`` is negative.
        """
        await trio.lowlevel.checkpoint()
        return self.snapshot(after, until)
