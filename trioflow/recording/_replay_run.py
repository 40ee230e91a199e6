"""A replay served like a live run: a recording played into an event bus of its own."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import IO, TYPE_CHECKING, Any

import trio

from trioflow.bus import EventBus, EventFilter, Overflow, Subscription, open_event_bus
from trioflow.events import EventType, FlowEvent, OutputText
from trioflow.figures import COUNT_KEYS
from trioflow.handle import (
    CancelMode,
    CancelReason,
    OnDisconnect,
    RunHandle,
    RunStatus,
    cancel_reason,
)
from trioflow.patterns import FlowMetrics, MetricsCollector
from trioflow.recording._replay import (
    DEFAULT_MAX_GAP,
    RecordingError,
    WarningHandler,
    _check_max_gap,
    _check_speed,
    replay,
)

__all__ = ["ReplayRun", "start_replay"]

_STATUS = {
    str(EventType.FLOW_COMPLETED): RunStatus.COMPLETED,
    str(EventType.FLOW_FAILED): RunStatus.FAILED,
    str(EventType.FLOW_CANCELLED): RunStatus.CANCELLED,
}


class ReplayRun:
    """A recording replayed into an event bus of its own, watched like a live :class:`~trioflow.Run`.

    Made by :func:`start_replay`, whose arguments (but ``nursery``) it takes;
    it checks them on construction and raises :exc:`ValueError` for one out of
    range. It implements :class:`~trioflow.handle.RunHandle`, the protocol
    the web server and the transports type against: :attr:`run_id`,
    :attr:`status`, :attr:`done`, :attr:`last_seq`, :attr:`on_disconnect`
    (always ``continue``), :meth:`subscribe` (from any point of the retained
    history, also after the replay ended), :meth:`wait`, :meth:`cancel` and
    :meth:`to_dict`. A server therefore serves a replay exactly as it serves
    a live run.

    Events keep their recorded ``run_id`` (unless :func:`start_replay` was
    given one), data and timestamps; the replay's bus gives them seqs 1, 2,
    ... If the recording holds several runs, all of them go through this one
    bus.

    When a line of the recording is corrupted, the replay emits an ``error``
    event (data: ``message``, ``path``, ``line``, ``reason``) after the valid
    events before it, records the :exc:`RecordingError` in :attr:`error`, and
    ends. A replay never invents a terminal event: a recording that was cut
    off ends without one.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | IO[bytes],
        *,
        speed: float = 1.0,
        max_gap: float | None = DEFAULT_MAX_GAP,
        history: int = 4096,
        run_id: str | None = None,
        on_warning: WarningHandler | None = None,
    ) -> None:
        _check_speed(speed)
        _check_max_gap(max_gap)
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ValueError(f"history must be an int >= 0, not {history!r}")
        self.source = source
        self.path = (
            os.fspath(source)
            if isinstance(source, (str, os.PathLike))
            else str(getattr(source, "name", "<stream>"))
        )
        self.speed = speed
        self.max_gap = max_gap
        self.history = history
        self.on_warning = on_warning
        self.task = ""
        self.model = ""
        self.created_at = time.time()
        self.finished_at: float | None = None
        self._override = run_id
        self._run_id = run_id or ""
        self._bus: EventBus | None = None
        self._started = False
        self._scope = trio.CancelScope()
        self._cancelled: CancelReason | str | None = None
        self._done = trio.Event()
        self._terminal: FlowEvent | None = None
        self._error: RecordingError | None = None
        self._metrics = MetricsCollector()
        self._output = OutputText()
        self._progress: Mapping[str, Any] = {}

    def __repr__(self) -> str:
        return f"<ReplayRun {self.path!r} {self.status.value} run_id={self._run_id!r}>"

    # -- state -----------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The replayed run's id: the one given to :func:`start_replay`, else the first event's.

        ``""`` while unknown: before the replay started, or when the
        recording's first event has no run id.
        """
        return self._run_id

    @property
    def on_disconnect(self) -> OnDisconnect:
        """Always :attr:`~trioflow.handle.OnDisconnect.CONTINUE`: a replay plays on without watchers."""
        return OnDisconnect.CONTINUE

    @property
    def status(self) -> RunStatus:
        """``pending``, ``running``, then the outcome.

        While the replay runs, ``running`` until a terminal event was replayed,
        then that event's status. Once it ended: ``failed`` for a corrupted
        recording, else the last terminal event's status, else ``cancelled``
        (the recording ends without a terminal event, or the replay was
        cancelled before one).
        """
        if not self._started:
            return RunStatus.PENDING
        if self.done and self._error is not None:
            return RunStatus.FAILED
        if self._terminal is not None:
            return _STATUS[self._terminal.type]
        return RunStatus.CANCELLED if self.done else RunStatus.RUNNING

    @property
    def done(self) -> bool:
        """Whether the replay has ended."""
        return self._done.is_set()

    @property
    def terminal(self) -> FlowEvent | None:
        """The last terminal event replayed so far, as the replay's bus emitted it."""
        return self._terminal

    @property
    def error(self) -> RecordingError | None:
        """The corrupted line that ended the replay, if one did."""
        return self._error

    @property
    def bus(self) -> EventBus:
        """The replay's event bus.

        Raises:
            RuntimeError: the replay has not started.
        """
        if self._bus is None:
            raise RuntimeError(f"replay of {self.path!r} has not started")
        return self._bus

    @property
    def last_seq(self) -> int:
        """The seq of the newest replayed event (0 before the first)."""
        return 0 if self._bus is None else self._bus.last_seq

    def metrics(self) -> FlowMetrics:
        """The figures of the events replayed so far (see :class:`~trioflow.patterns.MetricsCollector`)."""
        return self._metrics.result()

    # -- control -----------------------------------------------------------------

    def cancel(
        self,
        reason: CancelReason | str = CancelReason.CANCELLED,
        *,
        mode: CancelMode | str = CancelMode.IMMEDIATE,
    ) -> bool:
        """Stop the replay; subscribers read what was emitted, then their iteration ends.

        Args:
            reason: why, kept in :meth:`to_dict`'s ``metadata`` (the signature
                of :meth:`trioflow.Run.cancel`). No ``flow.cancelled`` event is
                invented: the recording did not hold one.
            mode: checked, then the same: a recording has no turn to let
                finish, so every mode stops the replay at once.

        Raises:
            ValueError: ``mode`` is not a :class:`~trioflow.handle.CancelMode` value.

        Returns:
            True if the replay was still going, False if it had ended (or was
            being cancelled already).
        """
        CancelMode(mode)
        if self.done or self._cancelled is not None:
            return False
        self._cancelled = cancel_reason(reason)
        self._scope.cancel()
        return True

    async def wait(self) -> None:
        """Wait until the replay has ended."""
        await self._done.wait()

    @asynccontextmanager
    async def subscribe(
        self,
        *,
        after: int | None = 0,
        types: EventFilter = None,
        buffer: int = 256,
        overflow: Overflow = Overflow.BLOCK,
        name: str | None = None,
    ) -> AsyncIterator[Subscription]:
        """Watch the replayed events: the retained ones after ``after``, then live ones.

        The same as :meth:`trioflow.Run.subscribe`: ``after=0`` (the default)
        starts from the first event; iteration ends when the replay ends.

        Raises:
            HistoryExpired: the history no longer holds the events after ``after``.
            RuntimeError: the replay has not started.
        """
        async with self.bus.subscribe(
            after=after, types=types, buffer=buffer, overflow=overflow, name=name
        ) as sub:
            yield sub

    def counts(self) -> dict[str, int]:
        """Counters of the replayed events, with the keys of :meth:`trioflow.Run.counts`."""
        figures = self._metrics.result()  # summed up from RunFigures, as Run.counts reads them
        return {key: getattr(figures, key) for key in COUNT_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible view with the keys of :meth:`trioflow.Run.to_dict`.

        ``progress`` is the data of the last ``progress.update`` replayed,
        ``result`` the data of the last terminal event, and ``metadata`` says
        it is a replay (``replay``: the path, ``speed``, ``error``).
        """
        terminal = self._terminal
        return {
            "run_id": self._run_id or None,
            "status": str(self.status),
            "task": self.task,
            "model": self.model,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "last_seq": self.last_seq,
            "progress": dict(self._progress),
            "counts": self.counts(),
            "output": self._output.text,
            "result": None if terminal is None else dict(terminal.data),
            "on_disconnect": str(self.on_disconnect),
            "metadata": {
                "replay": self.path,
                "speed": self.speed,
                "error": None if self._error is None else str(self._error),
                "cancelled": None if self._cancelled is None else str(self._cancelled),
            },
        }

    # -- the replay itself -----------------------------------------------------------

    def _observe(self, event: FlowEvent) -> None:
        self._metrics(event)
        self._output.observe(event.type, event.data)
        if event.type == EventType.PROGRESS_UPDATE:
            self._progress = event.data
        elif event.is_terminal():
            self._terminal = event

    async def _execute(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with replay(
                self.source, speed=self.speed, max_gap=self.max_gap, on_warning=self.on_warning
            ) as events:
                first = await events.peek()
                if first is not None:
                    if not self._run_id:
                        self._run_id = first.run_id or ""
                    if first.type == EventType.FLOW_STARTED:
                        self.task = str(first.data.get("task", ""))
                        self.model = str(first.data.get("model", ""))
                async with open_event_bus(history=self.history, name=f"replay {self.path}") as bus:
                    self._bus = bus
                    self._started = True
                    task_status.started()
                    with self._scope:
                        try:
                            async for event in events:
                                self._observe(await bus.emit(event, run_id=self._override))
                        except RecordingError as exc:
                            self._error = exc
                            await bus.emit(
                                EventType.ERROR,
                                {
                                    "message": f"corrupted recording: {exc}",
                                    "path": exc.path,
                                    "line": exc.line,
                                    "reason": exc.reason,
                                },
                                run_id=self._run_id or None,
                            )
        finally:
            self.finished_at = time.time()
            self._done.set()


if TYPE_CHECKING:
    _REPLAY_IS_A_HANDLE: type[RunHandle] = ReplayRun  # mypy checks that it implements the protocol


async def start_replay(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    nursery: trio.Nursery,
    speed: float = 1.0,
    max_gap: float | None = DEFAULT_MAX_GAP,
    history: int = 4096,
    run_id: str | None = None,
    on_warning: WarningHandler | None = None,
) -> ReplayRun:
    """Start replaying a recording in ``nursery``; return its handle once its bus exists.

    The counterpart of :meth:`trioflow.StreamingFlowExecutor.start` for a
    recording: ``trioflow serve --replay FILE`` serves the handle like a live
    run::

        async with trio.open_nursery() as nursery:
            run = await start_replay("run.jsonl", nursery=nursery, speed=1.0)
            async with run.subscribe(after=0) as events:   # history, then live
                async for event in events:
                    ...

    When this returns, nothing has been emitted yet, so ``subscribe(after=0)``
    (or ``after=None``) sees every event.

    Args:
        source: the recording: a path, or an open binary file (read, not closed).
        nursery: where the replay's task runs.
        speed: as :func:`~trioflow.recording.replay` (``math.inf``: no delays).
        max_gap: as :func:`~trioflow.recording.replay` (default: 5 s).
        history: how many events the replay's bus retains for late
            subscribers; make it at least the recording's length for
            ``after=0`` to work after the replay ended.
        run_id: give every event this run id instead of the recorded ones.
        on_warning: as :func:`~trioflow.recording.replay`; called in the
            replay's task.

    Returns:
        The running :class:`ReplayRun`.

    Raises:
        FileNotFoundError, PermissionError, OSError: the recording cannot be opened.
        RecordingError: the first line of the recording is not an event
            (nothing can be replayed).
        ValueError: ``speed``, ``max_gap`` or ``history`` is out of range.
    """
    run = ReplayRun(
        source,
        speed=speed,
        max_gap=max_gap,
        history=history,
        run_id=run_id,
        on_warning=on_warning,
    )
    await nursery.start(run._execute, name=f"trioflow replay {run.path}")
    return run
