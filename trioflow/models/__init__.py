"""Language models: the :class:`Model` protocol and its implementations.

* :class:`ScriptedModel`: deterministic and offline, the default.
* :class:`AnthropicModel`: Claude through the official ``anthropic`` SDK
  (install ``trioflow[claude]``).
* :class:`OpenAIModel`: OpenAI, or any server speaking the OpenAI Chat
  Completions API (vLLM, Ollama, LM Studio, ...), through the official
  ``openai`` SDK (install ``trioflow[openai]``).

:func:`open_model` picks one by name (``"scripted"``, ``"claude"``,
``"claude-..."``, ``"openai:NAME"``), or by the environment: Claude when
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
    ModelOptions,
    RetryNotice,
    StopReason,
    TextBlock,
    TextDelta,
    ToolCall,
    ToolInputDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    TurnEnd,
    Usage,
)
from trioflow.models._scripted import ScriptedModel, Turn, TurnFactory

if TYPE_CHECKING:
    from trioflow.models._claude import AnthropicModel
    from trioflow.models._openai import OpenAIModel

__all__ = [
    "AnthropicModel",
    "ContentBlock",
    "Message",
    "Model",
    "ModelError",
    "ModelEvent",
    "ModelOptions",
    "OpenAIModel",
    "RetryNotice",
    "ScriptedModel",
    "StopReason",
    "TextBlock",
    "TextDelta",
    "ToolCall",
    "ToolInputDelta",
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
    # AnthropicModel and OpenAIModel need an optional SDK: import it on first use.
    if name == "AnthropicModel":
        from trioflow.models._claude import AnthropicModel

        return AnthropicModel
    if name == "OpenAIModel":
        from trioflow.models._openai import OpenAIModel

        return OpenAIModel
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
            ``"openai:NAME"`` for model ``NAME`` of an OpenAI-compatible
            server (OpenAI's, or the one at ``$TRIOFLOW_OPENAI_BASE_URL``:
            vLLM, Ollama, LM Studio, ...), ``"openai"`` for OpenAI's
            default model; ``None`` for :func:`default_model_name`.
        pace: the scripted model's tokens per second (0 for no delay).
        **options: passed to :class:`AnthropicModel` or :class:`OpenAIModel`
            (``base_url``, ``max_tokens``, ``retry``, ...).

    Raises:
        ValueError: ``name`` is not a known model (``"gpt-4o"`` instead of
            ``"openai:gpt-4o"``, ``"openai:"`` without a name); the message
            lists the accepted forms.
        ModelError: Claude or an OpenAI model was asked for without an API
            key (``kind="authentication"``).
        ImportError: the SDK of the model asked for (``anthropic``,
            ``openai``) is not installed.
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
    provider, colon, model_name = chosen.partition(":")
    if provider == "openai" and (not colon or model_name.strip()):
        from trioflow.models._openai import OpenAIModel

        kwargs = dict(options)
        if colon:
            kwargs["model"] = model_name
        async with OpenAIModel(**kwargs) as openai_model:
            yield openai_model
        return
    raise ValueError(
        f"unknown model {chosen!r}: use 'scripted', 'claude', a 'claude-...' name, "
        "'openai' or 'openai:NAME' (NAME as the OpenAI-compatible server calls the model)"
    )
