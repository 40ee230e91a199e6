"""A run's figures as its events tell them: :class:`RunFigures`, the one reading of the counts.

Three readers show figures of runs: the executor (:meth:`trioflow.Run.counts`,
``GET /runs/{id}``), :class:`~trioflow.patterns.MetricsCollector` (its
:class:`~trioflow.patterns.FlowMetrics` per run, and their totals) and
:class:`~trioflow.telemetry.Telemetry` (span attributes and run durations).
They all keep a :class:`RunFigures` per run and read it, so they agree on
the same stream of events. What each figure counts:

* ``events``: every event observed.
* ``tokens``: text deltas, one per ``token.received`` plus the ``tokens`` of
  each ``token.chunk``; the tokens a model retry voided are included
  (``discarded_tokens`` says how many there were; the run's text,
  :class:`~trioflow.events.OutputText`, drops them).
* ``iterations``: ``iteration.completed`` events.
* ``tool_calls``, ``tool_failures``, ``tools``: ``tool.started`` events;
  ``tool.failed`` events; tool calls by tool name.
* ``errors``: error events, as :meth:`FlowEvent.is_error
  <trioflow.events.FlowEvent.is_error>` says: ``error`` and every
  ``*.failed`` type (a failed tool, a failed iteration, a failed run).
* ``warnings``: ``warning`` events (model retries included).
* ``input_tokens``, ``output_tokens``: the ``usage`` of the
  ``iteration.completed`` events, summed (:func:`iteration_usage`).
* ``status`` and ``duration``: from the terminal event
  (:func:`measured_duration`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final, cast

from trioflow.events import (
    TERMINAL_TYPES,
    EventType,
    FlowCompletedData,
    FlowEvent,
    IterationCompletedData,
    ModelRetryData,
    TokenData,
    ToolStartedData,
)

__all__ = ["COUNT_KEYS", "RunFigures", "iteration_usage", "measured_duration"]

COUNT_KEYS: Final = (
    "events",
    "tokens",
    "tool_calls",
    "tool_failures",
    "iterations",
    "warnings",
    "errors",
)
"""The keys of :meth:`RunFigures.counts` (and of :meth:`trioflow.Run.counts`), in their order."""

# Plain strs: comparing with an enum member goes through StrEnum.__eq__, slower.
_TOKEN: Final = str(EventType.TOKEN_RECEIVED)
_CHUNK: Final = str(EventType.TOKEN_CHUNK)
_STARTED: Final = str(EventType.FLOW_STARTED)
_ITERATION: Final = str(EventType.ITERATION_COMPLETED)
_TOOL_STARTED: Final = str(EventType.TOOL_STARTED)
_TOOL_FAILED: Final = str(EventType.TOOL_FAILED)
_WARNING: Final = str(EventType.WARNING)
_ERROR: Final = str(EventType.ERROR)
_FAILED: Final = ".failed"
_STATUS: Final[Mapping[str, str]] = {
    str(EventType.FLOW_COMPLETED): "completed",
    str(EventType.FLOW_FAILED): "failed",
    str(EventType.FLOW_CANCELLED): "cancelled",
}
assert set(_STATUS) == TERMINAL_TYPES


def _count(value: object) -> int:
    """``value`` as a count: a positive int, anything else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def iteration_usage(data: Mapping[str, Any]) -> tuple[int, int]:
    """The ``(input_tokens, output_tokens)`` an ``iteration.completed`` event reports.

    A missing or malformed ``usage`` (or count) counts as 0.
    """
    usage: object = cast(IterationCompletedData, data).get("usage")
    if not isinstance(usage, Mapping):
        return 0, 0
    return _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))


def measured_duration(data: Mapping[str, Any]) -> float | None:
    """The ``duration`` a terminal event carries, if it is a finite number of seconds >= 0."""
    value: object = cast(FlowCompletedData, data).get("duration")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


