"""trioflow: stream the execution of LLM agents as typed events, on Trio.

The public API is re-exported here; the modules behind it are named after
their concept (:mod:`trioflow.events`, :mod:`trioflow.bus`, ...).
"""

from trioflow.agent import Agent, AgentResult, Emit, MaxIterationsExceeded, RunControl
from trioflow.arithmetic import CalculationError, calculator, evaluate
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
from trioflow.cache import Cache, MemoryCache, cached
from trioflow.events import (
    LEGACY_TYPE_NAMES,
    TERMINAL_TYPES,
    EventType,
    FlowEvent,
    OutputText,
    check_event_types,
    known_event_types,
    register_event_type,
    validate_event_type,
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
from trioflow.progress import FlowProgress, format_duration
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
    Crash,
    Emitter,
    RestartPolicy,
    RetryAttempt,
    RetryPolicy,
    SupervisorGaveUp,
    retry,
    supervise,
)
from trioflow.tools import (
    Tool,
    ToolError,
    ToolInputError,
    ToolRegistry,
    ToolTimeout,
    UnknownToolError,
    tool,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EVENTS",
    "LEGACY_TYPE_NAMES",
    "STREAMING_EVENTS",
    "TERMINAL_TYPES",
    "Agent",
    "AgentResult",
    "BusStatistics",
    "Cache",
    "CalculationError",
    "CancelReason",
    "Crash",
    "Emit",
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
    "RunControl",
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
    "ToolError",
    "ToolInputError",
    "ToolRegistry",
    "ToolTimeout",
    "Turn",
    "UnknownToolError",
    "Usage",
    "__version__",
    "cached",
    "calculator",
    "check_event_types",
    "current_services",
    "evaluate",
    "format_duration",
    "known_event_types",
    "open_default_services",
    "open_event_bus",
    "open_executor",
    "open_model",
    "register_event_type",
    "retry",
    "supervise",
    "tool",
    "validate_event_type",
]
