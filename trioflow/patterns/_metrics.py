"""Metrics collection: a listener that sums up runs as a typed :class:`FlowMetrics`."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from typing import Any

from trioflow.events import FlowEvent
from trioflow.figures import RunFigures

__all__ = ["FlowMetrics", "MetricsCollector"]


@dataclasses.dataclass(frozen=True, slots=True)
class FlowMetrics:
    """The figures of one run, or the totals of several: what :class:`MetricsCollector` returns.

    The figures of the PHP pattern (tokens, iterations, tool calls, errors,
    duration, tokens per second) and a few more a production dashboard wants.
    """

    run_id: str | None
    """The run, or ``None`` for the totals of several runs (or events without a run id)."""
    runs: int
    """``flow.started`` events seen."""
    status: str | None
    """A single run's outcome: ``"completed"``, ``"failed"`` or ``"cancelled"``;
    ``None`` while it runs, and for the totals of several runs."""
    events: int
    """Events seen."""
    tokens: int
    """Text deltas: one per ``token.received``, plus the ``tokens`` of each ``token.chunk``."""
    characters: int
    """Characters of streamed text."""
    iterations: int
    """Iterations completed (``iteration.completed``)."""
    tool_calls: int
    """Tool calls started (``tool.started``)."""
    tool_failures: int
    """Tool calls that failed (``tool.failed``)."""
    tools: Mapping[str, int]
    """Tool calls by tool name."""
    errors: int
    """Error events: ``error`` and every ``*.failed`` type (tool failures included)."""
    warnings: int
    """``warning`` events (model retries, restarted listeners, ...)."""
    input_tokens: int
    """Model input tokens, summed over the iterations' ``usage``."""
    output_tokens: int
    """Model output tokens, summed over the iterations' ``usage``."""
    duration: float
    """Seconds of run time; for several runs, the sum of their durations. See :class:`MetricsCollector`."""
    time_to_first_token: float | None
    """Seconds from ``flow.started`` to the first token (event timestamps); ``None`` without
    tokens. For several runs, the mean over the runs that streamed text."""
    tokens_per_second: float
    """``tokens / duration`` (0.0 when the duration is 0)."""

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-compatible dict."""
        figures = dataclasses.asdict(self)
        figures["tools"] = dict(self.tools)
        return figures


def _tokens_per_second(tokens: int, duration: float) -> float:
    return tokens / duration if duration > 0 else 0.0


class MetricsCollector:
    """A listener that counts what runs do and returns the figures as :class:`FlowMetrics`.

    Call it with every event; as a bus listener it is called for you::

        metrics = MetricsCollector()
        async with open_event_bus() as bus:
            bus.add_listener(metrics, overflow=Overflow.BLOCK)  # lossless: exact figures
            await StreamingFlowExecutor(bus=bus).run(agent, task)
        print(metrics.result().tokens_per_second)

    It keeps a :class:`~trioflow.figures.RunFigures` per ``run_id``
    (:meth:`result` with a run id, :meth:`by_run`, :meth:`figures`) and
    sums them up (:meth:`result`). It works on any stream of events, live or
    replayed; its counts of a run are those of :meth:`trioflow.Run.counts`.

    A run's duration is the ``duration`` its terminal event carries (measured
    on Trio's monotonic clock by the executor); without one, the time from its
    ``flow.started`` to its terminal event by their timestamps; while it runs,
    to its latest event so far.

    Args:
        run_id: count only the events of this run (``None``: every event).
    """

    def __init__(self, *, run_id: str | None = None) -> None:
        self._only = run_id
        self._runs: dict[str | None, RunFigures] = {}

    def __repr__(self) -> str:
        return f"<MetricsCollector runs={len(self._runs)}>"

    def __call__(self, event: FlowEvent) -> None:
        """Count ``event``."""
        if self._only is not None and event.run_id != self._only:
            return
        run = self._runs.get(event.run_id)
        if run is None:
            run = self._runs[event.run_id] = RunFigures()
        run.observe_event(event)

    def reset(self) -> None:
        """Forget every figure."""
        self._runs.clear()

    @property
    def run_ids(self) -> list[str | None]:
        """The run ids seen so far, in order of their first event."""
        return list(self._runs)

    def by_run(self) -> dict[str | None, FlowMetrics]:
        """The figures of each run seen so far, by run id (in order of their first event)."""
        return {run_id: self._metrics(run_id, run) for run_id, run in self._runs.items()}

    def result(self, run_id: str | None = None) -> FlowMetrics:
        """The figures so far: of one run, or the totals of every run seen.

        Args:
            run_id: the run; ``None`` for the totals (with a single run seen,
                they are that run's figures).

        Returns:
            A :class:`FlowMetrics` snapshot (all zeros before any event).

        Raises:
            KeyError: no event of ``run_id`` was seen.
        """
        if run_id is not None:
            return self._metrics(run_id, self.figures(run_id))
        if len(self._runs) == 1:
            ((only_id, only),) = self._runs.items()
            return self._metrics(only_id, only)
        return self._totals()

    @property
    def metrics(self) -> FlowMetrics:
        """:meth:`result`: the totals so far."""
        return self.result()

    def figures(self, run_id: str | None) -> RunFigures:
        """The live :class:`~trioflow.figures.RunFigures` of one run (read, don't change).

        Raises:
            KeyError: no event of ``run_id`` was seen.
        """
        try:
            return self._runs[run_id]
        except KeyError:
            raise KeyError(f"no event of run {run_id!r} was seen") from None

    @staticmethod
    def _metrics(run_id: str | None, run: RunFigures) -> FlowMetrics:
        duration = run.duration
        return FlowMetrics(
            run_id=run_id,
            runs=run.runs,
            status=run.status,
            events=run.events,
            tokens=run.tokens,
            characters=run.characters,
            iterations=run.iterations,
            tool_calls=run.tool_calls,
            tool_failures=run.tool_failures,
            tools=dict(run.tools),
            errors=run.errors,
            warnings=run.warnings,
            input_tokens=run.input_tokens,
            output_tokens=run.output_tokens,
            duration=duration,
            time_to_first_token=run.time_to_first_token,
            tokens_per_second=_tokens_per_second(run.tokens, duration),
        )

    def _totals(self) -> FlowMetrics:
        runs = list(self._runs.values())
        tools: Counter[str] = Counter()
        for run in runs:
            tools.update(run.tools)
        duration = sum(run.duration for run in runs)
        ttfts = [t for t in (run.time_to_first_token for run in runs) if t is not None]
        tokens = sum(run.tokens for run in runs)
        return FlowMetrics(
            run_id=None,
            runs=sum(run.runs for run in runs),
            status=None,
            events=sum(run.events for run in runs),
            tokens=tokens,
            characters=sum(run.characters for run in runs),
            iterations=sum(run.iterations for run in runs),
            tool_calls=sum(run.tool_calls for run in runs),
            tool_failures=sum(run.tool_failures for run in runs),
            tools=dict(tools),
            errors=sum(run.errors for run in runs),
            warnings=sum(run.warnings for run in runs),
            input_tokens=sum(run.input_tokens for run in runs),
            output_tokens=sum(run.output_tokens for run in runs),
            duration=duration,
            time_to_first_token=sum(ttfts) / len(ttfts) if ttfts else None,
            tokens_per_second=_tokens_per_second(tokens, duration),
        )
