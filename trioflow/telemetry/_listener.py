"""The OpenTelemetry listener: metrics and spans from the events of runs.

Needs ``opentelemetry-api`` only; :mod:`trioflow.telemetry` describes the
instruments and spans.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import trio
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from trioflow._version import __version__
from trioflow.bus import EventBus, Overflow
from trioflow.events import EventType, FlowEvent
from trioflow.figures import RunFigures, iteration_usage, measured_duration

if TYPE_CHECKING:
    from trioflow.telemetry._prometheus import PrometheusMetrics

__all__ = ["HANDLED_TYPES", "Telemetry"]

# Floats, so that Prometheus shows the bounds as floats (``le="1.0"``), as it does its own.
_TOKEN_BUCKETS: Final = (
    0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
)  # fmt: skip
_SECONDS_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

HANDLED_TYPES: frozenset[str] = frozenset(
    {
        EventType.FLOW_STARTED,
        EventType.FLOW_COMPLETED,
        EventType.FLOW_FAILED,
        EventType.FLOW_CANCELLED,
        EventType.FLOW_PAUSED,
        EventType.FLOW_RESUMED,
        EventType.TOKEN_RECEIVED,
        EventType.ITERATION_STARTED,
        EventType.ITERATION_COMPLETED,
        EventType.ITERATION_FAILED,
        EventType.STEP_STARTED,
        EventType.STEP_COMPLETED,
        EventType.TOOL_STARTED,
        EventType.TOOL_COMPLETED,
        EventType.TOOL_FAILED,
        EventType.WARNING,
    }
)
"""The event types :class:`Telemetry` looks at; :meth:`Telemetry.attach` subscribes to these only."""

_TERMINAL_STATUS: Final[Mapping[str, str]] = {
    EventType.FLOW_COMPLETED: "completed",
    EventType.FLOW_FAILED: "failed",
    EventType.FLOW_CANCELLED: "cancelled",
}
_TOKEN: Final = str(EventType.TOKEN_RECEIVED)  # a plain str: enum attribute access is slow
_ROOT = Context()  # an empty context: run spans are roots, whatever the listener's context


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _error_text(data: Mapping[str, Any]) -> tuple[str, str]:
    error = data.get("error")
    if isinstance(error, Mapping):
        return str(error.get("type", "Error")), str(error.get("message", ""))
    return "Error", str(error) if error is not None else ""


@dataclasses.dataclass(slots=True, eq=False)
class _RunState:
    """What the listener remembers of one run between its first and its terminal event."""

    span: Span
    context: Context
    started: float  # the time of flow.started, in seconds since the epoch
    anchor: float  # the clock's reading at flow.started (when a clock is used)
    model: str
    figures: RunFigures = dataclasses.field(default_factory=RunFigures)
    """The run's figures (tokens, iterations, duration), read as every other reader does."""
    iteration: Span | None = None
    iteration_context: Context | None = None
    iteration_start: int = 0  # figures.tokens when the iteration started
    model_span: Span | None = None
    tools: dict[str, Span] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True, eq=False)
class _WatchedBus:
    """A bus whose dropped-event count the observable counter reports."""

    bus: EventBus
    name: str
    token: trio.lowlevel.TrioToken
    listener_id: int | None
    dropped: int = 0

    def refresh(self) -> None:
        """Read the bus's figure, if this is the bus's own Trio thread."""
        try:
            here = trio.lowlevel.current_trio_token()
        except RuntimeError:
            return
        if here is self.token:
            self.dropped = self.bus.statistics().dropped


