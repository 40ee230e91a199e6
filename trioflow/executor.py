"""The streaming executor: runs agents and streams each run's events live.

Every run of a :class:`StreamingFlowExecutor` gets a ``run_id``, an event bus of its
own (so its events have their own gapless seqs 1, 2, ... and a bounded
history for late subscribers and ``Last-Event-ID`` resumes), a
:class:`~trioflow.FlowProgress`, and exactly one terminal event:

* ``flow.completed`` when the agent answered,
* ``flow.failed`` when the model failed for good, the iteration budget ran
  out or anything else raised (``error`` carries the type and message, never a
  traceback),
* ``flow.cancelled`` when the run was cancelled (:meth:`Run.cancel`, leaving
  :meth:`StreamingFlowExecutor.stream` early, the executor shutting down) or
  its ``timeout`` expired (``reason: "timeout"``); the reasons trioflow
  cancels for are the :class:`~trioflow.handle.CancelReason` values.

A :class:`Run` implements :class:`~trioflow.handle.RunHandle`, the protocol
the web server and clients type against (as does a replayed recording).

The terminal event is emitted in a shielded cleanup, so it is there also when
the run is cancelled from outside.

Three ways to run::

    executor = StreamingFlowExecutor()

    async with executor.stream(agent, "What is 25 * 4?") as events:
        async for event in events:
            print(event.type, event.data)

    result = await executor.run(agent, "What is 25 * 4?")

    async with open_executor() as executor:  # owns a nursery for runs
        run = await executor.start(agent, "What is 25 * 4?")
        async with run.subscribe(after=0) as events:
            ...
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Self

import trio

from trioflow._util import collapse_single_group
from trioflow.agent import (
    Agent,
    AgentResult,
    Emit,
    MaxIterationsExceeded,
    RunControl,
    StoppedAfterTurn,
)
from trioflow.approvals import ApprovalDecision, PendingApproval
from trioflow.bus import EventBus, EventFilter, Overflow, Subscription, open_event_bus
from trioflow.events import (
    ErrorInfo,
    EventType,
    FlowCancelledData,
    FlowCompletedData,
    FlowEvent,
    FlowFailedData,
    FlowStartedData,
    OutputText,
    check_event_types,
)
from trioflow.figures import RunFigures
from trioflow.handle import (
    CancelMode,
    CancelReason,
    OnDisconnect,
    RunHandle,
    RunStatus,
    cancel_reason,
)
from trioflow.history import EventHistory
from trioflow.models._base import Message, ModelError, Usage
from trioflow.progress import FlowProgress
from trioflow.protocol import encode_event
from trioflow.threads import Thread

__all__ = [
    "HistoryFactory",
    "Run",
    "RunResult",
    "RunStatus",
    "StreamingFlowExecutor",
    "open_executor",
]

_TERMINAL_TIMEOUT = 5.0
"""Seconds the shielded cleanup may take to emit a run's terminal event."""

_TOKENS_PER_BATCH = 128
"""At most this many ``token.received`` events are staged; then the run sends them (one checkpoint)."""

_TOKEN_GRACE = 0.0005
"""Seconds a batch of tokens may grow while the model streams faster than a scheduling round."""

