"""The model protocol: what the agent loop needs from a language model.

A model takes the conversation (a sequence of :class:`Message`), the tools it
may call (:class:`ToolSpec`) and a system prompt, and streams
:data:`ModelEvent` values as they arrive: :class:`TextDelta` for each piece of
text, :class:`ToolInputDelta` for each piece of a tool call's input JSON (a
model that streams it), :class:`ToolCall` for each complete tool call, :class:`RetryNotice`
when it is about to retry a failed request, and exactly one :class:`TurnEnd`
last, with the stop reason and token usage.

The agent loop depends only on :class:`Model`; the offline
:class:`~trioflow.models.ScriptedModel`, Claude's
:class:`~trioflow.models.AnthropicModel` and the OpenAI-compatible
:class:`~trioflow.models.OpenAIModel` implement it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "ContentBlock",
    "Message",
    "Model",
    "ModelError",
    "ModelEvent",
    "ModelOptions",
    "RetryNotice",
    "StopReason",
    "TextBlock",
    "TextDelta",
    "ToolCall",
    "ToolInputDelta",
    "ToolResultBlock",
    "ToolSpec",
    "ToolUseBlock",
    "TurnEnd",
    "Usage",
]


class ModelError(Exception):
    """A model request failed for good (after any retries).

    Attributes:
        kind: a short machine-readable category (``"rate_limit"``,
            ``"overloaded"``, ``"server_error"``, ``"connection"``,
            ``"bad_request"``, ``"authentication"``, ``"invalid_response"``
            (the model's response broke its protocol: invalid data in the
            stream, a tool input that is not a JSON object), ``"script"``,
            ...).
        status: the HTTP status, when there was one.
        retryable: whether the failure was of a retryable kind.
        retry_after: the seconds the server asked to wait before another
            request, when that hint is why the model gave up (it exceeded
            the retry policy's
            :attr:`~trioflow.RetryPolicy.max_retry_after`); else ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str = "error",
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class StopReason(enum.StrEnum):
    """Why a model turn ended (the Anthropic Messages API's values)."""

    END_TURN = "end_turn"
    TOOL_USE = "tool_use"
    MAX_TOKENS = "max_tokens"
    STOP_SEQUENCE = "stop_sequence"
    PAUSE_TURN = "pause_turn"
    REFUSAL = "refusal"


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one model turn, or summed over several with ``+``."""

    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )

    def to_dict(self) -> dict[str, int]:
        """``{"input_tokens", "output_tokens", "total_tokens"}``."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }


# -- conversation -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TextBlock:
    """Plain text in a message."""

    text: str
    type: Literal["text"] = "text"


@dataclasses.dataclass(frozen=True, slots=True)
class ToolUseBlock:
    """The assistant's request to call tool ``name`` with ``input``."""

    id: str
    name: str
    input: Mapping[str, Any]
    type: Literal["tool_use"] = "tool_use"


@dataclasses.dataclass(frozen=True, slots=True)
class ToolResultBlock:
    """The result of tool call ``tool_use_id``, sent back to the model as text."""

    tool_use_id: str
    content: str
    is_error: bool = False
    type: Literal["tool_result"] = "tool_result"