class Telemetry:
    """Records runs as OpenTelemetry metrics and spans, from their events.

    Args:
        meter_provider: where the instruments come from; ``None`` for the
            global provider (a no-op until an SDK is configured).
        tracer_provider: where spans go; ``None`` for the global provider.
        clock: ``None`` (the default) to time spans and first tokens with
            the events' own timestamps (wall clock at emission, immune to
            the listener's lag). Pass a clock such as
            :func:`trio.current_time` to time them by reading it when the
            listener handles each event instead: virtual time under
            :class:`trio.testing.MockClock`, monotonic time otherwise (the
            listener's lag then adds to the figures).
        max_runs: the most runs tracked at once. Tracking ends at a run's
            terminal event; past this bound the oldest tracked run is
            dropped (its open spans end with ``trioflow.abandoned``).
        prometheus: the :class:`PrometheusMetrics` reading this telemetry's
            meter provider, if any, so a server can find it
            (:attr:`prometheus`).

    Raises:
        ValueError: ``max_runs`` is below 1.
    """

    def __init__(
        self,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        clock: Callable[[], float] | None = None,
        max_runs: int = 1024,
        prometheus: PrometheusMetrics | None = None,
    ) -> None:
        if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
            raise ValueError(f"max_runs must be an int >= 1, not {max_runs!r}")
        meter = (
            meter_provider.get_meter("trioflow", __version__)
            if meter_provider is not None
            else metrics.get_meter("trioflow", __version__)
        )
        self.tracer: trace.Tracer = (
            tracer_provider.get_tracer("trioflow", __version__)
            if tracer_provider is not None
            else trace.get_tracer("trioflow", __version__)
        )
        """The OpenTelemetry tracer spans are made with (also the ``tracing`` service)."""
        self.meter: metrics.Meter = meter
        """The OpenTelemetry meter the instruments come from."""
        self.prometheus = prometheus
        """The :class:`PrometheusMetrics` given at construction, or ``None``."""
        self._clock = clock
        self._max_runs = max_runs
        self._runs: OrderedDict[str, _RunState] = OrderedDict()
        self._buses: dict[int, _WatchedBus] = {}
        self._retired: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()  # the observable callback may run in an exporter thread

        # Tokens are the hot path: count them in a plain int, observed at collection time.
        self._token_count = 0
        meter.create_observable_counter(
            "trioflow.tokens",
            [self._observe_tokens],
            "{token}",
            "Text deltas streamed by the model (token.received).",
        )
        self._usage = meter.create_counter(
            "trioflow.usage.tokens", "{token}", "Tokens the model reported using, by type."
        )
        self._iterations = meter.create_counter(
            "trioflow.iterations", "{iteration}", "Agent iterations started."
        )
        self._tool_calls = meter.create_counter(
            "trioflow.tool_calls", "{call}", "Tool calls finished, by tool and outcome."
        )
        self._runs_total = meter.create_counter(
            "trioflow.runs", "{run}", "Runs finished, by status."
        )
        self._runs_active = meter.create_up_down_counter(
            "trioflow.runs.active", "{run}", "Runs started and not finished yet."
        )
        self._cache_hits = meter.create_counter(
            "trioflow.cache.hits", "{lookup}", "Cached tool calls answered from the cache."
        )
        self._cache_misses = meter.create_counter(
            "trioflow.cache.misses", "{lookup}", "Cached tool calls not found in the cache."
        )
        meter.create_observable_counter(
            "trioflow.events.dropped",
            [self._observe_dropped],
            "{event}",
            "Events dropped by the overflow policies of the attached buses' subscribers.",
        )
        self._iteration_tokens = meter.create_histogram(
            "trioflow.iteration.tokens",
            "{token}",
            "Text deltas streamed per iteration.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self._run_duration = meter.create_histogram(
            "trioflow.run.duration",
            "s",
            "Seconds from a run's start to its terminal event.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
        self._ttft = meter.create_histogram(
            "trioflow.run.time_to_first_token",
            "s",
            "Seconds from a run's start to its first token.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
        self._tool_duration = meter.create_histogram(
            "trioflow.tool.duration",
            "s",
            "Seconds per tool call, by tool and outcome.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
        self._model_duration = meter.create_histogram(
            "trioflow.model.duration",
            "s",
            "Seconds per model call (one streamed turn), by model.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
        self._handlers: dict[str, Callable[[FlowEvent, _RunState | None], None]] = {
            EventType.FLOW_STARTED: self._on_flow_started,
            EventType.FLOW_COMPLETED: self._on_terminal,
            EventType.FLOW_FAILED: self._on_terminal,
            EventType.FLOW_CANCELLED: self._on_terminal,
            EventType.FLOW_PAUSED: self._on_pause,
            EventType.FLOW_RESUMED: self._on_pause,
            EventType.ITERATION_STARTED: self._on_iteration_started,
            EventType.ITERATION_COMPLETED: self._on_iteration_ended,
            EventType.ITERATION_FAILED: self._on_iteration_ended,
            EventType.STEP_STARTED: self._on_step_started,
            EventType.STEP_COMPLETED: self._on_step_completed,
            EventType.TOOL_STARTED: self._on_tool_started,
            EventType.TOOL_COMPLETED: self._on_tool_ended,
            EventType.TOOL_FAILED: self._on_tool_ended,
            EventType.WARNING: self._on_warning,
        }

    def __repr__(self) -> str:
        return f"<Telemetry runs={len(self._runs)} buses={len(self._buses)}>"

    # -- attaching -------------------------------------------------------------------

    @property
    def listener(self) -> Callable[[FlowEvent], None]:
        """The listener callable, for ``bus.add_listener(telemetry.listener, ...)``.

        :meth:`attach` is usually better: it also reports the bus's dropped
        events and subscribes to the types the listener uses only.
        """
        return self.handle

    def attach(
        self, bus: EventBus, *, buffer: int = 4096, overflow: Overflow = Overflow.BLOCK
    ) -> int:
        """Listen to ``bus`` and report its dropped events; return the listener id.

        Attach to one bus per run: the executor's shared bus sees every run,
        a run's own bus (:attr:`trioflow.Run.bus`) only that run. The same
        events seen on two buses would be counted twice.

        Args:
            bus: the bus to listen to.
            buffer: the listener's channel bound.
            overflow: what happens when the listener falls behind; the
                default, BLOCK, never loses a figure (the listener is quick).

        Returns:
            The listener id (for :meth:`trioflow.EventBus.remove_listener`;
            :meth:`detach` is the usual way to stop).

        Raises:
            trio.ClosedResourceError: the bus is closed.
            RuntimeError: called outside ``trio.run``.
        """
        watched = _WatchedBus(bus, bus.name, trio.lowlevel.current_trio_token(), None)

        def listener(event: FlowEvent) -> None:
            self.handle(event)
            if event.type in _TERMINAL_STATUS:
                watched.refresh()

        listener_id = bus.add_listener(
            listener,
            types=HANDLED_TYPES,
            buffer=buffer,
            overflow=overflow,
            name="trioflow.telemetry",
        )
        watched.listener_id = listener_id
        with self._lock:
            self._prune_buses()
            self._buses[id(bus)] = watched
        return listener_id

    def detach(self, bus: EventBus) -> bool:
        """Stop listening to ``bus`` (its dropped count so far stays in the total).

        Returns:
            False if this telemetry was not attached to ``bus``.
        """
        with self._lock:
            watched = self._buses.pop(id(bus), None)
            if watched is None or watched.bus is not bus:
                return False
            watched.refresh()
            self._retired[watched.name] += watched.dropped
        if watched.listener_id is not None and not bus.closed:
            try:
                bus.remove_listener(watched.listener_id)
            except KeyError:
                pass  # it had stopped already
        return True

    def _prune_buses(self) -> None:
        for key, watched in list(self._buses.items()):
            if watched.bus.closed:
                watched.refresh()
                self._retired[watched.name] += watched.dropped
                del self._buses[key]

    def _observe_dropped(self, options: metrics.CallbackOptions) -> Iterator[metrics.Observation]:
        with self._lock:
            totals = dict(self._retired)
            for watched in self._buses.values():
                watched.refresh()
                totals[watched.name] = totals.get(watched.name, 0) + watched.dropped
            self._prune_buses()
        for name, value in sorted(totals.items()):
            yield metrics.Observation(value, {"bus": name})

    def _observe_tokens(self, options: metrics.CallbackOptions) -> Iterator[metrics.Observation]:
        yield metrics.Observation(self._token_count)

    # -- cache -------------------------------------------------------------------------

    def record_cache(self, *, hit: bool, tool: str | None = None) -> None:
        """Count one cache lookup: ``trioflow.cache.hits`` or ``trioflow.cache.misses``.

        This makes a telemetry a :class:`~trioflow.cache.CacheObserver`:
        ``cached(tool, observer=telemetry)`` counts the cached tool's lookups here.

        Args:
            hit: whether the lookup found a value.
            tool: the cached tool's name, recorded as the ``tool`` attribute.
        """
        attributes = {"tool": tool} if tool is not None else {}
        (self._cache_hits if hit else self._cache_misses).add(1, attributes)

    # -- events --------------------------------------------------------------------------

    def handle(self, event: FlowEvent) -> None:
        """Record one event. This is the listener; call it directly to feed events by hand.

        Events of types outside :data:`HANDLED_TYPES` are ignored, and so are
        the span parts of events whose run's ``flow.started`` was not seen
        (their counters still count).
        """
        if event.type == _TOKEN:  # the hot path
            self._on_token(event)
            return
        handler = self._handlers.get(event.type)
        if handler is None:
            return
        run_id = event.run_id
        state = self._runs.get(run_id) if run_id is not None else None
        if state is not None:
            state.figures.observe_event(event)
        handler(event, state)

    def _time(self, event: FlowEvent, state: _RunState | None) -> float:
        """When ``event`` happened, in seconds since the epoch."""
        if self._clock is None or state is None:
            return event.timestamp
        return state.started + (self._clock() - state.anchor)

    def _on_token(self, event: FlowEvent) -> None:
        self._token_count += 1
        state = self._runs.get(event.run_id)  # type: ignore[arg-type]  # None is never a key
        if state is None:
            return
        figures = state.figures
        first = figures.first_token is None
        figures.observe_event(event)
        if first:
            self._ttft.record(max(0.0, self._time(event, state) - state.started))

    def _on_flow_started(self, event: FlowEvent, state: _RunState | None) -> None:
        self._runs_active.add(1)
        run_id = event.run_id
        if run_id is None or state is not None:
            return
        while len(self._runs) >= self._max_runs:
            _, oldest = self._runs.popitem(last=False)
            self._abandon(oldest, event.timestamp)
        data = event.data
        model = str(data.get("model", ""))
        attributes: dict[str, Any] = {"trioflow.run_id": run_id}
        if model:
            attributes["gen_ai.request.model"] = model
        if isinstance(data.get("agent"), str):
            attributes["gen_ai.agent.name"] = data["agent"]
        max_iterations = _number(data.get("max_iterations"))
        if max_iterations is not None:
            attributes["trioflow.max_iterations"] = int(max_iterations)
        start = event.timestamp
        span = self.tracer.start_span(
            "trioflow.run",
            context=_ROOT,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=_ns(start),
        )
        anchor = self._clock() if self._clock is not None else 0.0
        state = _RunState(span, trace.set_span_in_context(span, _ROOT), start, anchor, model)
        state.figures.observe_event(event)
        self._runs[run_id] = state

    def _on_pause(self, event: FlowEvent, state: _RunState | None) -> None:
        if state is not None:
            name = "paused" if event.type == EventType.FLOW_PAUSED else "resumed"
            state.span.add_event(name, timestamp=_ns(self._time(event, state)))

    def _on_iteration_started(self, event: FlowEvent, state: _RunState | None) -> None:
        self._iterations.add(1)
        if state is None:
            return
        if state.iteration is not None:  # a missed iteration.completed: close the old one
            self._end_iteration(state, self._time(event, state), error=None)
        n = _number(event.data.get("iteration"))
        attributes: dict[str, Any] = {"trioflow.run_id": event.run_id or ""}
        if n is not None:
            attributes["trioflow.iteration"] = int(n)
        span = self.tracer.start_span(
            "trioflow.iteration",
            context=state.context,
            attributes=attributes,
            start_time=_ns(self._time(event, state)),
        )
        state.iteration = span
        state.iteration_context = trace.set_span_in_context(span, _ROOT)
        state.iteration_start = state.figures.tokens

    def _on_iteration_ended(self, event: FlowEvent, state: _RunState | None) -> None:
        data = event.data
        if event.type == EventType.ITERATION_COMPLETED:  # usage as RunFigures counts it
            for kind, used in zip(("input", "output"), iteration_usage(data), strict=True):
                if used:
                    self._usage.add(used, {"type": kind})
        usage = data.get("usage")
        if state is None or state.iteration is None:
            return
        error = _error_text(data) if event.type == EventType.ITERATION_FAILED else None
        when = self._time(event, state)
        if state.model_span is not None and error is not None:  # the model call failed
            self._end_span(state.model_span, when, error=error)
            state.model_span = None
        if isinstance(usage, Mapping):
            for kind in ("input", "output"):
                count = _number(usage.get(f"{kind}_tokens"))
                if count is not None:
                    state.iteration.set_attribute(f"gen_ai.usage.{kind}_tokens", int(count))
        self._end_iteration(state, when, error=error)

    def _end_iteration(
        self, state: _RunState, when: float, *, error: tuple[str, str] | None
    ) -> None:
        span = state.iteration
        if span is None:
            return
        for tool_span in state.tools.values():
            self._end_span(tool_span, when, error=error, interrupted=True)
        state.tools.clear()
        if state.model_span is not None:
            self._end_span(state.model_span, when, error=error, interrupted=True)
            state.model_span = None
        tokens = state.figures.tokens - state.iteration_start
        span.set_attribute("trioflow.tokens", tokens)
        self._iteration_tokens.record(tokens)
        self._end_span(span, when, error=error)
        state.iteration = None
        state.iteration_context = None
        state.iteration_start = state.figures.tokens

    def _on_step_started(self, event: FlowEvent, state: _RunState | None) -> None:
        if state is None or event.data.get("step") != "model":
            return
        model = str(event.data.get("model") or state.model)
        attributes: dict[str, Any] = {
            "trioflow.run_id": event.run_id or "",
            "gen_ai.operation.name": "chat",
        }
        if model:
            attributes["gen_ai.request.model"] = model
        if state.model_span is not None:
            self._end_span(state.model_span, self._time(event, state), error=None)
        state.model_span = self.tracer.start_span(
            f"chat {model}" if model else "chat",
            context=state.iteration_context or state.context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=_ns(self._time(event, state)),
        )

    def _on_step_completed(self, event: FlowEvent, state: _RunState | None) -> None:
        data = event.data
        if data.get("step") != "model":
            return
        model = str(data.get("model") or (state.model if state is not None else ""))
        duration = _number(data.get("duration"))
        if duration is not None:
            self._model_duration.record(max(0.0, duration), {"model": model} if model else {})
        if state is None or state.model_span is None:
            return
        span = state.model_span
        usage = data.get("usage")
        if isinstance(usage, Mapping):
            for kind in ("input", "output"):
                count = _number(usage.get(f"{kind}_tokens"))
                if count is not None:
                    span.set_attribute(f"gen_ai.usage.{kind}_tokens", int(count))
        self._end_span(span, self._time(event, state), error=None)
        state.model_span = None

    def _on_tool_started(self, event: FlowEvent, state: _RunState | None) -> None:
        data = event.data
        call_id = data.get("call_id")
        if state is None or not isinstance(call_id, str):
            return
        tool = str(data.get("tool", ""))
        span = self.tracer.start_span(
            f"execute_tool {tool}",
            context=state.iteration_context or state.context,
            attributes={
                "trioflow.run_id": event.run_id or "",
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": tool,
                "gen_ai.tool.call.id": call_id,
            },
            start_time=_ns(self._time(event, state)),
        )
        old = state.tools.pop(call_id, None)
        if old is not None:
            self._end_span(old, self._time(event, state), error=None, interrupted=True)
        state.tools[call_id] = span

    def _on_tool_ended(self, event: FlowEvent, state: _RunState | None) -> None:
        data = event.data
        tool = str(data.get("tool", ""))
        outcome = "completed" if event.type == EventType.TOOL_COMPLETED else "failed"
        attributes = {"tool": tool, "outcome": outcome}
        self._tool_calls.add(1, attributes)
        duration = _number(data.get("duration"))
        if duration is not None:
            self._tool_duration.record(max(0.0, duration), attributes)
        call_id = data.get("call_id")
        if state is None or not isinstance(call_id, str):
            return
        span = state.tools.pop(call_id, None)
        if span is not None:
            error = _error_text(data) if outcome == "failed" else None
            self._end_span(span, self._time(event, state), error=error)

    def _on_warning(self, event: FlowEvent, state: _RunState | None) -> None:
        data = event.data
        if state is None or state.model_span is None or "attempt" not in data:
            return
        attributes: dict[str, Any] = {"trioflow.message": str(data.get("message", ""))}
        attempt, delay = _number(data.get("attempt")), _number(data.get("delay"))
        if attempt is not None:
            attributes["trioflow.attempt"] = int(attempt)
        if delay is not None:
            attributes["trioflow.delay"] = delay
        state.model_span.add_event("retry", attributes, timestamp=_ns(self._time(event, state)))

    def _on_terminal(self, event: FlowEvent, state: _RunState | None) -> None:
        status = _TERMINAL_STATUS[event.type]
        data = event.data
        self._runs_total.add(1, {"status": status})
        self._runs_active.add(-1)
        duration = measured_duration(data)  # as RunFigures.duration reads it
        when = self._time(event, state)
        if duration is None and state is not None:
            duration = max(0.0, when - state.started)
        if duration is not None:
            self._run_duration.record(duration)
        if state is None:
            return
        assert event.run_id is not None
        del self._runs[event.run_id]
        span = state.span
        error = _error_text(data) if status == "failed" else None
        self._end_iteration(state, when, error=error)
        span.set_attribute("trioflow.status", status)
        span.set_attribute("trioflow.tokens", state.figures.tokens)
        iterations = _number(data.get("iterations"))
        span.set_attribute(
            "trioflow.iterations",
            int(iterations) if iterations is not None else state.figures.iterations,
        )
        if isinstance(data.get("reason"), str):
            span.set_attribute("trioflow.reason", data["reason"])
        usage = data.get("usage")
        if isinstance(usage, Mapping):
            for kind in ("input", "output"):
                count = _number(usage.get(f"{kind}_tokens"))
                if count is not None:
                    span.set_attribute(f"gen_ai.usage.{kind}_tokens", int(count))
        if status == "completed":
            span.set_status(Status(StatusCode.OK))
        self._end_span(span, when, error=error)

    def _end_span(
        self,
        span: Span,
        when: float,
        *,
        error: tuple[str, str] | None,
        interrupted: bool = False,
    ) -> None:
        if interrupted:
            span.set_attribute("trioflow.interrupted", True)
        if error is not None:
            kind, message = error
            span.add_event(
                "exception",
                {"exception.type": kind, "exception.message": message},
                timestamp=_ns(when),
            )
            span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}"))
        span.end(end_time=_ns(when))

    def _abandon(self, state: _RunState, when: float) -> None:
        state.span.set_attribute("trioflow.abandoned", True)
        for tool_span in state.tools.values():
            self._end_span(tool_span, when, error=None, interrupted=True)
        if state.model_span is not None:
            self._end_span(state.model_span, when, error=None, interrupted=True)
        if state.iteration is not None:
            self._end_span(state.iteration, when, error=None, interrupted=True)
        self._end_span(state.span, when, error=None)
