"""trioflow: stream the execution of LLM agents as typed events, on Trio.

The public API is re-exported here; the modules behind it are named after
their concept (:mod:`trioflow.events`, :mod:`trioflow.bus`, ...).
"""

from trioflow.bus import (
    DEFAULT_EVENTS,
    STREAMING_EVENTS,
    BusStatistics,
    EventBus,
    EventFilter,
    Listener,
    ListenerStatistics,
    Overflow,
    SubscriberEvicted,
    Subscription,
    SubscriptionStatistics,
    open_event_bus,
)
from trioflow.events import TERMINAL_TYPES, EventType, FlowEvent, validate_event_type
from trioflow.history import EventHistory, HistoryExpired, MemoryHistory
from trioflow.progress import FlowProgress, format_duration
from trioflow.supervise import (
    Crash,
    Emitter,
    RestartPolicy,
    RetryAttempt,
    RetryPolicy,
    SupervisorGaveUp,
    retry,
    supervise,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EVENTS",
    "STREAMING_EVENTS",
    "TERMINAL_TYPES",
    "BusStatistics",
    "Crash",
    "Emitter",
    "EventBus",
    "EventFilter",
    "EventHistory",
    "EventType",
    "FlowEvent",
    "FlowProgress",
    "HistoryExpired",
    "Listener",
    "ListenerStatistics",
    "MemoryHistory",
    "Overflow",
    "RestartPolicy",
    "RetryAttempt",
    "RetryPolicy",
    "SubscriberEvicted",
    "Subscription",
    "SubscriptionStatistics",
    "SupervisorGaveUp",
    "__version__",
    "format_duration",
    "open_event_bus",
    "retry",
    "supervise",
    "validate_event_type",
]
