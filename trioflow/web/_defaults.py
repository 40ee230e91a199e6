"""The pieces ``trioflow serve`` builds its application from, for your own server too.

:func:`agent_factory` makes the agents of the served runs (the demo agent
of :mod:`trioflow.demo`); :func:`open_metrics` opens a shared
event bus with OpenTelemetry metrics of every run and renders them for
``GET /metrics``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from trioflow.bus import EventBus, open_event_bus
from trioflow.demo import default_agent_factory
from trioflow.models import Model
from trioflow.web._app import MetricsRenderer
from trioflow.web._runs import AgentFactory

__all__ = ["agent_factory", "open_metrics"]


def agent_factory(model: Model, *, max_iterations: int = 10) -> AgentFactory:
    """The demo agent's factory for ``model``: :func:`trioflow.demo.default_agent_factory`.

    The web layer itself names no tool: the demo agent lives in :mod:`trioflow.demo`.
    """
    return default_agent_factory(model, max_iterations=max_iterations)


@asynccontextmanager
async def open_metrics() -> AsyncIterator[tuple[EventBus, MetricsRenderer]]:
    """A shared event bus with Prometheus telemetry attached, and the renderer of its metrics.

    Give the bus to the executor (``StreamingFlowExecutor(bus=bus)``) so it
    sees every run, and the renderer to ``create_app(..., metrics=...)``.

    Raises:
        ImportError: ``opentelemetry-sdk``, ``opentelemetry-exporter-prometheus`` or
            ``prometheus-client`` is not installed (the ``telemetry`` extra).
    """
    from trioflow.telemetry import open_telemetry

    async with open_telemetry(metrics=True) as telemetry:
        prometheus = telemetry.prometheus
        assert prometheus is not None  # open_telemetry(metrics=True) makes one

        def render() -> tuple[bytes, str]:
            return prometheus.render(), prometheus.content_type

        # Inside the telemetry's block: the bus closes (its listener drains) first.
        async with open_event_bus(history=0, name="serve") as bus:
            telemetry.attach(bus)
            yield bus, render
