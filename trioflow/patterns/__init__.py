"""Production patterns as library features: buffered and conditional streaming, metrics, errors.

* Buffered streaming: :func:`coalesce_tokens` (and the :class:`TokenCoalescer`
  behind it, :func:`coalesce_into` for a bus) turns ``token.received`` events
  into ``token.chunk`` events of at least N characters or every T seconds,
  whichever comes first.
* Conditional streaming: named filter :data:`PRESETS` (:func:`preset`) usable
  as ``types=`` wherever events are subscribed to, :func:`event_predicate` and
  :func:`filter_events` for any stream.
* Metrics: :class:`MetricsCollector`, a listener whose figures come out as a
  typed :class:`FlowMetrics`.
* Error tracking: :class:`ErrorTracker`, a listener that collects ``error`` and
  ``*.failed`` events with counts by kind (:class:`ErrorSummary`).

Listeners here are plain callables: add them to a bus with
:meth:`trioflow.EventBus.add_listener` (use ``overflow=Overflow.BLOCK`` when
the figures must be exact), or call them on each event of any stream.
"""

from trioflow.patterns._coalesce import TokenCoalescer, coalesce_into, coalesce_tokens
from trioflow.patterns._errors import ErrorSummary, ErrorTracker, error_type
from trioflow.patterns._filters import PRESETS, event_predicate, filter_events, preset
from trioflow.patterns._metrics import FlowMetrics, MetricsCollector

__all__ = [
    "PRESETS",
    "ErrorSummary",
    "ErrorTracker",
    "FlowMetrics",
    "MetricsCollector",
    "TokenCoalescer",
    "coalesce_into",
    "coalesce_tokens",
    "error_type",
    "event_predicate",
    "filter_events",
    "preset",
]