class RunFigures:
    """The figures of one run, from its events: counts, tokens, usage, status, duration.

    Feed it the run's events in order, with :meth:`observe_event`, or with
    :meth:`observe` and the type and data before the event exists (as the
    executor does); read the attributes. The module says what each counts.

    The timestamps (``started``, ``first_token``, ...) and the durations
    derived from them need :meth:`observe_event`; :meth:`observe` alone
    knows the duration only from the terminal event's ``duration``.
    """

    __slots__ = (
        "characters",
        "chunk_tokens",
        "discarded_tokens",
        "ended",
        "errors",
        "first_event",
        "first_token",
        "input_tokens",
        "iterations",
        "last_event",
        "measured",
        "other_events",
        "output_tokens",
        "runs",
        "started",
        "status",
        "token_events",
        "tool_calls",
        "tool_failures",
        "tools",
        "warnings",
    )

    def __init__(self) -> None:
        # events and tokens are sums, so that a token.received costs one increment.
        self.token_events = 0
        """``token.received`` events (the ones a model retry voided included)."""
        self.chunk_tokens = 0
        """The ``tokens`` of the ``token.chunk`` events."""
        self.other_events = 0
        """Events other than ``token.received``."""
        self.characters = 0
        """Characters of streamed text (voided ones included)."""
        self.discarded_tokens = 0
        """Tokens a model retry voided: the sum of the ``warning`` events' ``discarded_tokens``."""
        self.iterations = 0
        """Iterations completed (``iteration.completed``)."""
        self.tool_calls = 0
        """Tool calls started (``tool.started``)."""
        self.tool_failures = 0
        """Tool calls that failed (``tool.failed``)."""
        self.tools: Counter[str] = Counter()
        """Tool calls started, by tool name."""
        self.errors = 0
        """Error events: ``error`` and every ``*.failed`` type."""
        self.warnings = 0
        """``warning`` events."""
        self.input_tokens = 0
        """Model input tokens, summed over the ``iteration.completed`` events' ``usage``."""
        self.output_tokens = 0
        """Model output tokens, summed over the ``iteration.completed`` events' ``usage``."""
        self.runs = 0
        """``flow.started`` events (1 for a run; more for a stream of several)."""
        self.status: str | None = None
        """``"completed"``, ``"failed"`` or ``"cancelled"`` after the terminal event, else ``None``."""
        self.measured: float | None = None
        """The terminal event's ``duration`` (:func:`measured_duration`), else ``None``."""
        self.started: float | None = None
        """Timestamp of the first ``flow.started`` (:meth:`observe_event` only)."""
        self.first_token: float | None = None
        """Timestamp of the first token (:meth:`observe_event` only)."""
        self.ended: float | None = None
        """Timestamp of the terminal event (:meth:`observe_event` only)."""
        self.first_event = math.inf
        """Timestamp of the first event observed with :meth:`observe_event` (``inf`` before)."""
        self.last_event = -math.inf
        """Timestamp of the latest event observed with :meth:`observe_event` (``-inf`` before)."""

    def __repr__(self) -> str:
        return (
            f"<RunFigures status={self.status} events={self.events} tokens={self.tokens} "
            f"iterations={self.iterations} tool_calls={self.tool_calls} errors={self.errors}>"
        )

    @property
    def events(self) -> int:
        """Events observed."""
        return self.other_events + self.token_events

    @property
    def tokens(self) -> int:
        """Text deltas: one per ``token.received``, plus the ``tokens`` of each ``token.chunk``.

        The tokens a model retry voided are included (see :attr:`discarded_tokens`).
        """
        return self.token_events + self.chunk_tokens

    def observe(self, type: str, data: Mapping[str, Any]) -> None:
        """Count one event, by its type and data."""
        if type == _TOKEN:  # the hot path first (the executor inlines it)
            self.token_events += 1
            text = cast(TokenData, data).get("token")
            if isinstance(text, str):
                self.characters += len(text)
            return
        self.other_events += 1
        if type == _CHUNK:
            self.chunk_tokens += _count(data.get("tokens"))
            chunk = data.get("chunk")
            if isinstance(chunk, str):
                self.characters += len(chunk)
            return
        if type == _ITERATION:
            self.iterations += 1
            input_tokens, output_tokens = iteration_usage(data)
            self.input_tokens += input_tokens
            self.output_tokens += output_tokens
        elif type == _TOOL_STARTED:
            self.tool_calls += 1
            self.tools[str(cast(ToolStartedData, data).get("tool", "?"))] += 1
        elif type == _WARNING:
            self.warnings += 1
            self.discarded_tokens += _count(cast(ModelRetryData, data).get("discarded_tokens"))
        elif type == _STARTED:
            self.runs += 1
        elif type == _ERROR:
            self.errors += 1
        elif type.endswith(_FAILED):  # the test of FlowEvent.is_error
            self.errors += 1
            if type == _TOOL_FAILED:
                self.tool_failures += 1
        status = _STATUS.get(type)
        if status is not None:
            self.status = status
            self.measured = measured_duration(data)

    def observe_event(self, event: FlowEvent) -> None:
        """Count ``event``, and keep its timestamp where a figure needs it."""
        ts = event.timestamp
        if ts < self.first_event:
            self.first_event = ts
        if ts > self.last_event:
            self.last_event = ts
        type = event.type
        if type in (_TOKEN, _CHUNK):
            if self.first_token is None:
                self.first_token = ts
        elif type == _STARTED:
            if self.started is None:
                self.started = ts
        elif type in _STATUS:
            self.ended = ts
        self.observe(type, event.data)

    @property
    def duration(self) -> float:
        """Seconds of run time.

        The terminal event's ``duration``; without one, the time from
        ``flow.started`` (else the first event) to the terminal event (else
        the latest event) by their timestamps; 0.0 when nothing tells.
        """
        if self.measured is not None:
            return self.measured
        start = self.started if self.started is not None else self.first_event
        end = self.ended if self.ended is not None else self.last_event
        return max(0.0, end - start) if math.isfinite(start) and math.isfinite(end) else 0.0

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from ``flow.started`` (else the first event) to the first token.

        By their timestamps; ``None`` without a token (or without :meth:`observe_event`).
        """
        if self.first_token is None:
            return None
        start = self.started if self.started is not None else self.first_event
        return max(0.0, self.first_token - start)

    def counts(self) -> dict[str, int]:
        """The counters of :meth:`trioflow.Run.counts`: the :data:`COUNT_KEYS` figures."""
        return {
            "events": self.events,
            "tokens": self.tokens,
            "tool_calls": self.tool_calls,
            "tool_failures": self.tool_failures,
            "iterations": self.iterations,
            "warnings": self.warnings,
            "errors": self.errors,
        }
