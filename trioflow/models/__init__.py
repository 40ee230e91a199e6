"""Language models: the :class:`Model` protocol and its implementations."""

from trioflow.models.base import (
    ContentBlock,
    Message,
    Model,
    ModelError,
    ModelEvent,
    RetryNotice,
    StopReason,
    TextBlock,
    TextDelta,
    ToolCall,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    TurnEnd,
    Usage,
)

__all__ = [
    "ContentBlock",
    "Message",
    "Model",
    "ModelError",
    "ModelEvent",
    "RetryNotice",
    "StopReason",
    "TextBlock",
    "TextDelta",
    "ToolCall",
    "ToolResultBlock",
    "ToolSpec",
    "ToolUseBlock",
    "TurnEnd",
    "Usage",
]