_log = logging.getLogger("trioflow.executor")


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
    error: ErrorInfo | None = None
    """For a failed run: ``{"type", "message"}`` (and a model error's ``kind``)."""
    reason: CancelReason | str | None = None
    """For a cancelled run: why (a :class:`~trioflow.handle.CancelReason`, or
    the caller's own reason given to :meth:`Run.cancel`); for a failed run
    that ran out of iterations: ``"max_iterations"``."""
    structured: Any = None
    """For a completed run of an agent with an ``output_schema``: the answer as JSON."""

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
            "reason": None if self.reason is None else str(self.reason),
            "structured": self.structured,
        }


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
        on_disconnect: OnDisconnect = OnDisconnect.CONTINUE,
    ) -> None:
        self.run_id = run_id
        self.agent = agent
        self.task = task
        self.timeout = timeout
        self.max_iterations = max_iterations or agent.max_iterations
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.on_disconnect = OnDisconnect(on_disconnect)
        """What happens to the run when the last client watching it disconnects (web server)."""
        self.progress = FlowProgress(self.max_iterations)
        self.created_at = time.time()
        self.finished_at: float | None = None
        self._status = RunStatus.PENDING
        self._result: RunResult | None = None
        self._bus: EventBus | None = None
        self._control = RunControl()
        self._scope = trio.CancelScope()
        self._cancel_reason: CancelReason | str | None = None
        self._forwarder: _Forwarder | None = None
        self._done = trio.Event()
        self._figures = RunFigures()
        self._output = OutputText()
        self.thread: Thread | None = None
        """The :class:`~trioflow.threads.Thread` the run continues, or ``None``."""
        self._history: tuple[Message, ...] = ()
        self.conversation: tuple[Message, ...] | None = None
        """Once the run has ended: the whole conversation of a run that got
        its answer (the messages it continued, its task, every turn and tool
        result, the answer), else ``None``. What a thread keeps of the run."""
        self._on_end: Callable[[Run], Awaitable[object]] | None = None

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

    @property
    def forward_dropped(self) -> int:
        """How many of the run's events could not be forwarded to the executor's shared bus.

        See :class:`StreamingFlowExecutor` (``forward_limit``); 0 without a shared bus.
        """
        return 0 if self._forwarder is None else self._forwarder.dropped

    def cancel(
        self,
        reason: CancelReason | str = CancelReason.CANCELLED,
        *,
        mode: CancelMode | str = CancelMode.IMMEDIATE,
    ) -> bool:
        """Cancel the run; it ends with ``flow.cancelled`` carrying ``reason``.

        Args:
            reason: a :class:`~trioflow.handle.CancelReason`, or a reason of
                your own (any string; one that is a ``CancelReason`` value
                becomes that member).
            mode: :attr:`~trioflow.handle.CancelMode.IMMEDIATE` (at once) or
                :attr:`~trioflow.handle.CancelMode.AFTER_TURN` (once the
                current model turn and its tool calls have finished; a turn
                that answers completes the run instead). An immediate cancel
                may follow an after-turn one.

        Returns:
            True if the run was still going, False if it had already finished
            (or a cancellation of that mode, or an immediate one, was
            already under way).

        Raises:
            ValueError: ``mode`` is not a :class:`~trioflow.handle.CancelMode` value.
        """
        mode = CancelMode(mode)
        if self.done or self._cancel_reason is not None:
            return False
        if mode is CancelMode.AFTER_TURN:
            return self._control.stop_after_turn(str(cancel_reason(reason)))
        self._cancel_reason = cancel_reason(reason)
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

    # -- tool approvals (trioflow.approvals) -------------------------------------

    def pending_approvals(self) -> list[PendingApproval]:
        """The run's tool calls waiting for a person's decision now."""
        return self._control.approvals.pending()

    def decide(
        self,
        call_id: str,
        decision: ApprovalDecision | str,
        *,
        reason: str | None = None,
        input: Mapping[str, Any] | None = None,
    ) -> PendingApproval:
        """Approve, deny or edit the waiting tool call ``call_id`` (see :mod:`trioflow.approvals`).

        Raises:
            ApprovalError: no call ``call_id`` awaits a decision (unknown,
                decided already, or the run has ended).
            ValueError: a bad ``decision``, or ``input``/``reason`` that do
                not go with it.
            ToolInputError: an edit's input does not match the tool's schema.
        """
        return self._control.approvals.decide(call_id, decision, reason=reason, input=input)

    def approve(self, call_id: str) -> PendingApproval:
        """Let the waiting tool call ``call_id`` run with the model's input (see :meth:`decide`).

        Raises:
            ApprovalError: no call ``call_id`` awaits a decision.
        """
        return self.decide(call_id, ApprovalDecision.APPROVE)

    def deny(self, call_id: str, reason: str | None = None) -> PendingApproval:
        """Refuse the waiting tool call ``call_id``; the model reads ``reason`` (see :meth:`decide`).

        Raises:
            ApprovalError: no call ``call_id`` awaits a decision.
        """
        return self.decide(call_id, ApprovalDecision.DENY, reason=reason)

    def edit(self, call_id: str, input: Mapping[str, Any]) -> PendingApproval:
        """Let the waiting tool call ``call_id`` run with ``input`` instead (see :meth:`decide`).

        Raises:
            ApprovalError: no call ``call_id`` awaits a decision.
            ToolInputError: ``input`` does not match the tool's schema (the call still waits).
        """
        return self.decide(call_id, ApprovalDecision.EDIT, input=input)

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

    @property
    def figures(self) -> RunFigures:
        """The run's figures so far (:class:`~trioflow.figures.RunFigures`): read, don't change."""
        return self._figures

    def counts(self) -> dict[str, int]:
        """Counters of the run's events: events, tokens, tool calls, iterations, ...

        :meth:`RunFigures.counts <trioflow.figures.RunFigures.counts>`: the
        figures :class:`~trioflow.patterns.MetricsCollector` finds for the
        same events (``errors`` counts ``error`` and every ``*.failed`` event).
        """
        return self._figures.counts()

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
            "on_disconnect": str(self.on_disconnect),
            "metadata": self.metadata,
            "approvals": [p.to_dict() for p in self._control.approvals.pending()],
        }

    # -- the run itself --------------------------------------------------------

    async def _execute(
        self,
        shared: EventBus | None,
        history: int,
        *,
        store: HistoryFactory | None = None,
        forward_limit: int = 65536,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        opened: AbstractAsyncContextManager[int | EventHistory] = (
            nullcontext(history) if store is None else store(self, history)
        )
        async with (
            opened as events,
            open_event_bus(history=events, name=f"run {self.run_id}") as bus,
            trio.open_nursery() as nursery,
        ):
            self._bus = bus
            forward = None
            if shared is not None:
                forward = self._forwarder = _Forwarder(shared, nursery, forward_limit, self.run_id)
            tokens = _TokenBatch(bus, self.run_id, forward, self._figures)
            timer = trio.CancelScope()
            nursery.start_soon(tokens.run, timer, name=f"trioflow tokens {self.run_id}")
            try:
                await self._drive(self._emitter(bus, forward, tokens), task_status)
            finally:
                timer.cancel()
                if forward is not None:
                    forward.close()

    def _emitter(self, bus: EventBus, forward: _Forwarder | None, tokens: _TokenBatch) -> Emit:
        """The ``emit`` the agent gets: counts, then the run's bus, then the shared bus.

        ``token.received`` events are batched (see :class:`_TokenBatch`): the
        executor adds no checkpoint per token, and a subscriber is woken
        once per batch rather than once per token. The agent hands them
        over with ``emit.token_nowait(data)`` (see :class:`~trioflow.agent.Emit`),
        a plain call, and awaits ``emit`` only for the token that fills a
        batch (which the run then sends, with one checkpoint). Every other
        event first sends the tokens staged before it, then goes through
        :meth:`EventBus.emit` (a cancellation point and a checkpoint, as
        before), so events keep their order.
        """
        run_id = self.run_id
        bus_emit = bus.emit
        figures = self._figures
        count = figures.observe
        token_type = EventType.TOKEN_RECEIVED
        observe = self._output.observe
        add_text = self._output._parts.append
        flush = tokens.flush
        wake = tokens.wake
        staged = tokens.staged
        full = _TOKENS_PER_BATCH
        last = full - 1

        async def emit(type: str, data: Mapping[str, Any]) -> FlowEvent | None:
            # Book-keeping first, so that a subscriber woken by the event
            # finds the run's output and counts already up to date.
            if type == token_type:
                # RunFigures.observe and OutputText.observe, inlined: the hot path.
                figures.token_events += 1
                text = data.get("token")
                if isinstance(text, str):
                    figures.characters += len(text)
                    add_text(text)
                # Stage it (see _TokenBatch); a full batch is sent now, with one checkpoint.
                staged.append(data)
                if len(staged) == 1:
                    wake()
                elif len(staged) >= full:
                    await flush()
                return None
            count(type, data)
            observe(type, data)  # a model retry's warning voids the failed attempt's tokens
            if staged:
                await flush()
            event = await bus_emit(type, data, run_id=run_id)
            if forward is not None:
                forward(event)
            return event

        def token_nowait(data: Mapping[str, Any]) -> bool:
            # emit(token, data) without the coroutine, for all but a batch's last token.
            n = len(staged)
            if n >= last:
                return False  # this one fills the batch: the agent awaits emit, which sends it
            figures.token_events += 1
            text = data.get("token")
            if isinstance(text, str):
                figures.characters += len(text)
                add_text(text)
            staged.append(data)
            if not n:
                wake()
            return True

        return _RunEmit(emit, token_nowait, run_id)

    async def _drive(self, emit: Emit, task_status: trio.TaskStatus[None]) -> None:
        """Run the agent, classify how it ended, emit the one terminal event."""
        self._status = RunStatus.RUNNING
        task_status.started()
        start = trio.current_time()
        if self.timeout is not None:
            self._scope.deadline = start + self.timeout
            self.progress = FlowProgress(self.max_iterations, deadline=self._scope.deadline)
        result: AgentResult | None = None
        error: BaseException | None = None
        try:
            await emit(EventType.FLOW_STARTED, self._started_data())
            with self._scope:
                result = await self.agent.run(
                    self.task,
                    emit,
                    progress=self.progress,
                    control=self._control,
                    max_iterations=self.max_iterations,
                    history=self._history,
                )
        except Exception as exc:  # the run fails; the executor goes on
            error = exc
        except BaseException as exc:  # Cancelled, KeyboardInterrupt, ...: end the run, re-raise
            error = exc
            raise
        finally:
            outcome = self._classify(result, error)
            terminal = self._finish(outcome, trio.current_time() - start)
            self.conversation = result.messages if result is not None else None
            if self.thread is not None:  # a completed run continues the conversation
                self.thread.end(self.run_id, result.messages if result is not None else None)
            if self._on_end is not None:  # before the terminal event: its watchers see it done
                with trio.CancelScope(shield=True), trio.move_on_after(_TERMINAL_TIMEOUT):
                    try:
                        await self._on_end(self)
                    except Exception:
                        _log.exception("run %s: its on_end callback failed", self.run_id)
            with trio.CancelScope(shield=True), trio.move_on_after(_TERMINAL_TIMEOUT):
                try:
                    await emit(*terminal)  # exactly one terminal event, also when cancelled
                finally:
                    self.finished_at = time.time()
                    self._done.set()

    def _started_data(self) -> FlowStartedData:
        started: FlowStartedData = {
            "task": self.task,
            "model": self.agent.model.name,
            "agent": self.agent.name,
            "max_iterations": self.max_iterations,
            "timeout": self.timeout,
            "tools": [t.name for t in self.agent.tools],
        }
        if self.metadata:
            started["metadata"] = self.metadata
        return started

    def _classify(self, result: AgentResult | None, error: BaseException | None) -> _Outcome:
        """How the run ended: completed, failed (and why) or cancelled (and why)."""
        if result is not None:
            return _Outcome(RunStatus.COMPLETED, result=result)
        if error is None:  # the run's scope swallowed a cancellation: ours, or the deadline
            timed_out = self._scope.deadline <= trio.current_time()
            default = CancelReason.TIMEOUT if timed_out else CancelReason.CANCELLED
            return _Outcome(RunStatus.CANCELLED, reason=self._cancel_reason or default)
        if isinstance(error, StoppedAfterTurn):
            return _Outcome(RunStatus.CANCELLED, reason=cancel_reason(error.reason))
        if isinstance(error, MaxIterationsExceeded):
            return _Outcome(RunStatus.FAILED, error=error, reason="max_iterations")
        if isinstance(error, ModelError):
            return _Outcome(RunStatus.FAILED, error=error, kind=error.kind)
        if isinstance(error, Exception):
            return _Outcome(RunStatus.FAILED, error=error)
        cancelled = isinstance(error, trio.Cancelled) or (
            isinstance(error, BaseExceptionGroup) and error.subgroup(trio.Cancelled) is not None
        )
        if cancelled:
            return _Outcome(
                RunStatus.CANCELLED, reason=self._cancel_reason or CancelReason.CANCELLED
            )
        return _Outcome(RunStatus.CANCELLED, reason=CancelReason.INTERRUPTED)

    def _finish(self, outcome: _Outcome, duration: float) -> tuple[str, Mapping[str, Any]]:
        """Record ``outcome`` as the run's status and result; return its terminal event."""
        self.progress.complete()
        self._status = outcome.status
        iterations = self._figures.iterations
        percent = self.progress.percent
        if outcome.result is not None:
            done = outcome.result
            self._result = RunResult(
                self.run_id,
                outcome.status,
                done.output,
                done.iterations,
                done.usage,
                duration,
                structured=done.structured,
            )
            completed: FlowCompletedData = {
                "output": done.output,
                "iterations": done.iterations,
                "usage": done.usage.to_dict(),
                "stop_reason": done.stop_reason,
                "duration": duration,
                "percent": percent,
            }
            if self.agent.output_schema is not None:
                completed["structured"] = done.structured
            return EventType.FLOW_COMPLETED, completed
        if outcome.status is RunStatus.FAILED:
            exc = outcome.error
            assert exc is not None
            error: ErrorInfo = {"type": type(exc).__name__, "message": str(exc)}
            if outcome.kind is not None:
                error["kind"] = outcome.kind
            usage = exc.usage if isinstance(exc, MaxIterationsExceeded) else Usage()
            self._result = RunResult(
                self.run_id,
                outcome.status,
                self._output.text,
                iterations,
                usage,
                duration,
                error=error,
                reason=outcome.reason,
            )
            failed: FlowFailedData = {
                "error": error,
                "duration": duration,
                "iterations": iterations,
                "percent": percent,
            }
            if outcome.reason:
                failed["reason"] = str(outcome.reason)
            return EventType.FLOW_FAILED, failed
        reason = outcome.reason or CancelReason.CANCELLED
        self._result = RunResult(
            self.run_id,
            outcome.status,
            self._output.text,
            iterations,
            Usage(),
            duration,
            reason=reason,
        )
        cancelled: FlowCancelledData = {
            "reason": str(reason),
            "duration": duration,
            "iterations": iterations,
            "percent": percent,
        }
        return EventType.FLOW_CANCELLED, cancelled


class _RunEmit:
    """The ``emit`` a run gives its agent (:meth:`Run._emitter`): a call, and its token fast path."""

    __slots__ = ("_emit", "run_id", "token_nowait")

    def __init__(
        self,
        emit: Callable[[str, Mapping[str, Any]], Awaitable[FlowEvent | None]],
        token_nowait: Callable[[Mapping[str, Any]], bool],
        run_id: str,
    ) -> None:
        self._emit = emit
        self.run_id = run_id
        """The run's id (what a tool's :class:`~trioflow.ToolContext` reports)."""
        self.token_nowait = token_nowait
        """Stage a ``token.received`` event with ``data`` now; False: it fills a batch, await the emit."""

    def __call__(self, type: str, data: Mapping[str, Any], /) -> Awaitable[FlowEvent | None]:
        """Emit one event of ``type`` with ``data`` (await the result)."""
        return self._emit(type, data)


@dataclasses.dataclass(frozen=True, slots=True)
class _Outcome:
    """How a run ended, before its terminal event is built."""

    status: RunStatus
    result: AgentResult | None = None
    error: BaseException | None = None
    reason: CancelReason | str | None = None
    kind: str | None = None


class _TokenBatch:
    """A run's ``token.received`` events on their way to its bus, in batches.

    The agent emits a token per model delta; waking every subscriber once
    per token (and adding a checkpoint of the executor's per token) cost
    more than the model's stream itself. So a token is staged, and the
    staged tokens go to the bus together, in one step
    (``EventBus._emit_batch_nowait``: each still gets its own seq):

    * as soon as the run stops adding to them, or, while its model streams
      faster than a scheduling round, once per :data:`_TOKEN_GRACE` (a task
      of the run watches: see :meth:`run`), without blocking: a subscriber
      is woken once for the batch; if a blocking subscriber is full, they
      stay staged and the task tries again a little later;
    * when :data:`_TOKENS_PER_BATCH` are staged, by the run itself, waiting
      for full blocking subscribers (backpressure) and passing one
      checkpoint (so a model that never yields stays fair to other tasks);
    * before any other event of the run (so the order is kept), and before
      its terminal event.

    A token therefore never waits for the model's next delta: it reaches
    subscribers in the scheduling round after it was staged when the model
    is slower than a round (after one last grace period if it was faster
    just before), and at most :data:`_TOKEN_GRACE` seconds after it was
    staged when the model is faster (sooner with a full batch of
    :data:`_TOKENS_PER_BATCH`); the run's counts and output include it at
    once.
    """

    __slots__ = ("_bus", "_figures", "_forward", "_parked", "_run_id", "staged")

    def __init__(
        self, bus: EventBus, run_id: str, forward: _Forwarder | None, figures: RunFigures
    ) -> None:
        self._bus = bus
        self._run_id = run_id
        self._forward = forward
        self._figures = figures  # its token_events: how many tokens the run has staged
        self.staged: list[Mapping[str, Any]] = []
        self._parked: trio.lowlevel.Task | None = None

    def wake(self) -> None:
        """The first token of a batch was staged (in :attr:`staged`): have :meth:`run` watch it."""
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def send_nowait(self) -> bool:
        """Send the staged tokens without waiting; False if a full subscriber kept some back.

        Raises:
            trio.ClosedResourceError: the run's bus is closed.
        """
        staged = self.staged
        events = self._bus._emit_batch_nowait(EventType.TOKEN_RECEIVED, staged, self._run_id)
        forward = self._forward
        if forward is not None:
            for event in events:
                forward(event)
        if len(events) == len(staged):
            staged.clear()
            return True
        del staged[: len(events)]
        return False

    async def flush(self) -> None:
        """Send the staged tokens, waiting for full subscribers; passes one checkpoint.

        Raises:
            trio.ClosedResourceError: the run's bus is closed.
        """
        if self.send_nowait():
            await trio.lowlevel.checkpoint()
            return
        staged = self.staged
        while staged:
            event = await self._bus.emit(
                EventType.TOKEN_RECEIVED, staged.pop(0), run_id=self._run_id
            )
            if self._forward is not None:
                self._forward(event)

    async def run(self, scope: trio.CancelScope) -> None:
        """Send each batch once the run stops adding to it (until ``scope`` is cancelled).

        Parked while nothing is staged. After the first token of a batch,
        this task passes a checkpoint: if the run staged no more tokens in
        that scheduling round (its model waits for its next delta), it
        sends the batch at once, so a token waits for no clock. If it did
        (a model streaming faster than anyone reads), it lets the batch
        grow for :data:`_TOKEN_GRACE` seconds, then sends it, and goes on
        so, a batch per grace period, while tokens keep coming within one
        (then it parks again). A full blocking subscriber makes it retry
        after a growing pause (up to 50 ms).
        """
        checkpoint = trio.lowlevel.checkpoint
        staged = self.staged
        figures = self._figures
        with scope:
            while True:
                if not staged:
                    self._parked = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(self._abort_park)
                    continue
                seen = figures.token_events
                await checkpoint()
                fast = figures.token_events > seen
                while True:
                    if fast:
                        # The run streams faster than a round: let the batch grow
                        # for a while (a full one the run sends itself), then send it.
                        seen = figures.token_events
                        await _pause(_TOKEN_GRACE)
                        fast = figures.token_events > seen
                    backoff = _TOKEN_GRACE
                    while staged and not self.send_nowait():
                        await _pause(backoff)  # a full subscriber: try again later
                        backoff = min(backoff * 2, 0.05)
                    if not fast:
                        break

    def _abort_park(self, _: Any) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED


async def _pause(seconds: float) -> None:
    """Sleep ``seconds``, as :func:`trio.sleep` but for the cost, and ends early only if cancelled.

    :func:`trio.sleep` ends by cancelling its own scope, so each one raises
    and catches a :exc:`trio.Cancelled`: on a token path that wakes every
    half millisecond, that was most of the executor's overhead. Here the
    deadline's cancellation reschedules the task instead
    (:data:`trio.lowlevel.Abort.FAILED`), with no exception; a cancellation
    from outside (the deadline not reached yet) raises :exc:`trio.Cancelled`
    as usual.

    Raises:
        trio.Cancelled: an enclosing scope was cancelled.
    """
    task = trio.lowlevel.current_task()
    deadline = trio.current_time() + seconds

    def abort(_: Any) -> trio.lowlevel.Abort:
        if trio.current_time() < deadline:
            return trio.lowlevel.Abort.SUCCEEDED  # cancelled from outside
        trio.lowlevel.reschedule(task)
        return trio.lowlevel.Abort.FAILED

    with trio.CancelScope(deadline=deadline):
        await trio.lowlevel.wait_task_rescheduled(abort)
    await trio.lowlevel.checkpoint_if_cancelled()


class _Forwarder:
    """Forwards a run's events to a shared bus; never makes the run wait.

    The policy: an event goes to the shared bus at once
    (:meth:`EventBus.emit_nowait`) when it has room. When a blocking
    (:attr:`Overflow.BLOCK`) subscriber or listener of the shared bus is
    full, the run's events queue up, in order, in a backlog of this run's
    own (at most ``limit`` events), which a task of the run feeds to the
    shared bus as fast as it takes them. So a slow shared subscriber slows
    nobody; a stalled one stalls only the backlogs. Past ``limit`` queued
    events, further ones are not forwarded: :attr:`dropped` counts them and
    a warning is logged (once per run). Once the run has ended, its backlog
    has :data:`_TERMINAL_TIMEOUT` seconds per event to go through, then the
    rest is dropped (counted) and the run's task ends.
    """

    __slots__ = (
        "_closing",
        "_emitting",
        "_limit",
        "_more",
        "_nursery",
        "_run_id",
        "_task",
        "backlog",
        "dropped",
        "shared",
    )

    def __init__(self, shared: EventBus, nursery: trio.Nursery, limit: int, run_id: str) -> None:
        self.shared = shared
        self.backlog: collections.deque[FlowEvent] = collections.deque()
        self.dropped = 0
        self._nursery = nursery
        self._limit = limit
        self._run_id = run_id
        self._task = False
        self._closing = False
        self._emitting: trio.CancelScope | None = None
        self._more = trio.Event()

    def __call__(self, event: FlowEvent) -> None:
        shared = self.shared
        if shared.closed:
            return
        backlog = self.backlog
        if not backlog:
            try:
                shared.emit_nowait(event)
                return
            except trio.WouldBlock:
                pass
            except trio.ClosedResourceError:
                return
        if len(backlog) >= self._limit:
            self._drop(1)
            return
        backlog.append(event)
        if not self._task:
            self._task = True
            self._nursery.start_soon(self._run, name=f"trioflow forward {self._run_id}")
        self._more.set()

    def _drop(self, n: int) -> None:
        if not self.dropped:
            _log.warning(
                "run %s: the shared event bus %r is not keeping up: %d of the run's events "
                "wait to be forwarded to it (forward_limit); further ones are dropped "
                "(Run.forward_dropped counts them)",
                self._run_id,
                self.shared.name,
                len(self.backlog),
            )
        self.dropped += n

    def close(self) -> None:
        """The run has ended: flush the backlog (bounded), then let the task end."""
        self._closing = True
        if self._emitting is not None:
            self._emitting.deadline = min(
                self._emitting.deadline, trio.current_time() + _TERMINAL_TIMEOUT
            )
        self._more.set()

    async def _run(self) -> None:
        backlog = self.backlog
        while True:
            while backlog:
                wait = _TERMINAL_TIMEOUT if self._closing else math.inf
                with trio.move_on_after(wait) as waited:
                    self._emitting = waited
                    try:
                        await self.shared.emit(backlog[0])
                    except trio.ClosedResourceError:
                        backlog.clear()
                        return
                    finally:
                        self._emitting = None
                if waited.cancelled_caught:
                    self._drop(len(backlog))
                    backlog.clear()
                    return
                backlog.popleft()
            if self._closing:
                return
            self._more = trio.Event()
            await self._more.wait()


HistoryFactory = Callable[[Run, int], AbstractAsyncContextManager[EventHistory]]
"""Where a run's events are kept: ``factory(run, capacity)`` opens the run's history.

:class:`StreamingFlowExecutor` (``history_store=``) calls it for each run it
starts, with the executor's ``history`` as ``capacity``, and enters the
returned context manager around the run's bus: the history is open before
the run's first event and closed after its terminal event (a store that
writes behind flushes on exit). An error raised out of it ends the run (see
``history_store``). :meth:`trioflow.redis.RedisRunStore.history_factory`
makes one.
"""


class StreamingFlowExecutor:
    """Runs agents and streams each run's events.

    Args:
        bus: an optional shared bus: every event of every run is also
            emitted there (re-sequenced by that bus, ``run_id`` kept), so its
            listeners (loggers, metrics, recorders) see all runs live.
        history: how many events each run retains for late subscribers and
            resumes.
        history_store: where each run's events are kept: a
            :data:`HistoryFactory` (``RedisRunStore.history_factory()`` keeps
            them in Redis); in memory (a :class:`~trioflow.MemoryHistory`
            per run) by default. A run whose store fails
            (:exc:`trio.BrokenResourceError`, such as
            :exc:`~trioflow.history.Fenced` when another process claimed
            the run) is cancelled and the failure logged; the executor goes on.
        run_ids: makes the id of each run not given one; by default
            ``run_0001_ab12cd34`` (a per-process counter and 32 random bits).
            Runs kept beyond the process want ids unique across processes:
            :func:`trioflow.redis.new_run_id`.
        retention: how many finished runs the registry keeps (the oldest
            finished ones are forgotten first; running ones never are).
        timeout: the default time limit of a run, in seconds (``None``: none).
        forward_limit: how many of a run's events may wait to be forwarded
            to ``bus`` while a blocking subscriber of it is full. Forwarding
            never makes a run wait: a run's events go to ``bus`` at once
            when it has room, else queue up in order in the run's own
            backlog, fed to ``bus`` by a task of the run; past
            ``forward_limit`` waiting events, further ones are not forwarded
            (:attr:`Run.forward_dropped` counts them, and a warning is
            logged once per run). So one slow or stalled listener of the
            shared bus never stalls every run.

    To give :meth:`start` a nursery of its own, prefer :func:`open_executor`
    (``async with open_executor() as executor:``); ``async with
    StreamingFlowExecutor() as executor:`` does the same (it delegates to
    it). On exit, runs still going are cancelled (each ends with
    ``flow.cancelled``, reason ``"executor closed"``) and waited for.

    Raises:
        ValueError: ``history``, ``retention`` or ``forward_limit`` is
            negative, or ``timeout`` is not positive.
    """

    def __init__(
        self,
        *,
        bus: EventBus | None = None,
        history: int = 4096,
        retention: int = 100,
        timeout: float | None = None,
        forward_limit: int = 65536,
        history_store: HistoryFactory | None = None,
        run_ids: Callable[[], str] | None = None,
    ) -> None:
        if history < 0 or retention < 0 or forward_limit < 0:
            raise ValueError("history, retention and forward_limit must be >= 0")
        if timeout is not None and not timeout > 0:
            raise ValueError(
                f"timeout must be a positive number of seconds or None, not {timeout!r}"
            )
        self.bus = bus
        self.history = history
        self.retention = retention
        self.timeout = timeout
        self.forward_limit = forward_limit
        self.history_store = history_store
        self._run_ids = run_ids
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._entered: AbstractAsyncContextManager[Self] | None = None
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
        if self._run_ids is not None:
            return self._run_ids()
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
        on_disconnect: OnDisconnect = OnDisconnect.CONTINUE,
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
            rid,
            agent,
            task,
            timeout=timeout,
            max_iterations=max_iterations,
            metadata=metadata,
            on_disconnect=on_disconnect,
        )
        self._runs[rid] = run
        self._prune()
        return run

    async def _run_in(
        self, run: Run, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await run._execute(
                self.bus,
                self.history,
                store=self.history_store,
                forward_limit=self.forward_limit,
                task_status=task_status,
            )
        except trio.BrokenResourceError as exc:
            if self.history_store is None or run._bus is None:
                raise  # not the store's; or before the run started: start() raises it
            _log.warning("run %s stopped: %s", run.run_id, exc)  # its store failed
        finally:
            if run._bus is None:  # it never started (its store refused it): forget it
                self._runs.pop(run.run_id, None)
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
        on_disconnect: OnDisconnect = OnDisconnect.CONTINUE,
        nursery: trio.Nursery | None = None,
        thread: Thread | None = None,
        messages: Sequence[Message] = (),
        on_end: Callable[[Run], Awaitable[object]] | None = None,
    ) -> Run:
        """Start a run in the background and return its handle once it is running.

        The run's task lives in ``nursery`` (yours), or else in the
        executor's own (``async with executor:``). When this returns, the
        run's bus exists: :meth:`Run.subscribe` with ``after=0`` sees every
        event from ``flow.started`` on. ``metadata`` is kept as
        :attr:`Run.metadata`, ``on_disconnect`` as :attr:`Run.on_disconnect`.

        With ``thread`` (:mod:`trioflow.threads`), ``task`` is the next
        message of that conversation: the model sees the thread's messages
        first, and the run's messages become the thread's when it completes.
        The run's ``metadata`` gets the ``thread_id``.

        ``messages`` is the conversation the run continues when it is kept
        elsewhere (a :class:`~trioflow.redis.RedisThreads` thread, which its
        caller begins and ends): the model sees it before ``task``; the
        run's :attr:`Run.conversation` is what to keep once it has ended.
        ``on_end`` is awaited with the run once its outcome is known
        (:attr:`Run.result` and :attr:`Run.conversation` set), before its
        terminal event is emitted, shielded from cancellation, for at most
        5 seconds; what it raises is logged. Such a thread is ended there,
        so a client that saw the terminal event can post the thread's next
        message at once.

        Raises:
            RuntimeError: no ``nursery`` was given and the executor is not open.
            ValueError: empty task, bad ``timeout`` or ``max_iterations``, a
                duplicate ``run_id`` (in this executor, or in the
                ``history_store``), or both ``thread`` and ``messages``.
            ~trioflow.threads.ThreadBusy: a run of ``thread`` is going.
            ~trioflow.threads.ThreadFull: ``thread`` holds its limit of messages.
            Exception: whatever the ``history_store`` raises while opening the
                run's history (such as a Redis connection error); the run
                then does not start.
        """
        target = nursery or self._nursery
        if target is None:
            raise RuntimeError(
                "StreamingFlowExecutor.start needs a nursery: pass nursery=... or use "
                "'async with open_executor() as executor:'"
            )
        if thread is not None and messages:
            raise ValueError("give a thread or the messages a run continues, not both")
        if thread is not None:
            thread.check_start()
            metadata = {**(metadata or {}), "thread_id": thread.thread_id}
        run = self._make_run(agent, task, timeout, max_iterations, run_id, metadata, on_disconnect)
        run._history = tuple(messages)
        run._on_end = on_end
        if thread is not None:
            run.thread = thread
            run._history = thread.begin(run.run_id)
        try:
            await target.start(self._run_in, run, name=f"trioflow {run.run_id}")
        except BaseException:
            if thread is not None:
                thread.end(run.run_id, None)
            raise
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
                        run.cancel(CancelReason.CONSUMER_LEFT)

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

    def cancel_all(self, reason: CancelReason | str = CancelReason.SHUTDOWN) -> int:
        """Cancel every running run; returns how many were cancelled."""
        return sum(run.cancel(reason) for run in list(self._runs.values()))

    @asynccontextmanager
    async def _opened(self) -> AsyncIterator[Self]:
        """Give :meth:`start` a nursery for the block; see :func:`open_executor`."""
        if self._nursery is not None:
            raise RuntimeError("this executor is open already")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                finally:
                    self.cancel_all(CancelReason.EXECUTOR_CLOSED)
        finally:
            self._nursery = None

    async def __aenter__(self) -> Self:
        """The same as :func:`open_executor` for this executor (which is preferred)."""
        entered = self._opened()
        result = await entered.__aenter__()
        self._entered = entered
        return result

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        entered, self._entered = self._entered, None
        assert entered is not None
        return await entered.__aexit__(*exc_info)


