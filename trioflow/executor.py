"""The streaming executor: runs agents and streams each run's events live.

:class:`StreamingFlowExecutor` is the Trio version of the PHP
``StreamingFlowExecutor``. Every run gets a ``run_id``, an event bus of its
own (so its events have their own gapless seqs 1, 2, ... and a bounded
history for late subscribers and ``Last-Event-ID`` resumes), a
:class:`~trioflow.FlowProgress`, and exactly one terminal event:

* ``flow.completed`` when the agent answered,
* ``flow.failed`` when the model failed for good, the iteration budget ran
  out or anything else raised (``error`` carries the type and message, never a
  traceback),
* ``flow.cancelled`` when the run was cancelled (:meth:`Run.cancel`, leaving
  :meth:`StreamingFlowExecutor.stream` early, the executor shutting down) or
  its ``timeout`` expired (``reason: "timeout"``).

The terminal event is emitted in a shielded cleanup, so it is there also when
the run is cancelled from outside.

Three ways to run::

    executor = StreamingFlowExecutor()

    async with executor.stream(agent, "What is 25 * 4?") as events:
        async for event in events:
            print(event.type, event.data)

    result = await executor.run(agent, "What is 25 * 4?")

    async with executor:                      # owns a nursery for runs
        run = await executor.start(agent, "What is 25 * 4?")
        async with run.subscribe(after=0) as events:
            ...
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Self

import trio

from trioflow._util import collapse_single_group
from trioflow.agent import Agent, AgentResult, MaxIterationsExceeded, RunControl
from trioflow.bus import EventBus, EventFilter, Overflow, Subscription, open_event_bus
from trioflow.events import EventType, FlowEvent, OutputText, check_event_types
from trioflow.models.base import ModelError, Usage
from trioflow.progress import FlowProgress
from trioflow.protocol import encode_event, error_info

__all__ = [
    "Run",
    "RunResult",
    "RunStatus",
    "StreamingFlowExecutor",
]

_TERMINAL_TIMEOUT = 5.0
"""Seconds the shielded cleanup may take to emit a run's terminal event."""


