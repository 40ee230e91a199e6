"""Replay: stream a recording back as a live stream, with its original timing scaled."""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import IO, Any

import trio

from trioflow.bus import EventBus
from trioflow.events import FlowEvent

__all__ = [
    "DEFAULT_MAX_GAP",
    "MAX_LINE_BYTES",
    "RecordingError",
    "RecordingWarning",
    "ReplayStream",
    "WarningHandler",
    "replay",
    "replay_into",
]

_CHUNK_SIZE = 64 * 1024
"""Bytes read per call (one worker-thread round trip)."""
MAX_LINE_BYTES = 16 * 1024 * 1024
"""The longest line a recording may hold; a longer one is reported as corrupted."""
DEFAULT_MAX_GAP = 5.0
"""The longest pause a replay makes between two events by default, in recorded seconds.

A recording with a huge timestamp jump (a corrupted clock, runs appended
days apart) therefore never stalls a replay for longer than this (divided by
the speed). Pass ``max_gap=math.inf`` (``--max-gap inf``) to keep every pause.
"""


class RecordingError(ValueError):
    """A line of a recording is not an event: corrupted, truncated or too long.

    Raised by a replay after every valid event before that line was
    delivered. A line nested too deeply (say 30,000 levels of ``[``) is such
    a line too, never a :exc:`RecursionError`.

    The message is ``"<path>, line <line>: <reason>"``, or ``"<path>:
    <reason>"`` when the error concerns the whole recording (``line`` 0: the
    commands report a recording without any event so).

    Attributes:
        path: the recording's path (or the name of the stream it came from).
        line: the line's number, starting at 1; 0 for the whole recording.
        reason: what is wrong with it.
        truncated: whether it is the last line and has no line end (the
            recording was cut off in the middle of writing it).
    """

    def __init__(self, path: str, line: int, reason: str, *, truncated: bool = False) -> None:
        super().__init__(f"{path}, line {line}: {reason}" if line else f"{path}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason
        self.truncated = truncated


def empty_recording(path: str) -> RecordingError:
    """The error the commands report for a recording that holds no event at all."""
    return RecordingError(path, 0, "holds no events (it is empty or holds only blank lines)")


class RecordingWarning(UserWarning):
    """A line of a recording is an event, but not one a single recorded run produces.

    The replay delivers the event anyway and goes on. The kinds:

    * ``"seq"``: the event's seq does not follow the previous event's (a gap:
      events missing, or a recording made with a ``types`` filter; or a seq
      that repeats or goes back). Events with seq 0 (never emitted) are not
      checked.
    * ``"terminal"``: a second terminal event (``flow.completed``,
      ``flow.failed``, ``flow.cancelled``) for the same run id.
    * ``"run_id"``: an event of a run id other than the ones before it (the
      recording holds several runs); once per new run id. Events without a
      run id are not checked.

    Reported to the replay's ``on_warning`` callback, or else with
    :func:`warnings.warn` (so ``warnings.simplefilter("error",
    RecordingWarning)`` turns them into exceptions). The message is
    ``"<path>, line <line>: <reason>"``.

    Attributes:
        path: the recording's path (or the name of the stream it came from).
        line: the line's number, starting at 1.
        kind: ``"seq"``, ``"terminal"`` or ``"run_id"``.
        reason: what is unexpected.
    """

    def __init__(self, path: str, line: int, kind: str, reason: str) -> None:
        super().__init__(f"{path}, line {line}: {reason}")
        self.path = path
        self.line = line
        self.kind = kind
        self.reason = reason


WarningHandler = Callable[[RecordingWarning], object]
"""An ``on_warning`` callback: called with each :class:`RecordingWarning`, synchronously."""


def _check_speed(speed: float) -> float:
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0:
        raise ValueError(f"speed must be a positive number (math.inf for no delays), not {speed!r}")
    return float(speed)


def _check_max_gap(max_gap: float | None) -> float:
    if max_gap is None:
        return math.inf
    if isinstance(max_gap, bool) or not isinstance(max_gap, (int, float)) or not max_gap >= 0:
        raise ValueError(
            f"max_gap must be a number of seconds >= 0 (math.inf or None: no limit), "
            f"not {max_gap!r}"
        )
    return float(max_gap)


class ReplayStream:
    """The events of a recording, delivered with their original timing: what :func:`replay` yields.

    An async iterator of :class:`~trioflow.FlowEvent`, usable wherever a live
    stream is. The file is read lazily, in blocks, so a recording of any size
    takes little memory.

    Event ``i`` (``i > 0``) is delivered ``(timestamp[i] - timestamp[i-1]) /
    speed`` seconds (of Trio's clock) after event ``i-1`` was due; the first is
    delivered at once. The recorded gap is first capped at ``max_gap``, so no
    wait is longer than ``max_gap / speed``. Delays are kept against a
    schedule fixed when the first event is delivered, so they do not drift: a
    consumer that takes an event late gets the following ones without delay
    until it has caught up (never early). Timestamps that go backwards (or are
    not finite) count as no delay.

    Each event is checked against the ones before it as its line is read
    (before it is delivered); an unexpected one is reported as a
    :class:`RecordingWarning`, and delivered all the same.

    Cancellation: if ``__anext__`` is cancelled, no event is lost; the next
    call delivers the event it was waiting for.
    """

    def __init__(
        self,
        file: trio.abc.AsyncResource,
        path: str,
        *,
        speed: float,
        max_gap: float,
        event_class: type[FlowEvent],
        on_warning: WarningHandler | None = None,
    ) -> None:
        self._file: Any = file
        self.path = path
        """The recording's path (or the stream's name)."""
        self.speed = speed
        """The playback speed: 1.0 for real time, ``math.inf`` for no delays."""
        self.max_gap = max_gap
        """The longest delay between two events, in recorded seconds (``math.inf``: none)."""
        self._event_class = event_class
        self._lines: deque[bytes] = deque()
        self._tail: list[bytes] = []
        self._tail_size = 0
        self._eof = False
        self._line = 0
        self._next: FlowEvent | None = None
        self._finished = False
        self._fetched = False
        self._anchor: float | None = None
        self._previous_ts = 0.0
        self._offset = 0.0
        self._count = 0
        self._on_warning = on_warning
        self._previous_seq = 0
        self._run_ids: set[str] = set()
        self._last_run_id: str | None = None
        self._terminals: dict[str | None, int] = {}

    def __repr__(self) -> str:
        return f"<ReplayStream {self.path!r} line={self._line} events={self._count}>"

    @property
    def line(self) -> int:
        """The number of the last line read (1-based; 0 before the first)."""
        return self._line

    @property
    def count(self) -> int:
        """Events delivered so far."""
        return self._count

    # -- reading ------------------------------------------------------------------

    async def _read_line(self) -> tuple[bytes, bool] | None:
        """The next line without its line end, and whether it had one; ``None`` at the end."""
        while not self._lines:
            if self._eof:
                if not self._tail:
                    return None
                last = b"".join(self._tail)
                self._tail.clear()
                self._tail_size = 0
                return last, False
            data = await self._file.read(_CHUNK_SIZE)
            if not isinstance(data, bytes):
                raise TypeError("a recording must be read in binary mode")
            if not data:
                self._eof = True
                continue
            parts = data.split(b"\n")
            if len(parts) > 1:
                self._tail.append(parts[0])
                parts[0] = b"".join(self._tail)
                tail = parts.pop()
                self._tail = [tail] if tail else []
                self._tail_size = len(tail)
                self._lines.extend(parts)
            else:
                self._tail.append(data)
                self._tail_size += len(data)
                if self._tail_size > MAX_LINE_BYTES:
                    self._finished = True
                    raise RecordingError(
                        self.path, self._line + 1, f"line longer than {MAX_LINE_BYTES} bytes"
                    )
        return self._lines.popleft(), True

    async def _read_event(self) -> FlowEvent | None:
        """The next event of the file (blank lines skipped); ``None`` at its end."""
        while True:
            item = await self._read_line()
            if item is None:
                return None
            raw, complete = item
            self._line += 1
            if len(raw) > MAX_LINE_BYTES:
                raise RecordingError(
                    self.path, self._line, f"line longer than {MAX_LINE_BYTES} bytes"
                )
            if not raw.strip():
                continue
            try:
                return self._event_class.from_json(raw)
            except ValueError as exc:  # UnicodeDecodeError included
                if complete:
                    raise RecordingError(self.path, self._line, f"not an event: {exc}") from None
                raise RecordingError(
                    self.path,
                    self._line,
                    f"truncated (the last line has no line end): {exc}",
                    truncated=True,
                ) from None

    async def _fetch(self) -> FlowEvent | None:
        """Make sure the next event is read and scheduled; return it (``None`` at the end)."""
        if self._next is None and not self._finished:
            try:
                event = await self._read_event()
            except RecordingError:
                self._finished = True
                raise
            if event is None:
                self._finished = True
                return None
            self._schedule(event)
            self._next = event
            self._check(event)
        return self._next

    def _check(self, event: FlowEvent) -> None:
        """Report what is unexpected about ``event`` (just read) as :class:`RecordingWarning`."""
        seq, previous = event.seq, self._previous_seq
        if seq:
            if previous and seq != previous + 1:
                if seq > previous + 1:
                    gap = f"{previous + 1}" if seq == previous + 2 else f"{previous + 1}-{seq - 1}"
                    reason = f"seq {seq} follows seq {previous}: seq {gap} missing"
                else:
                    reason = f"seq {seq} follows seq {previous}: out of order or repeated"
                self._warn("seq", reason)
            self._previous_seq = seq
        run_id = event.run_id
        if run_id is not None:
            if self._run_ids and run_id not in self._run_ids:
                self._warn(
                    "run_id",
                    f"run id {run_id!r} after events of run {self._last_run_id!r}: "
                    "the recording holds several runs",
                )
            self._run_ids.add(run_id)
            self._last_run_id = run_id
        if event.is_terminal():
            first = self._terminals.get(run_id)
            if first is None:
                self._terminals[run_id] = self._line
            else:
                self._warn(
                    "terminal",
                    f"a second terminal event ({event.type}) of run {run_id!r}; "
                    f"the first is on line {first}",
                )

    def _warn(self, kind: str, reason: str) -> None:
        warning = RecordingWarning(self.path, self._line, kind, reason)
        if self._on_warning is not None:
            self._on_warning(warning)
        else:
            # _warn <- _check <- _fetch <- __anext__ or peek <- the consumer
            warnings.warn(warning, stacklevel=5)

    def _schedule(self, event: FlowEvent) -> None:
        """Place ``event`` on the recording's timeline: seconds after the first event."""
        if self._fetched:
            gap = event.timestamp - self._previous_ts
            self._offset += min(max(gap, 0.0), self.max_gap) if math.isfinite(gap) else 0.0
        self._fetched = True
        self._previous_ts = event.timestamp

    # -- the async iterator -------------------------------------------------------

    async def peek(self) -> FlowEvent | None:
        """Read the next event without taking it or waiting for its time.

        Useful to look at ``flow.started`` before showing a replay.

        Returns:
            The event the next ``__anext__`` delivers, or ``None`` at the end.

        Raises:
            RecordingError: the next line is not an event.
        """
        event = await self._fetch()
        await trio.lowlevel.checkpoint()
        return event

    def __aiter__(self) -> ReplayStream:
        return self

    async def __anext__(self) -> FlowEvent:
        """Wait for the next event's time and return it.

        Raises:
            RecordingError: the next line is corrupted or truncated (the
                iteration then ends).
            StopAsyncIteration: the recording ended.
        """
        event = await self._fetch()
        if event is None:
            await trio.lowlevel.checkpoint()
            raise StopAsyncIteration
        if self.speed == math.inf:
            await trio.lowlevel.checkpoint()
        else:
            if self._anchor is None:  # the schedule starts with the first delivery
                self._anchor = trio.current_time() - self._offset / self.speed
            await trio.sleep_until(self._anchor + self._offset / self.speed)
        self._next = None
        self._count += 1
        return event


@asynccontextmanager
async def replay(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    speed: float = 1.0,
    max_gap: float | None = DEFAULT_MAX_GAP,
    event_class: type[FlowEvent] = FlowEvent,
    on_warning: WarningHandler | None = None,
) -> AsyncIterator[ReplayStream]:
    """Stream a recording back as a live stream, for the duration of the ``async with`` block.

    A recording is JSON lines, one event per line: what an
    :class:`~trioflow.recording.EventRecorder` writes and what
    ``trioflow run --json`` prints. The events come back exactly as recorded
    (type, data, seq, run_id, timestamp), paced by their timestamps::

        async with replay("run.jsonl", speed=2.0) as events:
            async for event in events:
                ...

    Blank lines are skipped; an empty recording yields no events. A line
    that is not an event (not JSON, nested deeper than 64 levels, not an
    event's shape, longer than :data:`MAX_LINE_BYTES`, truncated) raises
    :exc:`RecordingError` (with its line number) from the iteration, after
    every valid event before it was delivered. An event that a single
    recorded run would not produce (a gap in the seqs, a second terminal
    event of a run, a second run id) is reported as a
    :class:`RecordingWarning` and delivered.

    Args:
        source: the recording's path, or an open binary file (read, not closed).
        speed: 1.0 replays in real time, 2.0 twice as fast, 0.5 at half
            speed; ``math.inf`` delivers every event without delay (still
            with a checkpoint per event). Delays use :func:`trio.sleep_until`,
            so a :class:`trio.testing.MockClock` makes them exact.
        max_gap: the longest delay between two events, in recorded seconds:
            a longer gap between two timestamps counts as ``max_gap``. It
            applies before scaling by ``speed``, so the longest wait is
            ``max_gap / speed`` (10 s at ``speed=0.5`` with the default 5 s).
            ``0`` replays without pauses (like ``speed=math.inf``);
            ``math.inf`` or ``None`` keeps every pause, however long. The
            default, :data:`DEFAULT_MAX_GAP` (5 s), keeps a corrupted
            timestamp or runs appended hours apart from stalling a replay.
        event_class: the :class:`~trioflow.FlowEvent` subclass to decode into.
        on_warning: called with each :class:`RecordingWarning`, when the
            event's line is read (before that event is delivered); ``None``
            (the default) issues them with :func:`warnings.warn`. An
            exception it raises comes out of the iteration, and the event
            is delivered by the next call.

    Yields:
        A :class:`ReplayStream`, an async iterator of events.

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError, OSError: the
            recording cannot be opened (raised on entering).
        ValueError: ``speed`` or ``max_gap`` is out of range.
    """
    rate = _check_speed(speed)
    gap = _check_max_gap(max_gap)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        file: Any = await trio.open_file(path, "rb")
        owned = True
    else:
        path = str(getattr(source, "name", "<stream>"))
        file = trio.wrap_file(source)
        owned = False
    try:
        yield ReplayStream(
            file, path, speed=rate, max_gap=gap, event_class=event_class, on_warning=on_warning
        )
    finally:
        if owned:
            await file.aclose()


async def replay_into(
    bus: EventBus,
    source: str | os.PathLike[str] | IO[bytes],
    *,
    speed: float = 1.0,
    max_gap: float | None = DEFAULT_MAX_GAP,
    run_id: str | None = None,
    on_warning: WarningHandler | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Re-emit a recording into ``bus``, with its timing, as if it were happening now.

    Each event is emitted with :meth:`EventBus.emit`: the bus gives it its
    next seq (so subscribers, ``after=`` resumes and the history work as for
    a live run); the ``run_id``, data and original timestamp are kept. The
    bus is not closed at the end: it is the caller's. For a bus of the
    replay's own with a run-like handle, see :func:`start_replay`.

    Args:
        bus: where to emit.
        source: as :func:`replay`.
        speed: as :func:`replay`.
        max_gap: as :func:`replay`.
        run_id: give every event this run id instead of the recorded one
            (the warnings concern the recorded ones).
        on_warning: as :func:`replay`.
        task_status: for ``nursery.start``: started once the recording is open.

    Returns:
        How many events were emitted.

    Raises:
        FileNotFoundError, OSError: the recording cannot be opened (before
            ``task_status.started()``).
        RecordingError: a line is corrupted or truncated; every event before
            it was emitted.
        trio.ClosedResourceError: the bus was closed.
        ValueError: ``speed`` or ``max_gap`` is out of range.
    """
    async with replay(source, speed=speed, max_gap=max_gap, on_warning=on_warning) as events:
        task_status.started()
        async for event in events:
            await bus.emit(event, run_id=run_id)
        return events.count
