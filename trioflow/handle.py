"""What every kind of run offers its watchers: :class:`RunHandle`, its status and its policies.

A run can be live in this process (:class:`trioflow.Run`, made by
:class:`~trioflow.StreamingFlowExecutor`), a recording played back
(:class:`trioflow.recording.ReplayRun`), or, later, kept elsewhere. The web
server, the transports and clients type against :class:`RunHandle`, the
protocol all of them implement, and never against one kind.

* :class:`RunStatus`: where a run is in its life.
* :class:`CancelReason`: the reasons trioflow itself cancels a run for; the
  ``reason`` of its ``flow.cancelled`` event (and of
  :attr:`trioflow.RunResult.reason`) is one of these values, or the string a
  caller gave :meth:`RunHandle.cancel`.
* :class:`CancelMode`: how a cancellation stops a run.
* :class:`OnDisconnect`: what happens to a run when the last client watching
  it goes away.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, runtime_checkable

from trioflow.bus import EventFilter, Overflow, Subscription

__all__ = ["CancelMode", "CancelReason", "OnDisconnect", "RunHandle", "RunStatus"]


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


class CancelReason(enum.StrEnum):
    """Why trioflow cancelled a run: the ``reason`` of its ``flow.cancelled`` event.

    Being a :class:`~enum.StrEnum`, a member compares equal to its value
    (``CancelReason.TIMEOUT == "timeout"``) and is that string on the wire.
    A caller may still cancel with a reason of its own (any string).
    """

    CANCELLED = "cancelled"
    """:meth:`RunHandle.cancel` without a reason, or a cancellation from outside the run."""
    TIMEOUT = "timeout"
    """The run's ``timeout`` expired."""
    INTERRUPTED = "interrupted"
    """The run's task was interrupted (:exc:`KeyboardInterrupt`, a signal in the CLI)."""
    CLIENT = "cancelled by client"
    """A client asked for it (``POST /runs/{id}/cancel``, a WebSocket ``cancel``)."""
    CLIENT_DISCONNECTED = "client disconnected"
    """The last client watching a run with ``on_disconnect: cancel`` went away."""
    SERVER_SHUTDOWN = "server shutdown"
    """The web server is shutting down."""
    EXECUTOR_CLOSED = "executor closed"
    """The executor's ``async with`` block (or :func:`~trioflow.executor.open_executor`) ended."""
    SHUTDOWN = "shutdown"
    """:meth:`~trioflow.StreamingFlowExecutor.cancel_all` without a reason."""
    CONSUMER_LEFT = "consumer left the stream"
    """The block of :meth:`~trioflow.StreamingFlowExecutor.stream` was left before the run ended."""
    OUTPUT_CLOSED = "output closed"
    """The CLI's output went away (a closed pipe)."""


def cancel_reason(value: CancelReason | str) -> CancelReason | str:
    """``value`` as a :class:`CancelReason` member when it is one's value, else as it is."""
    try:
        return CancelReason(value)
    except ValueError:
        return str(value)


class CancelMode(enum.StrEnum):
    """How :meth:`RunHandle.cancel` stops a run."""

    IMMEDIATE = "immediate"
    """At once: whatever the run is doing (a model stream, tool calls) is cancelled."""
    AFTER_TURN = "after_turn"
    """Once the current model turn and its tool calls have finished: the run
    then ends with ``flow.cancelled`` instead of starting another turn. A turn
    that was the model's final answer completes the run. An immediate cancel
    may still follow."""


class OnDisconnect(enum.StrEnum):
    """What happens to a run when the last client watching it disconnects."""

    CONTINUE = "continue"
    """The run goes on; a client can reconnect and resume (the default)."""
    CANCEL = "cancel"
    """The run is cancelled (it ends with ``flow.cancelled``, reason ``"client disconnected"``)."""


@runtime_checkable
class RunHandle(Protocol):
    """A run as its watchers see it: what the web hub, the transports and clients use.

    Implemented by :class:`trioflow.Run` (a live run of this process) and
    :class:`trioflow.recording.ReplayRun` (a recording played back).
    ``isinstance(x, RunHandle)`` checks only that the members exist.
    """

    @property
    def run_id(self) -> str:
        """The run's id."""
        ...

    @property
    def status(self) -> RunStatus:
        """The run's status now."""
        ...

    @property
    def done(self) -> bool:
        """Whether the run has ended (no more events will come)."""
        ...

    @property
    def last_seq(self) -> int:
        """The seq of the run's newest event (0 before the first)."""
        ...

    @property
    def on_disconnect(self) -> OnDisconnect:
        """What happens to the run when its last watching client disconnects."""
        ...

    def subscribe(
        self,
        *,
        after: int | None = 0,
        types: EventFilter = None,
        buffer: int = 256,
        overflow: Overflow = Overflow.BLOCK,
        name: str | None = None,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Watch the run's events: the retained ones after ``after``, then live ones.

        Iteration ends when the run ends.
        """
        ...

    def cancel(
        self,
        reason: CancelReason | str = CancelReason.CANCELLED,
        *,
        mode: CancelMode | str = CancelMode.IMMEDIATE,
    ) -> bool:
        """Stop the run (see :class:`CancelMode`); returns False if it had ended already (or was being cancelled so).

        Raises:
            ValueError: ``mode`` is not a :class:`CancelMode` value.
        """
        ...

    def wait(self) -> Awaitable[object]:
        """Wait until the run has ended."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible view: ``run_id``, ``status``, ``task``, ``progress``, ``counts``, ..."""
        ...
