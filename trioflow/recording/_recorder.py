"""Recording: write events as JSON lines, one per event, flushed as they come."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable
from types import TracebackType
from typing import IO

import trio

from trioflow.bus import EventFilter
from trioflow.events import FlowEvent
from trioflow.patterns import event_predicate

__all__ = ["EventRecorder", "record"]


class EventRecorder:
    """Writes events to a file as JSON lines: the format of ``trioflow run --json``.

    Each event becomes one line (:meth:`FlowEvent.to_json` and a line end),
    flushed at once, so a recording is complete up to the last event even if
    the process dies, and :func:`~trioflow.recording.replay` (or
    ``trioflow replay``) plays it back.

    The recorder is a bus listener (a plain callable) and a context manager
    that closes the file::

        with EventRecorder("run.jsonl") as recorder:
            async with open_event_bus() as bus:
                bus.add_listener(recorder, overflow=Overflow.BLOCK)  # lossless
                await StreamingFlowExecutor(bus=bus).run(agent, task)

    Close the recorder after the bus (as above): the bus drains its listeners
    when it closes. Without ``overflow=Overflow.BLOCK`` a listener that falls
    behind drops events; a recorder should not.

    Writes are synchronous: a line to a local file costs tens of microseconds,
    while a write through :func:`trio.open_file` (a worker thread per call)
    measured 20 to 25 times slower. A listener runs in a task of its own, so
    the emitter does not wait on the disk unless the listener's buffer is
    full.

    Args:
        file: a path (the file is created, or truncated unless ``append``),
            or an open text file, which the recorder writes to and flushes
            but does not close.
        types: record only these events (an :data:`~trioflow.EventFilter`);
            ``None`` (the default) records every event.
        append: add to an existing file instead of truncating it.

    Raises:
        OSError: the file cannot be opened.
        TypeError, ValueError: ``types`` holds an invalid event type.
    """

    def __init__(
        self,
        file: str | os.PathLike[str] | IO[str],
        *,
        types: EventFilter = None,
        append: bool = False,
    ) -> None:
        self._accepts = event_predicate(types)
        if isinstance(file, (str, os.PathLike)):
            self.path = os.fspath(file)
            self._file: IO[str] = open(  # noqa: SIM115 - closed by close()
                self.path, "a" if append else "w", encoding="utf-8", newline="\n"
            )
            self._owned = True
        else:
            self.path = str(getattr(file, "name", "<stream>"))
            self._file = file
            self._owned = False
        self._closed = False
        self._count = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<EventRecorder {self.path!r} {state} events={self._count}>"

    @property
    def count(self) -> int:
        """Events written so far."""
        return self._count

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __call__(self, event: FlowEvent) -> None:
        """Write ``event`` as one line and flush, if ``types`` selects it.

        Raises:
            trio.ClosedResourceError: the recorder is closed.
            ValueError: the event's data holds NaN or an infinity (not JSON).
            OSError: the write failed (disk full, ...).
        """
        if self._closed:
            raise trio.ClosedResourceError(f"recorder {self.path!r} is closed")
        if not self._accepts(event):
            return
        self._file.write(event.to_json() + "\n")
        self._file.flush()
        self._count += 1

    def close(self) -> None:
        """Flush, and close the file if the recorder opened it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owned:
            self._file.close()
        else:
            self._file.flush()

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def record(
    events: AsyncIterable[FlowEvent],
    file: str | os.PathLike[str] | IO[str],
    *,
    types: EventFilter = None,
    append: bool = False,
) -> int:
    """Write every event of a stream to ``file`` until the stream ends.

    For a stream nobody else reads, such as a run's subscription in a
    background task::

        async with run.subscribe(after=0) as events:
            await record(events, "run.jsonl")

    Args:
        events: any async iterable of events.
        file: as :class:`EventRecorder`.
        types: as :class:`EventRecorder`.
        append: as :class:`EventRecorder`.

    Returns:
        How many events were written.

    Raises:
        OSError: the file cannot be opened or written.
        Exception: whatever the stream raises; the events before it are written.
    """
    with EventRecorder(file, types=types, append=append) as recorder:
        async for event in events:
            recorder(event)
        return recorder.count
