"""Language models: the :class:`Model` protocol and its implementations.

* :class:`ScriptedModel`: deterministic and offline, the default.
* :class:`AnthropicModel`: Claude through the official ``anthropic`` SDK
  (install ``trioflow[claude]``).

:func:`open_model` picks one by name, or by the environment: Claude when
``ANTHROPIC_API_KEY`` is set, the scripted model otherwise.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from trioflow.models._base import (
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
from trioflow.models._scripted import ScriptedModel, Turn, TurnFactory

if TYPE_CHECKING:
    from trioflow.models._claude import AnthropicModel

__all__ = [
    "AnthropicModel",
    "ContentBlock",
    "Message",
    "Model",
    "ModelError",
    "ModelEvent",
    "RetryNotice",
    "ScriptedModel",
    "StopReason",
    "TextBlock",
    "TextDelta",
    "ToolCall",
    "ToolResultBlock",
    "ToolSpec",
    "ToolUseBlock",
    "Turn",
    "TurnEnd",
    "TurnFactory",
    "Usage",
    "default_model_name",
    "open_model",
]


def __getattr__(name: str) -> Any:
    # AnthropicModel needs the optional ``anthropic`` SDK: import it on first use.
    if name == "AnthropicModel":
        from trioflow.models._claude import AnthropicModel

        return AnthropicModel
    raise AttributeError(f"module 'trioflow.models' has no attribute {name!r}")


def default_model_name() -> str:
    """``"claude"`` when ``ANTHROPIC_API_KEY`` is set, else ``"scripted"``."""
    return "claude" if os.environ.get("ANTHROPIC_API_KEY") else "scripted"


@asynccontextmanager
async def open_model(
    name: str | None = None, *, pace: float = 0.0, **options: Any
) -> AsyncIterator[Model]:
    """Open the model called ``name`` for the duration of the block, and close it after.

    Args:
        name: ``"scripted"`` for the offline model; ``"claude"`` for Claude's
            default model, or a Claude model name (``"claude-..."``);
            ``None`` for :func:`default_model_name`.
        pace: the scripted model's tokens per second (0 for no delay).
        **options: passed to :class:`AnthropicModel` (``base_url``,
            ``max_tokens``, ``retry``, ...).

    Raises:
        ValueError: ``name`` is not a known model.
        ModelError: Claude was asked for without an API key (``kind="authentication"``).
        ImportError: Claude was asked for and the ``anthropic`` SDK is not installed.
    """
    chosen = name or default_model_name()
    if chosen == "scripted":
        yield ScriptedModel(pace=pace)
        return
    if chosen == "claude" or chosen.startswith("claude-"):
        from trioflow.models._claude import AnthropicModel

        kwargs = dict(options)
        if chosen != "claude":
            kwargs["model"] = chosen
        async with AnthropicModel(**kwargs) as model:
            yield model
        return
    raise ValueError(f"unknown model {chosen!r}: use 'scripted', 'claude' or a 'claude-...' name")
