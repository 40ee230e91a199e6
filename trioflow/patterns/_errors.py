"""Error tracking: a listener that collects ``error`` and ``*.failed`` events with counts."""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any

from trioflow.events import FlowEvent

__all__ = ["ErrorSummary", "ErrorTracker", "error_type"]


def error_type(event: FlowEvent) -> str:
    """The kind of error an event reports: the exception's type name from its data.

    Reads ``data["error"]["type"]`` (the shape of ``flow.failed``,
    ``tool.failed``, ``iteration.failed`` and of the bus's listener errors);
    an ``error`` given as a plain string counts as ``"Error"``; an event with
    no error details (``FlowEvent.error("message")``) as ``"unknown"``.

    Returns:
        The type name, such as ``"ModelError"`` or ``"CalculationError"``.
    """
    error = event.data.get("error")
    if isinstance(error, Mapping):
        kind = error.get("type")
        if isinstance(kind, str) and kind:
            return kind
    elif isinstance(error, str):
        return "Error"
    return "unknown"


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorSummary:
    """A snapshot of an :class:`ErrorTracker`: what :meth:`ErrorTracker.summary` returns."""

    total: int
    """Error events seen."""
    by_event_type: Mapping[str, int]
    """Counts by event type (``"tool.failed"``, ``"flow.failed"``, ``"error"``, ...)."""
    by_error_type: Mapping[str, int]
    """Counts by error type from the data (see :func:`error_type`)."""
    runs: int
    """Distinct run ids among the error events (``None`` counts as one)."""
    last: FlowEvent | None
    """The most recent error event."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible view (``last`` as an event dict)."""
        return {
            "total": self.total,
            "by_event_type": dict(self.by_event_type),
            "by_error_type": dict(self.by_error_type),
            "runs": self.runs,
            "last": None if self.last is None else self.last.to_dict(),
        }


class ErrorTracker:
    """A listener that collects error events and counts them by kind.

    An error event is ``error`` or any ``*.failed`` type
    (:meth:`FlowEvent.is_error`); every other event is ignored, so the
    tracker can listen to everything, though filtering at the bus is cheaper::

        errors = ErrorTracker(limit=50)
        bus.add_listener(errors, types=FlowEvent.is_error)
        ...
        print(errors.summary().by_error_type)   # {"CalculationError": 1, "ModelError": 1}

    Counts cover every error seen; the events themselves are kept only for
    the last ``limit`` (memory stays bounded however long the process runs).

    Args:
        limit: how many of the most recent error events to keep (>= 0).

    Raises:
        ValueError: ``limit`` is negative.
    """

    def __init__(self, *, limit: int = 100) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, not {limit!r}")
        self._errors: deque[FlowEvent] = deque(maxlen=limit)
        self._by_event: Counter[str] = Counter()
        self._by_error: Counter[str] = Counter()
        self._runs: set[str | None] = set()
        self._total = 0
        self._last: FlowEvent | None = None

    def __repr__(self) -> str:
        return f"<ErrorTracker total={self._total}>"

    def __call__(self, event: FlowEvent) -> None:
        """Record ``event`` if it is an error event."""
        if not event.is_error():
            return
        self._total += 1
        self._by_event[event.type] += 1
        self._by_error[error_type(event)] += 1
        self._runs.add(event.run_id)
        self._errors.append(event)
        self._last = event

    @property
    def total(self) -> int:
        """Error events seen."""
        return self._total

    @property
    def counts(self) -> dict[str, int]:
        """Counts by event type."""
        return dict(self._by_event)

    @property
    def error_types(self) -> dict[str, int]:
        """Counts by error type (see :func:`error_type`)."""
        return dict(self._by_error)

    @property
    def errors(self) -> tuple[FlowEvent, ...]:
        """The most recent error events, oldest first (at most ``limit``)."""
        return tuple(self._errors)

    @property
    def limit(self) -> int:
        """How many error events are kept."""
        maxlen = self._errors.maxlen
        assert maxlen is not None
        return maxlen

    def for_run(self, run_id: str | None) -> tuple[FlowEvent, ...]:
        """The kept error events of one run, oldest first."""
        return tuple(e for e in self._errors if e.run_id == run_id)

    def summary(self) -> ErrorSummary:
        """A snapshot of the counts and the most recent error."""
        return ErrorSummary(
            total=self._total,
            by_event_type=dict(self._by_event),
            by_error_type=dict(self._by_error),
            runs=len(self._runs),
            last=self._last,
        )

    def reset(self) -> None:
        """Forget every error and count."""
        self._errors.clear()
        self._by_event.clear()
        self._by_error.clear()
        self._runs.clear()
        self._total = 0
        self._last = None