@asynccontextmanager
async def open_executor(
    *,
    bus: EventBus | None = None,
    history: int = 4096,
    retention: int = 100,
    timeout: float | None = None,
    forward_limit: int = 65536,
    history_store: HistoryFactory | None = None,
    run_ids: Callable[[], str] | None = None,
) -> AsyncIterator[StreamingFlowExecutor]:
    """An open :class:`StreamingFlowExecutor`: one with a nursery for its runs (Trio's shape).

    The preferred way to give :meth:`StreamingFlowExecutor.start` a nursery
    of the executor's own::

        async with open_executor() as executor:
            run = await executor.start(agent, "What is 25 * 4?")
            ...

    On leaving the block, runs still going are cancelled (each ends with
    ``flow.cancelled``, reason ``"executor closed"``) and waited for. The
    arguments are those of :class:`StreamingFlowExecutor`. ``async with
    StreamingFlowExecutor(...)`` does the same and stays supported.

    Raises:
        ValueError: as :class:`StreamingFlowExecutor`.
    """
    executor = StreamingFlowExecutor(
        bus=bus,
        history=history,
        retention=retention,
        timeout=timeout,
        forward_limit=forward_limit,
        history_store=history_store,
        run_ids=run_ids,
    )
    async with executor._opened():
        yield executor


if TYPE_CHECKING:
    _RUN_IS_A_HANDLE: type[RunHandle] = Run  # mypy checks that Run implements the protocol


async def _sse_frames(events: Subscription) -> AsyncIterator[str]:
    async for event in events:
        yield encode_event(event)
