"""Setting up a :class:`Telemetry`, with Prometheus metrics or without."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio
from opentelemetry import trace

from trioflow.telemetry._listener import Telemetry
from trioflow.telemetry._prometheus import PrometheusMetrics

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider

__all__ = ["open_telemetry"]


@asynccontextmanager
async def open_telemetry(
    *,
    metrics: bool = False,
    tracer_provider: trace.TracerProvider | None = None,
    clock: Callable[[], float] | None = None,
    max_runs: int = 1024,
) -> AsyncIterator[Telemetry]:
    """A :class:`Telemetry` for the duration of the block, with Prometheus metrics if asked.

    Args:
        metrics: make an SDK meter provider of this telemetry's own, read
            by a :class:`PrometheusMetrics` (:attr:`Telemetry.prometheus`),
            shut down when the block exits. ``False``: the global meter
            provider, and no Prometheus.
        tracer_provider: where spans go; ``None`` for the global provider.
        clock: see :class:`Telemetry`.
        max_runs: see :class:`Telemetry`.

    Raises:
        ImportError: ``metrics`` is set and ``opentelemetry-sdk``,
            ``opentelemetry-exporter-prometheus`` or ``prometheus-client`` is
            not installed.
    """
    if not metrics:
        await trio.lowlevel.checkpoint()
        yield Telemetry(tracer_provider=tracer_provider, clock=clock, max_runs=max_runs)
        return
    provider, prometheus = _prometheus_provider()
    try:
        yield Telemetry(
            meter_provider=provider,
            tracer_provider=tracer_provider,
            clock=clock,
            max_runs=max_runs,
            prometheus=prometheus,
        )
    finally:
        provider.shutdown()


def _prometheus_provider() -> tuple[SDKMeterProvider, PrometheusMetrics]:
    from opentelemetry.sdk.metrics import MeterProvider

    prometheus = PrometheusMetrics()
    return MeterProvider(metric_readers=[prometheus.reader], shutdown_on_exit=False), prometheus
