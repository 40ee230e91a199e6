"""Telemetry: runs become OpenTelemetry metrics and traces; metrics become Prometheus text.

:class:`Telemetry` is an event listener. Attached to a bus that carries the
events of runs (``telemetry.attach(bus)``, typically the shared bus of a
:class:`~trioflow.StreamingFlowExecutor`), it records through the
OpenTelemetry API:

========================================  =========  ==========================================
instrument                                kind       what
========================================  =========  ==========================================
``trioflow.tokens``                       observed   ``token.received`` events (text deltas)
``trioflow.usage.tokens``                 counter    tokens the model billed; ``type``: input/output
``trioflow.iterations``                   counter    iterations started
``trioflow.tool_calls``                   counter    tool calls; ``tool``, ``outcome``: completed/failed
``trioflow.runs``                         counter    finished runs; ``status``: completed/failed/cancelled
``trioflow.runs.active``                  up-down    runs started and not finished
``trioflow.events.dropped``               observed   events the attached buses dropped; ``bus``
``trioflow.cache.hits`` / ``.misses``     counter    lookups of cached tools; ``tool``
``trioflow.iteration.tokens``             histogram  text deltas per iteration
``trioflow.run.duration``                 histogram  seconds from ``flow.started`` to the terminal event
``trioflow.run.time_to_first_token``      histogram  seconds from ``flow.started`` to the first token
``trioflow.tool.duration``                histogram  seconds per tool call; ``tool``, ``outcome``
``trioflow.model.duration``               histogram  seconds per model call; ``model``
========================================  =========  ==========================================

and one trace per run: a ``trioflow.run`` span (from ``flow.started`` to
the terminal event; status ERROR for ``flow.failed``), a
``trioflow.iteration`` child span per iteration, and under each iteration a
``chat {model}`` span per model call and an ``execute_tool {tool}`` span per
tool call (keyed by its ``call_id``), with the OpenTelemetry GenAI
attribute names where there is one (``gen_ai.request.model``,
``gen_ai.tool.name``, ``gen_ai.usage.input_tokens``, ...). Every span
carries the run's id as ``trioflow.run_id``.

The listener sees events after they happened, so spans are given the
events' own timestamps as start and end times: their durations are exact
whatever the listener's lag. Durations the events report themselves (a
run's ``duration``, a tool call's, a model call's, measured on Trio's
clock) feed the histograms.

Without an OpenTelemetry SDK, the API's no-op providers make all this cost
next to nothing. Tests and programs pass providers explicitly::

    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    async with open_event_bus() as bus:
        telemetry.attach(bus)
        await StreamingFlowExecutor(bus=bus).run(agent, "What is 25 * 4?")

:class:`PrometheusMetrics` is a metric reader (the OpenTelemetry Prometheus
exporter's, on a ``prometheus_client`` registry of its own) that renders what
it reads in the Prometheus text format, for a ``/metrics`` endpoint;
:func:`open_telemetry` sets one up with an SDK meter provider. A cached tool
(:func:`trioflow.cache.cached`) counts its hits and misses on a
:class:`Telemetry` given as its ``observer``.

This package needs ``opentelemetry-api``; :class:`PrometheusMetrics` and
:func:`open_telemetry` with ``metrics=True`` also need ``opentelemetry-sdk``,
``opentelemetry-exporter-prometheus`` and ``prometheus-client`` (all in the
``trioflow[telemetry]`` extra).
"""

from trioflow.telemetry._listener import HANDLED_TYPES, Telemetry
from trioflow.telemetry._open import open_telemetry
from trioflow.telemetry._prometheus import PrometheusMetrics, render_prometheus

__all__ = [
    "HANDLED_TYPES",
    "PrometheusMetrics",
    "Telemetry",
    "open_telemetry",
    "render_prometheus",
]
