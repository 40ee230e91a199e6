"""Prometheus: the telemetry's metrics in the Prometheus text exposition format.

:class:`PrometheusMetrics` is the OpenTelemetry Prometheus exporter's
metric reader (``opentelemetry-exporter-prometheus``), registered into a
``prometheus_client`` registry of its own (not the process-wide default,
so that two applications in one process keep their figures apart), and
rendered on demand: no HTTP server of the exporter's. :func:`render_prometheus`
renders a snapshot that another reader collected.

Needs ``opentelemetry-sdk``, ``opentelemetry-exporter-prometheus`` and
``prometheus-client``, imported when first used.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader, MetricsData
    from prometheus_client import CollectorRegistry

__all__ = ["PrometheusMetrics", "render_prometheus"]


class PrometheusMetrics:
    """A metric reader whose figures render in the Prometheus text exposition format.

    Give :attr:`reader` to an SDK ``MeterProvider`` (``metric_readers=[...]``);
    serve :meth:`render` with :attr:`content_type` on ``/metrics``.
    :func:`open_telemetry` with ``metrics=True`` does the wiring.

    The reader is the OpenTelemetry Prometheus exporter's
    (``PrometheusMetricReader``), without its ``target_info`` metric and
    its ``otel_scope_*`` labels. Names follow the OpenTelemetry-to-Prometheus
    conventions: dots become underscores, ``s`` units add ``_seconds``,
    counters end in ``_total`` (``trioflow.tokens`` is
    ``trioflow_tokens_total``, ``trioflow.run.duration`` is
    ``trioflow_run_duration_seconds``).

    Args:
        registry: the ``prometheus_client`` registry the reader's collector
            joins, to render along with the collectors already there;
            ``None`` (the default) for a new registry of this object's own.
            Never the process-wide default registry unless passed
            explicitly.

    Raises:
        ImportError: ``opentelemetry-sdk``, ``opentelemetry-exporter-prometheus``
            or ``prometheus-client`` is not installed.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None) -> None:
        import prometheus_client
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        self.content_type: str = prometheus_client.CONTENT_TYPE_LATEST
        """The ``Content-Type`` of :meth:`render`'s output."""
        self.registry: CollectorRegistry = (
            registry if registry is not None else prometheus_client.CollectorRegistry()
        )
        """The ``prometheus_client`` registry :meth:`render` renders."""
        self.reader: MetricReader = PrometheusMetricReader(
            disable_target_info=True, scope_info_enabled=False, registry=self.registry
        )
        """The OpenTelemetry metric reader to register with a meter provider."""
        # The exporter's collector queues what each collection read and renders the
        # queue: one render at a time, so that each renders what it collected, once.
        self._lock = threading.Lock()

    def render(self) -> bytes:
        """Collect the metrics now and return them in the Prometheus text format.

        Synchronous and quick; it runs the observable instruments' callbacks.
        Safe to call from any thread.

        Returns:
            The exposition, UTF-8 (empty when the reader is not registered
            with a meter provider, or the provider was shut down).
        """
        from prometheus_client import generate_latest

        with self._lock:
            return generate_latest(self.registry)

    def text(self) -> str:
        """:meth:`render`, as a string."""
        return self.render().decode("utf-8")


_NAME_RE = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_RE = re.compile(r"[^a-zA-Z0-9_]")
_UNIT_SUFFIXES: Final = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}


def _metric_name(name: str, unit: str) -> str:
    out = _NAME_RE.sub("_", name)
    if out[:1].isdigit():
        out = "_" + out
    suffix = _UNIT_SUFFIXES.get(unit)
    if suffix and not out.endswith("_" + suffix):
        out = f"{out}_{suffix}"
    return out


def _labels(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, value in (attributes or {}).items():
        label = _LABEL_RE.sub("_", key)
        if label[:1].isdigit():
            label = "_" + label
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        labels[label] = text
    return labels


def render_prometheus(data: MetricsData | None) -> bytes:
    """Render OpenTelemetry metrics data in the Prometheus text exposition format.

    For a snapshot another reader collected (:class:`PrometheusMetrics`
    collects and renders by itself); the names, labels and types are the
    ones :class:`PrometheusMetrics` gives.

    Monotonic sums become counters (``_total``), other sums and gauges
    become gauges, explicit-bucket histograms become histograms (cumulative
    ``_bucket`` samples with ``le``, ``_sum``, ``_count``); exponential
    histograms are left out. Expects cumulative temporality (the SDK
    readers' default).

    Args:
        data: what a reader collected (``InMemoryMetricReader.get_metrics_data()``),
            or ``None`` for nothing.

    Returns:
        The exposition, UTF-8.

    Raises:
        ImportError: ``prometheus-client`` or ``opentelemetry-sdk`` is not installed.
    """
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric

    families: dict[str, Metric] = {}

    def family(name: str, documentation: str, kind: str) -> Metric | None:
        existing = families.get(name)
        if existing is None:
            existing = families[name] = Metric(name, documentation, kind)
        return existing if existing.type == kind else None

    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                name = _metric_name(metric.name, metric.unit or "")
                doc = metric.description or metric.name
                points = metric.data
                if isinstance(points, Sum) and points.is_monotonic:
                    base = name[: -len("_total")] if name.endswith("_total") else name
                    fam = family(base, doc, "counter")
                    if fam is not None:
                        for p in points.data_points:
                            fam.add_sample(base + "_total", _labels(p.attributes), p.value)
                elif isinstance(points, (Sum, Gauge)):
                    fam = family(name, doc, "gauge")
                    if fam is not None:
                        for p in points.data_points:
                            fam.add_sample(name, _labels(p.attributes), p.value)
                elif isinstance(points, Histogram):
                    fam = family(name, doc, "histogram")
                    if fam is None:
                        continue
                    for h in points.data_points:
                        labels = _labels(h.attributes)
                        cumulative = 0
                        for bound, count in zip(h.explicit_bounds, h.bucket_counts, strict=False):
                            cumulative += count
                            fam.add_sample(
                                name + "_bucket",
                                {**labels, "le": repr(float(bound))},
                                cumulative,
                            )
                        fam.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, h.count)
                        fam.add_sample(name + "_count", labels, h.count)
                        fam.add_sample(name + "_sum", labels, h.sum)

    class _Families:
        def collect(self) -> Iterable[Metric]:
            return list(families.values())

    return generate_latest(_Families())