ContentBlock = TextBlock | ToolUseBlock | ToolResultBlock
"""One block of a message's content."""


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One message of the conversation: a role and its content blocks."""

    role: Literal["user", "assistant"]
    content: tuple[ContentBlock, ...]

    @classmethod
    def user(cls, text: str) -> Message:
        """A user message holding one :class:`TextBlock`."""
        return cls("user", (TextBlock(text),))

    @property
    def text(self) -> str:
        """The concatenated text of the message's :class:`TextBlock` blocks."""
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    def to_dict(self) -> dict[str, Any]:
        """The Anthropic Messages API shape of this message."""
        return {"role": self.role, "content": [_block_dict(b) for b in self.content]}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Message:
        """The message of a :meth:`to_dict` mapping (a thread's message read back from Redis).

        Raises:
            ValueError: ``obj`` is not the shape :meth:`to_dict` makes.
        """
        try:
            role = obj["role"]
            if role not in ("user", "assistant"):
                raise ValueError(f"a message's role is 'user' or 'assistant', not {role!r}")
            return cls(role, tuple(_block_of(b) for b in obj["content"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a message: {exc}") from None


def _block_of(obj: Mapping[str, Any]) -> ContentBlock:
    kind = obj["type"]
    if kind == "text":
        return TextBlock(str(obj["text"]))
    if kind == "tool_use":
        return ToolUseBlock(str(obj["id"]), str(obj["name"]), dict(obj["input"]))
    if kind == "tool_result":
        return ToolResultBlock(
            str(obj["tool_use_id"]), str(obj["content"]), bool(obj.get("is_error", False))
        )
    raise ValueError(f"unknown content block type {kind!r}")


def _block_dict(block: ContentBlock) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    if isinstance(block, ToolUseBlock):
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": dict(block.input)}
    return {
        "type": "tool_result",
        "tool_use_id": block.tool_use_id,
        "content": block.content,
        "is_error": block.is_error,
    }


@dataclasses.dataclass(frozen=True, slots=True)
class ModelOptions:
    """Sampling options for a turn, overriding the model's own (``None``: the model's).

    Given to :meth:`Model.stream` as ``options=`` (only when set: a model
    written before options existed still works). The offline
    :class:`~trioflow.models.ScriptedModel` takes and ignores them.

    Raises:
        ValueError: ``max_tokens`` is below 1, or ``temperature`` is not a
            finite number from 0 to 2.
    """

    max_tokens: int | None = None
    """The most tokens the turn may generate."""
    temperature: float | None = None
    """Sampling temperature (0 to 2; Anthropic's API takes 0 to 1)."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be an int >= 1, not {self.max_tokens!r}")
        t = self.temperature
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2
        ):
            raise ValueError(f"temperature must be a number from 0 to 2, not {t!r}")

    def __bool__(self) -> bool:
        return self.max_tokens is not None or self.temperature is not None


@dataclasses.dataclass(frozen=True, slots=True)
class ToolSpec:
    """What a model is told about a tool: its name, description and JSON schema."""

    name: str
    description: str
    input_schema: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The Anthropic Messages API shape of this tool."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": dict(self.input_schema),
        }


# -- model events ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TextDelta:
    """A piece of text, streamed as it arrived."""

    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class ToolInputDelta:
    """A piece of a tool call's input JSON, streamed as the model produced it.

    A model that streams tool input yields, for each call, one delta with
    ``first`` true and ``partial_json == ""`` as soon as the call's ``id``
    and ``name`` are known, then the pieces of its input as they arrive
    (in order; pieces of several calls may interleave, told apart by
    ``id``), then the call's :class:`ToolCall`. The pieces of one call
    concatenate to its input's JSON text (a blank text is ``{}``); the
    :class:`ToolCall` carries it parsed and is what counts. Like text
    deltas, the deltas before a :class:`RetryNotice` are void.
    """

    id: str
    """The tool call's id (as in its :class:`ToolCall`)."""
    name: str
    """The tool's name."""
    partial_json: str
    """The next piece of the input's JSON text (``""`` on the ``first`` delta)."""
    index: int | None = None
    """The call's position among the turn's content blocks or tool calls, when the API gives one."""
    first: bool = False
    """The first delta of this call: its ``id`` and ``name`` are now known."""


@dataclasses.dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete tool call: its id, the tool's name and the parsed JSON input."""

    id: str
    name: str
    input: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class RetryNotice:
    """The model is about to retry a failed request after ``delay`` seconds.

    ``error`` describes the failure (its type and message) and never contains
    credentials. Everything the failed attempt streamed (text deltas, tool
    input deltas, tool calls) is void: the consumer must discard it, and the retried attempt
    streams the turn from its start (``restarted`` is true when the failed
    attempt had streamed something).
    """

    attempt: int
    delay: float
    error: str
    kind: str = "error"
    restarted: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class TurnEnd:
    """The turn is over: why, and how many tokens it used. Always the last event."""

    stop_reason: StopReason | str
    usage: Usage = Usage()


ModelEvent = TextDelta | ToolInputDelta | ToolCall | RetryNotice | TurnEnd
"""What :meth:`Model.stream` yields."""


@runtime_checkable
class Model(Protocol):
    """A language model the agent loop can drive.

    Implementations stream one turn per :meth:`stream` call, as an async
    context manager so the resources of the request (an HTTP response) are
    released when the block exits, also on cancellation::

        async with model.stream(messages, tools=specs, system=system) as events:
            async for event in events:
                ...
    """

    @property
    def name(self) -> str:
        """The model's name, as shown in events (``"scripted"``, ``"claude-..."``)."""
        ...

    def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        options: ModelOptions | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]:
        """Stream one turn of the model's reply to ``messages``.

        Yields :data:`ModelEvent` values ending with one :class:`TurnEnd`.
        ``options`` overrides the model's sampling options for this turn
        (the agent passes it only when set, so a model may omit the
        parameter if it takes none).

        Raises:
            ModelError: the request failed for good (after the model's own retries).
        """
        ...