class RunStatus(enum.StrEnum):
    """Where a run is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in _FINISHED


_FINISHED = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


@dataclasses.dataclass(frozen=True, slots=True)
class RunResult:
    """The outcome of one run."""

    run_id: str
    """The run's id."""
    status: RunStatus
    """``completed``, ``failed`` or ``cancelled``."""
    output: str
    """The final answer; for a failed or cancelled run, the text produced so far.

    The text produced so far is that of the ``token.received`` events, less
    those a model retry voided (see ``discarded_tokens`` of the ``warning``
    event): a turn whose stream was cut and retried counts once, with the
    text of its last attempt only."""
    iterations: int
    """Iterations run."""
    usage: Usage
    """Tokens used."""
    duration: float
    """Seconds from start to the terminal event (Trio's clock)."""
    error: Mapping[str, str] | None = None
    """For a failed run: ``{"type", "message"}``."""
    reason: str | None = None
    """For a cancelled run: why (``"cancelled"``, ``"timeout"``, ...);
    for a failed run that ran out of iterations: ``"max_iterations"``."""

    @property
    def ok(self) -> bool:
        """Whether the run completed."""
        return self.status is RunStatus.COMPLETED

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible summary."""
        return {
            "run_id": self.run_id,
            "status": str(self.status),
            "output": self.output,
            "iterations": self.iterations,
            "usage": self.usage.to_dict(),
            "duration": self.duration,
            "error": dict(self.error) if self.error else None,
            "reason": self.reason,
        }


@dataclasses.dataclass(slots=True)
class _Counts:
    events: int = 0
    tokens: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    iterations: int = 0
    warnings: int = 0
    errors: int = 0


class Run:
    """A handle on one run: its status, progress, events and result.

    Made by :meth:`StreamingFlowExecutor.start` (and behind
    :meth:`StreamingFlowExecutor.stream`). Control it with :meth:`cancel`,
    :meth:`pause` and :meth:`resume`; watch it with :meth:`subscribe` (from
    any point of its retained history, also after it finished); wait for it
    with :meth:`wait`.
    """

    def __init__(
        self,
        run_id: str,
        agent: Agent,
        task: str,
        *,
        timeout: float | None,
        max_iterations: int | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.run_id = run_id
        self.agent = agent
        self.task = task
        self.timeout = timeout
        self.max_iterations = max_iterations or agent.max_iterations
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.progress = FlowProgress(self.max_iterations)
        self.created_at = time.time()
        self.finished_at: float | None = None
        self._status = RunStatus.PENDING
        self._result: RunResult | None = None
        self._bus: EventBus | None = None
        self._control = RunControl()
        self._scope = trio.CancelScope()
        self._cancel_reason: str | None = None
        self._done = trio.Event()
        self._counts = _Counts()
        self._output = OutputText()

    def __repr__(self) -> str:
        return f"<Run {self.run_id} {self._status.value} task={self.task[:40]!r}>"

    @property
    def status(self) -> RunStatus:
        """The run's status now."""
        if self._status is RunStatus.RUNNING and self._control.holding:
            return RunStatus.PAUSED
        return self._status

    @property
    def result(self) -> RunResult | None:
        """The result once the run finished, else ``None``."""
        return self._result

    @property
    def done(self) -> bool:
        """Whether the run has finished (its terminal event was emitted)."""
        return self._done.is_set()

    @property
    def bus(self) -> EventBus:
        """The run's own event bus.

        Raises:
            RuntimeError: the run has not started yet.
        """
        if self._bus is None:
            raise RuntimeError(f"run {self.run_id} has not started yet")
        return self._bus

    @property
    def last_seq(self) -> int:
        """The seq of the run's newest event (0 before the first)."""
        return 0 if self._bus is None else self._bus.last_seq

    def cancel(self, reason: str = "cancelled") -> bool:
        """Cancel the run; it ends with ``flow.cancelled`` carrying ``reason``.

        Returns:
            True if the run was still going, False if it had already finished
            (or a cancellation was already under way).
        """
        if self.done or self._cancel_reason is not None:
            return False
        self._cancel_reason = reason
        self._scope.cancel()
        return True

    def pause(self) -> bool:
        """Ask the run to hold at its next checkpoint (emits ``flow.paused`` when it does).

        Returns:
            False if the run is finished or already paused.
        """
        if self.done:
            return False
        return self._control.pause()

    def resume(self) -> bool:
        """Let a paused run go on (emits ``flow.resumed``).

        Returns:
            False if the run was not paused.
        """
        return self._control.resume()

    async def wait(self) -> RunResult:
        """Wait until the run has finished and return its result."""
        await self._done.wait()
        assert self._result is not None
        return self._result

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
        """Watch the run's events: the retained ones after ``after``, then live ones.

        ``after=0`` (the default) starts from the run's first event; ``None``
        follows only new events. Iteration ends after the terminal event.
        See :meth:`trioflow.EventBus.subscribe` for the other arguments.

        Raises:
            HistoryExpired: the run's history no longer holds the events after ``after``.
            RuntimeError: the run has not started yet.
        """
        async with self.bus.subscribe(
            after=after, types=types, buffer=buffer, overflow=overflow, name=name
        ) as sub:
            yield sub

    def counts(self) -> dict[str, int]:
        """Counters of the run's events: events, tokens, tool calls, iterations, ..."""
        return dataclasses.asdict(self._counts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible view: id, status, task, progress, counts and result.

        ``output`` is the final answer once the run completed; before, or for
        a failed or cancelled run, the text streamed so far, less the tokens
        a model retry voided (see :attr:`RunResult.output`). ``counts``
        counts every ``token.received`` event, voided ones included.
        """
        result = self._result
        return {
            "run_id": self.run_id,
            "status": str(self.status),
            "task": self.task,
            "model": self.agent.model.name,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "last_seq": self.last_seq,
            "progress": self.progress.to_dict(),
            "counts": self.counts(),
            "output": result.output if result else self._output.text,
            "result": result.to_dict() if result else None,
            "metadata": self.metadata,
        }

    # -- the run itself --------------------------------------------------------

    def _count(self, type: str) -> None:
        counts = self._counts
        counts.events += 1
        if type == EventType.TOKEN_RECEIVED:
            counts.tokens += 1
        elif type == EventType.TOOL_STARTED:
            counts.tool_calls += 1
        elif type == EventType.TOOL_FAILED:
            counts.tool_failures += 1
        elif type == EventType.ITERATION_COMPLETED:
            counts.iterations += 1
        elif type == EventType.WARNING:
            counts.warnings += 1
        elif type == EventType.ERROR or type == EventType.FLOW_FAILED:
            counts.errors += 1

    async def _execute(
        self,
        shared: EventBus | None,
        history: int,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with open_event_bus(history=history, name=f"run {self.run_id}") as bus:
            self._bus = bus
            run_id = self.run_id
            bus_emit = bus.emit
            counts = self._counts
            token_type = EventType.TOKEN_RECEIVED
            observe = self._output.observe

            async def emit(type: str, data: Mapping[str, Any]) -> FlowEvent:
                # Book-keeping first, so that a subscriber woken by the event
                # finds the run's output and counts already up to date.
                if type == token_type:
                    counts.events += 1
                    counts.tokens += 1
                else:
                    self._count(type)
                observe(type, data)  # a model retry's warning voids the failed attempt's tokens
                event = await bus_emit(type, data, run_id=run_id)
                if shared is not None and not shared.closed:
                    await shared.emit(event)
                return event

            self._status = RunStatus.RUNNING
            task_status.started()
            start = trio.current_time()
            if self.timeout is not None:
                self._scope.deadline = start + self.timeout
                self.progress = FlowProgress(self.max_iterations, deadline=self._scope.deadline)
            outcome: AgentResult | BaseException | None = None
            terminal: tuple[str, dict[str, Any]] = (
                EventType.FLOW_CANCELLED,
                {"reason": "interrupted"},
            )
            try:
                await emit(
                    EventType.FLOW_STARTED,
                    {
                        "task": self.task,
                        "model": self.agent.model.name,
                        "agent": self.agent.name,
                        "max_iterations": self.max_iterations,
                        "timeout": self.timeout,
                        "tools": [t.name for t in self.agent.tools],
                    },
                )
                with self._scope:
                    outcome = await self.agent.run(
                        self.task,
                        emit,
                        progress=self.progress,
                        control=self._control,
                        max_iterations=self.max_iterations,
                    )
                if outcome is None:  # the scope swallowed a cancellation
                    reason = self._cancel_reason or (
                        "timeout" if self._scope.deadline <= trio.current_time() else "cancelled"
                    )
                    terminal = self._finish_cancelled(reason, start)
            except trio.Cancelled:
                terminal = self._finish_cancelled(self._cancel_reason or "cancelled", start)
                raise
            except MaxIterationsExceeded as exc:
                outcome = exc
                terminal = self._finish_failed(exc, start, reason="max_iterations")
            except ModelError as exc:
                outcome = exc
                terminal = self._finish_failed(exc, start, extra={"kind": exc.kind})
            except Exception as exc:
                outcome = exc
                terminal = self._finish_failed(exc, start)
            except (
                BaseException
            ) as exc:  # KeyboardInterrupt, groups holding Cancelled: still end the run
                cancelled = isinstance(exc, BaseExceptionGroup) and exc.subgroup(trio.Cancelled)
                reason = (self._cancel_reason or "cancelled") if cancelled else "interrupted"
                terminal = self._finish_cancelled(reason, start)
                raise
            else:
                if isinstance(outcome, AgentResult):
                    terminal = self._finish_completed(outcome, start)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(_TERMINAL_TIMEOUT):
                    try:
                        await emit(*terminal)  # exactly one terminal event, also when cancelled
                    finally:
                        self.finished_at = time.time()
                        self._done.set()

    def _finish_completed(self, outcome: AgentResult, start: float) -> tuple[str, dict[str, Any]]:
        duration = trio.current_time() - start
        self.progress.complete()
        self._status = RunStatus.COMPLETED
        self._result = RunResult(
            self.run_id,
            RunStatus.COMPLETED,
            outcome.output,
            outcome.iterations,
            outcome.usage,
            duration,
        )
        return EventType.FLOW_COMPLETED, {
            "output": outcome.output,
            "iterations": outcome.iterations,
            "usage": outcome.usage.to_dict(),
            "stop_reason": outcome.stop_reason,
            "duration": duration,
            "percent": self.progress.percent,
        }

    def _finish_failed(
        self,
        exc: BaseException,
        start: float,
        *,
        reason: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        duration = trio.current_time() - start
        self.progress.complete()
        error = {**error_info(exc), **(extra or {})}
        usage = exc.usage if isinstance(exc, MaxIterationsExceeded) else Usage()
        output = self._output.text
        self._status = RunStatus.FAILED
        self._result = RunResult(
            self.run_id,
            RunStatus.FAILED,
            output,
            self._counts.iterations,
            usage,
            duration,
            error=error,
            reason=reason,
        )
        data: dict[str, Any] = {
            "error": error,
            "duration": duration,
            "iterations": self._counts.iterations,
            "percent": self.progress.percent,
        }
        if reason:
            data["reason"] = reason
        return EventType.FLOW_FAILED, data

    def _finish_cancelled(self, reason: str, start: float) -> tuple[str, dict[str, Any]]:
        duration = trio.current_time() - start
        self.progress.complete()
        self._status = RunStatus.CANCELLED
        self._result = RunResult(
            self.run_id,
            RunStatus.CANCELLED,
            self._output.text,
            self._counts.iterations,
            Usage(),
            duration,
            reason=reason,
        )
        return EventType.FLOW_CANCELLED, {
            "reason": reason,
            "duration": duration,
            "iterations": self._counts.iterations,
            "percent": self.progress.percent,
        }


class StreamingFlowExecutor:
    """Runs agents and streams each run's events.

    Args:
        bus: an optional shared bus: every event of every run is also
            emitted there (re-sequenced by that bus, ``run_id`` kept), so its
            listeners (loggers, metrics, recorders) see all runs live.
        history: how many events each run retains for late subscribers and
            resumes.
        retention: how many finished runs the registry keeps (the oldest
            finished ones are forgotten first; running ones never are).
        timeout: the default time limit of a run, in seconds (``None``: none).

    Use it as an async context manager to give :meth:`start` a nursery of
    its own; on exit, runs still going are cancelled (each ends with
    ``flow.cancelled``) and waited for.

    Raises:
        ValueError: ``history`` or ``retention`` is negative, or ``timeout`` is not positive.
    """

    def __init__(
        self,
        *,
        bus: EventBus | None = None,
        history: int = 4096,
        retention: int = 100,
        timeout: float | None = None,
    ) -> None:
        if history < 0 or retention < 0:
            raise ValueError("history and retention must be >= 0")
        if timeout is not None and not timeout > 0:
            raise ValueError(
                f"timeout must be a positive number of seconds or None, not {timeout!r}"
            )
        self.bus = bus
        self.history = history
        self.retention = retention
        self.timeout = timeout
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._ids = itertools.count(1)

    # -- registry ----------------------------------------------------------------

    @property
    def runs(self) -> Mapping[str, Run]:
        """The registry: running runs and the retained finished ones, oldest first."""
        return self._runs

    def get_run(self, run_id: str) -> Run:
        """The run with that id.

        Raises:
            KeyError: no such run (or it was forgotten by the retention limit).
        """
        try:
            return self._runs[run_id]
        except KeyError:
            raise KeyError(f"no run with id {run_id!r}") from None

    def _new_id(self) -> str:
        return f"run_{next(self._ids):04d}_{secrets.token_hex(4)}"

    def _prune(self) -> None:
        finished = [rid for rid, run in self._runs.items() if run.done]
        for rid in finished[: max(0, len(finished) - self.retention)]:
            del self._runs[rid]

    # -- running -------------------------------------------------------------------

    def _make_run(
        self,
        agent: Agent,
        task: str,
        timeout: float | None,
        max_iterations: int | None,
        run_id: str | None,
        metadata: Mapping[str, Any] | None,
    ) -> Run:
        if not isinstance(task, str) or not task.strip():
            raise ValueError("task must be a non-empty string")
        if timeout is None:
            timeout = self.timeout
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and 0 < timeout < math.inf
        ):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if max_iterations is not None and (isinstance(max_iterations, bool) or max_iterations < 1):
            raise ValueError(f"max_iterations must be >= 1, not {max_iterations!r}")
        rid = run_id or self._new_id()
        if rid in self._runs:
            raise ValueError(f"a run with id {rid!r} exists already")
        run = Run(
            rid, agent, task, timeout=timeout, max_iterations=max_iterations, metadata=metadata
        )
        self._runs[rid] = run
        self._prune()
        return run

    async def _run_in(
        self, run: Run, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await run._execute(self.bus, self.history, task_status=task_status)
        finally:
            self._prune()

    async def start(
        self,
        agent: Agent,
        task: str,
        *,
        timeout: float | None = None,
        max_iterations: int | None = None,
        run_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        nursery: trio.Nursery | None = None,
    ) -> Run:
        """Start a run in the background and return its handle once it is running.

        The run's task lives in ``nursery`` (yours), or else in the
        executor's own (``async with executor:``). When this returns, the
        run's bus exists: :meth:`Run.subscribe` with ``after=0`` sees every
        event from ``flow.started`` on.

        Raises:
            RuntimeError: no ``nursery`` was given and the executor is not open.
            ValueError: empty task, bad ``timeout`` or ``max_iterations``, or a
                duplicate ``run_id``.
        """
        target = nursery or self._nursery
        if target is None:
            raise RuntimeError(
                "StreamingFlowExecutor.start needs a nursery: pass nursery=... or use "
                "'async with executor:'"
            )
        run = self._make_run(agent, task, timeout, max_iterations, run_id, metadata)
        await target.start(self._run_in, run, name=f"trioflow {run.run_id}")
        return run

    @asynccontextmanager
    async def stream(
        self,
        agent: Agent,
        task: str,
        *,
        timeout: float | None = None,
        max_iterations: int | None = None,
        types: EventFilter = None,
        buffer: int = 1024,
        overflow: Overflow = Overflow.BLOCK,
        run_id: str | None = None,
    ) -> AsyncIterator[Subscription]:
        """Run ``agent`` on ``task`` for the duration of the block, streaming its events.

        ``async for event in events`` yields every event live, from
        ``flow.started`` to the one terminal event, then stops. Leaving the
        block early cancels the run (it still emits ``flow.cancelled``). By
        default the stream applies backpressure (:attr:`Overflow.BLOCK`): a
        slow consumer slows the run rather than losing events.

        Raises:
            ValueError: empty task, bad ``timeout`` / ``max_iterations``, or
                ``types`` names an unknown event type (before the run starts;
                see :meth:`trioflow.EventBus.subscribe`).
        """
        if isinstance(types, str):
            check_event_types((types,))
        elif types is not None and not callable(types):
            check_event_types(types)
        run = self._make_run(agent, task, timeout, max_iterations, run_id, None)
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_in, run, name=f"trioflow {run.run_id}")
                async with run.subscribe(
                    after=0, types=types, buffer=buffer, overflow=overflow
                ) as sub:
                    try:
                        yield sub
                    finally:
                        run.cancel("consumer left the stream")

    @asynccontextmanager
    async def stream_sse(
        self,
        agent: Agent,
        task: str,
        *,
        timeout: float | None = None,
        max_iterations: int | None = None,
    ) -> AsyncIterator[AsyncIterator[str]]:
        """:meth:`stream`, as Server-Sent Events frames (``id:``, ``event:``, ``data:``).

        Each frame is the one the web server sends for the event
        (:func:`trioflow.protocol.encode_event`).
        """
        async with self.stream(
            agent, task, timeout=timeout, max_iterations=max_iterations
        ) as events:
            yield _sse_frames(events)

    async def run(
        self,
        agent: Agent,
        task: str,
        *,
        timeout: float | None = None,
        max_iterations: int | None = None,
    ) -> RunResult:
        """Run ``agent`` on ``task`` once and return the result.

        A failed or cancelled run is a result with that status, not an
        exception.

        Raises:
            ValueError: empty task, or bad ``timeout`` / ``max_iterations``.
        """
        run = self._make_run(agent, task, timeout, max_iterations, None, None)
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_in, run, name=f"trioflow {run.run_id}")
        return await run.wait()

    # -- lifecycle -----------------------------------------------------------------

    def cancel_all(self, reason: str = "shutdown") -> int:
        """Cancel every running run; returns how many were cancelled."""
        return sum(run.cancel(reason) for run in list(self._runs.values()))

    async def __aenter__(self) -> Self:
        if self._nursery is not None:
            raise RuntimeError("this executor is open already")
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._nursery is not None
        self.cancel_all("executor closed")
        try:
            return await self._nursery_cm.__aexit__(*exc_info)
        finally:
            self._nursery = None


async def _sse_frames(events: Subscription) -> AsyncIterator[str]:
    async for event in events:
        yield encode_event(event)
