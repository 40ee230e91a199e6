"""trioflow: stream the execution of LLM agents as typed events, on Trio.

The public API is re-exported here; the modules behind it are named after
their concept (:mod:`trioflow.events`, :mod:`trioflow.bus`, ...).
"""

from trioflow._version import __version__
from trioflow.agent import Agent, AgentResult, MaxIterationsExceeded
from trioflow.bus import (
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
from trioflow.cache import Cache, MemoryCache, cached
from trioflow.events import (
    TERMINAL_TYPES,
    EventType,
    FlowEvent,
    OutputText,
    known_event_types,
    register_event_type,
)
from trioflow.executor import Run, RunResult, RunStatus, StreamingFlowExecutor, open_executor
from trioflow.handle import CancelReason, OnDisconnect, RunHandle
from trioflow.history import EventHistory, HistoryExpired, MemoryHistory
from trioflow.models import (
    Message,
    Model,
    ModelError,
    ScriptedModel,
    ToolCall,
    Turn,
    Usage,
    open_model,
)
from trioflow.progress import FlowProgress
from trioflow.services import (
    ServiceCycleError,
    ServiceManager,
    ServiceNotFound,
    ServiceType,
    current_services,
    open_default_services,
)
from trioflow.settings import Settings, SettingsError
from trioflow.supervise import (
    RestartPolicy,
    RetryAttempt,
    RetryPolicy,
    SupervisorGaveUp,
    retry,
    supervise,
)
from trioflow.tools import (
    Tool,
    ToolContext,
    ToolError,
    ToolInputError,
    ToolRegistry,
    ToolTimeout,
    UnknownToolError,
    tool,
)

__all__ = [
    "TERMINAL_TYPES",
    "Agent",
    "AgentResult",
    "BusStatistics",
    "Cache",
    "CancelReason",
    "EventBus",
    "EventFilter",
    "EventHistory",
    "EventType",
    "FlowEvent",
    "FlowProgress",
    "HistoryExpired",
    "Listener",
    "ListenerStatistics",
    "MaxIterationsExceeded",
    "MemoryCache",
    "MemoryHistory",
    "Message",
    "Model",
    "ModelError",
    "OnDisconnect",
    "OutputText",
    "Overflow",
    "RestartPolicy",
    "RetryAttempt",
    "RetryPolicy",
    "Run",
    "RunHandle",
    "RunResult",
    "RunStatus",
    "ScriptedModel",
    "ServiceCycleError",
    "ServiceManager",
    "ServiceNotFound",
    "ServiceType",
    "Settings",
    "SettingsError",
    "StreamingFlowExecutor",
    "SubscriberEvicted",
    "Subscription",
    "SubscriptionStatistics",
    "SupervisorGaveUp",
    "Tool",
    "ToolCall",
    "ToolContext",
    "ToolError",
    "ToolInputError",
    "ToolRegistry",
    "ToolTimeout",
    "Turn",
    "UnknownToolError",
    "Usage",
    "__version__",
    "cached",
    "current_services",
    "known_event_types",
    "open_default_services",
    "open_event_bus",
    "open_executor",
    "open_model",
    "register_event_type",
    "retry",
    "supervise",
    "tool",
]
