"""The event model: :class:`EventType` and the immutable :class:`FlowEvent`.

Every step of an agent run becomes a :class:`FlowEvent`: a type (one of the
built-in :class:`EventType` values or any custom dotted string), a JSON-compatible
``data`` mapping, a wall-clock ``timestamp``, the ``seq`` number the event bus
assigns (monotonic per bus, no gaps, starting at 1; ``0`` means "not yet
emitted") and the ``run_id`` of the run it belongs to.

Events encode to a dict, to JSON and to a Server-Sent Events frame, and decode
back with :meth:`FlowEvent.from_dict`.

An event's ``data`` is read-only, all the way down: every subscriber and
listener gets the same event object, so none may change what the others see.
Building an event copies its ``data`` into read-only ``dict`` and ``list``
subclasses (see :attr:`FlowEvent.data`); trying to change them raises
:exc:`TypeError`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, NotRequired, Self, TypedDict, cast

from trioflow import _json
from trioflow._frozen import EMPTY, freeze_data, thaw
from trioflow.protocol import ErrorInfo, error_info
from trioflow.sse import event_frame

__all__ = [
    "EVENT_SCHEMAS",
    "LEGACY_TYPE_NAMES",
    "TERMINAL_TYPES",
    "AddMessageData",
    "ErrorInfo",
    "EventType",
    "FlowCancelledData",
    "FlowCompletedData",
    "FlowEvent",
    "FlowFailedData",
    "FlowPausedData",
    "FlowStartedData",
    "IterationCompletedData",
    "IterationFailedData",
    "IterationStartedData",
    "ModelRetryData",
    "OutputText",
    "StepCompletedData",
    "StepStartedData",
    "TokenData",
    "ToolApprovalRequiredData",
    "ToolApprovedData",
    "ToolCompletedData",
    "ToolDeniedData",
    "ToolFailedData",
    "ToolInputDeltaData",
    "ToolProgressData",
    "ToolStartedData",
    "check_event_types",
    "known_event_types",
    "register_event_type",
    "validate_event_type",
]


class EventType(enum.StrEnum):
    """The built-in event types, with the string values of the PHP original.

    Being a :class:`~enum.StrEnum`, a member compares equal to its string value
    (``EventType.TOKEN_RECEIVED == "token.received"``), so code may use either.
    """

    FLOW_STARTED = "flow.started"
    """A run began. Data: ``task``, ``model``, ``max_iterations``."""
    FLOW_COMPLETED = "flow.completed"
    """Terminal: the run finished. Data: ``output``, ``iterations``, ``usage``."""
    FLOW_FAILED = "flow.failed"
    """Terminal: the run failed. Data: ``error`` (``type`` and ``message``)."""
    FLOW_CANCELLED = "flow.cancelled"
    """Terminal: the run was cancelled or timed out. Data: ``reason``."""
    FLOW_PAUSED = "flow.paused"
    """The run holds at a checkpoint until resumed."""
    FLOW_RESUMED = "flow.resumed"
    """A paused run goes on."""
    TOKEN_RECEIVED = "token.received"
    """One text delta from the model, as it arrived. Data: ``token``."""
    TOKEN_CHUNK = "token.chunk"
    """Several tokens coalesced into one chunk. Data: ``chunk``, ``tokens``."""
    ITERATION_STARTED = "iteration.started"
    """An iteration (one model turn plus its tool calls) began. Data: ``iteration``."""
    ITERATION_COMPLETED = "iteration.completed"
    """An iteration ended. Data: ``iteration``, ``usage``, ``stop_reason``."""
    ITERATION_FAILED = "iteration.failed"
    """An iteration failed. Data: ``iteration``, ``error``."""
    TOOL_INPUT_DELTA = "tool.input_delta"
    """A piece of a tool call's input JSON, as the model streamed it (during
    the ``model`` step, before the call's ``tool.started``). Data: ``tool``,
    ``call_id``, ``iteration``, ``delta``, and ``first`` (true, with an empty
    ``delta``) on a call's first one. A call's deltas concatenate to its
    input's JSON text; only a model that streams tool input emits them."""
    TOOL_STARTED = "tool.started"
    """A tool call began. Data: ``tool``, ``input``, ``call_id``, and
    ``streamed`` (true) when ``tool.input_delta`` events streamed its input."""
    TOOL_COMPLETED = "tool.completed"
    """A tool call returned. Data: ``tool``, ``result``, ``call_id``, ``duration``."""
    TOOL_FAILED = "tool.failed"
    """A tool call raised or timed out. Data: ``tool``, ``error``, ``call_id``."""
    TOOL_APPROVAL_REQUIRED = "tool.approval_required"
    """A tool call waits for a person's decision (:mod:`trioflow.approvals`).
    Data: ``tool``, ``call_id``, ``iteration``, ``input``, ``timeout``, and
    ``streamed`` (true) when ``tool.input_delta`` events streamed its input."""
    TOOL_APPROVED = "tool.approved"
    """A waiting tool call was approved (or edited). Data: ``tool``, ``call_id``,
    ``iteration``, ``input`` (what it runs with), ``edited``."""
    TOOL_DENIED = "tool.denied"
    """A waiting tool call was denied, or nobody decided in time. Data: ``tool``,
    ``call_id``, ``iteration``, ``reason``, ``timed_out``, and ``streamed``
    (true) when ``tool.input_delta`` events streamed its input."""
    TOOL_PROGRESS = "tool.progress"
    """A tool reported how far along it is (:meth:`trioflow.ToolContext.progress`).
    Data: ``tool``, ``call_id``, ``iteration``, ``done``, ``total``, ``message``."""
    PROGRESS_UPDATE = "progress.update"
    """Progress figures (see :class:`trioflow.FlowProgress`). Data: ``percent`` and more."""
    STEP_STARTED = "step.started"
    """A named step began. Data: ``step``."""
    STEP_COMPLETED = "step.completed"
    """A named step ended. Data: ``step``, ``duration``."""
    ADD_MESSAGE = "add_message"
    """A message was added to the conversation. Data: ``role``, ``content``."""
    REMOVE_MESSAGE = "remove_message"
    """A message was removed from the conversation. Data: ``index``."""
    VERTEX_STARTED = "vertex.started"
    """A vertex (node) of a flow graph began. Data: ``vertex``."""
    END_VERTEX = "end_vertex"
    """A vertex of a flow graph ended. Data: ``vertex``."""
    VERTICES_SORTED = "vertices_sorted"
    """A flow graph's vertices were put in execution order. Data: ``vertices``."""
    BUILD_START = "build_start"
    """A flow graph build began."""
    BUILD_END = "build_end"
    """A flow graph build ended."""
    ERROR = "error"
    """Something went wrong. Data: ``message`` and optional details."""
    WARNING = "warning"
    """Something noteworthy but recoverable (a retry, a restarted listener). Data: ``message``."""
    INFO = "info"
    """Informational message. Data: ``message``."""


# -- payload schemas ------------------------------------------------------------
# The ``data`` of the events the agent and the executor emit, one schema per
# type, so that readers can type what they read:
# ``data = cast(ToolCompletedData, event.data)``. The key order is the wire order.


class FlowStartedData(TypedDict):
    """``flow.started``: ``metadata`` is the run's (:attr:`trioflow.Run.metadata`), when it has any."""

    task: str
    model: str
    agent: str
    max_iterations: int
    timeout: float | None
    tools: list[str]
    metadata: NotRequired[dict[str, Any]]


class FlowCompletedData(TypedDict):
    """``flow.completed``: ``structured`` is the answer as JSON, for an agent with an ``output_schema``."""

    output: str
    iterations: int
    usage: dict[str, int]
    stop_reason: str
    duration: float
    percent: float
    structured: NotRequired[Any]


class FlowFailedData(TypedDict):
    """``flow.failed``; ``reason`` is ``"max_iterations"`` when the budget ran out."""

    error: ErrorInfo
    duration: float
    iterations: int
    percent: float
    reason: NotRequired[str]


class FlowCancelledData(TypedDict):
    """``flow.cancelled``; ``reason`` is a :class:`trioflow.handle.CancelReason` value or the caller's."""

    reason: str
    duration: float
    iterations: int
    percent: float


class FlowPausedData(TypedDict):
    """``flow.paused`` and ``flow.resumed``."""

    message: str


class TokenData(TypedDict):
    """``token.received``: one text delta of iteration ``iteration``."""

    token: str
    iteration: int


class IterationStartedData(TypedDict):
    """``iteration.started``."""

    iteration: int
    max_iterations: int


class IterationCompletedData(TypedDict):
    """``iteration.completed``."""

    iteration: int
    usage: dict[str, int]
    stop_reason: str
    tool_calls: int


class IterationFailedData(TypedDict):
    """``iteration.failed``."""

    iteration: int
    error: ErrorInfo


class StepStartedData(TypedDict):
    """``step.started``: ``model`` (with the model's name) or ``tools`` (with the number of calls)."""

    step: str
    iteration: int
    model: NotRequired[str]
    calls: NotRequired[int]


class StepCompletedData(TypedDict):
    """``step.completed``; a ``model`` step carries the turn's ``usage``."""

    step: str
    iteration: int
    duration: float
    usage: NotRequired[dict[str, int]]


class AddMessageData(TypedDict):
    """``add_message``: the user's task, an assistant turn, or tool results."""

    role: str
    content: NotRequired[str]
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_results: NotRequired[list[dict[str, Any]]]
    index: int


class ToolInputDeltaData(TypedDict):
    """``tool.input_delta``: the next piece of call ``call_id``'s input JSON.

    ``first`` (only present, and true, on a call's first delta, whose
    ``delta`` is ``""``) says the call's id and tool are now known.
    """

    tool: str
    call_id: str
    iteration: int
    delta: str
    first: NotRequired[bool]


class ToolStartedData(TypedDict):
    """``tool.started``; ``streamed`` (true) when ``tool.input_delta`` events streamed the input."""

    tool: str
    call_id: str
    iteration: int
    input: dict[str, Any]
    streamed: NotRequired[bool]


class ToolCompletedData(TypedDict):
    """``tool.completed``."""

    tool: str
    call_id: str
    iteration: int
    result: Any
    duration: float


class ToolFailedData(TypedDict):
    """``tool.failed``."""

    tool: str
    call_id: str
    iteration: int
    error: ErrorInfo
    duration: float


class ToolApprovalRequiredData(TypedDict):
    """``tool.approval_required``."""

    tool: str
    call_id: str
    iteration: int
    input: dict[str, Any]
    timeout: float | None
    streamed: NotRequired[bool]


class ToolApprovedData(TypedDict):
    """``tool.approved``: ``input`` is what the call runs with (``edited``: not the model's)."""

    tool: str
    call_id: str
    iteration: int
    input: dict[str, Any]
    edited: bool


class ToolDeniedData(TypedDict):
    """``tool.denied``: ``timed_out`` when nobody decided in time."""

    tool: str
    call_id: str
    iteration: int
    reason: str | None
    timed_out: bool
    streamed: NotRequired[bool]


class ToolProgressData(TypedDict):
    """``tool.progress``: ``done`` of ``total`` (``None``: unknown) units of the call's work."""

    tool: str
    call_id: str
    iteration: int
    done: float
    total: float | None
    message: str | None


class ModelRetryData(TypedDict):
    """The ``warning`` of a model retry: ``discarded_tokens`` tokens before it are void.

    ``discarded_tool_calls`` (present when there are some) lists the calls
    (``{"call_id", "tool"}``) whose ``tool.input_delta`` events before it
    are void: the retried attempt streams its calls again (under new ids
    or the same).
    """

    message: str
    attempt: int
    delay: float
    kind: str
    restarted: bool
    discarded_tokens: int
    iteration: int
    discarded_tool_calls: NotRequired[list[dict[str, str]]]


EVENT_SCHEMAS: Mapping[str, type] = MappingProxyType(
    {
        "flow.started": FlowStartedData,
        "flow.completed": FlowCompletedData,
        "flow.failed": FlowFailedData,
        "flow.cancelled": FlowCancelledData,
        "flow.paused": FlowPausedData,
        "flow.resumed": FlowPausedData,
        "token.received": TokenData,
        "iteration.started": IterationStartedData,
        "iteration.completed": IterationCompletedData,
        "iteration.failed": IterationFailedData,
        "step.started": StepStartedData,
        "step.completed": StepCompletedData,
        "add_message": AddMessageData,
        "tool.input_delta": ToolInputDeltaData,
        "tool.started": ToolStartedData,
        "tool.completed": ToolCompletedData,
        "tool.failed": ToolFailedData,
        "tool.progress": ToolProgressData,
        "tool.approval_required": ToolApprovalRequiredData,
        "tool.approved": ToolApprovedData,
        "tool.denied": ToolDeniedData,
    }
)
"""The schema (a :class:`~typing.TypedDict`) of the ``data`` of each event type the agent and the
executor emit. ``warning`` has several shapes; a model retry's is :class:`ModelRetryData`."""


TERMINAL_TYPES: frozenset[str] = frozenset(
    {EventType.FLOW_COMPLETED, EventType.FLOW_FAILED, EventType.FLOW_CANCELLED}
)
"""The types that end a run: exactly one of them closes every run."""

_TOKEN_TYPES = frozenset({EventType.TOKEN_RECEIVED, EventType.TOKEN_CHUNK})
_TOOL_TYPES = frozenset(
    {
        EventType.TOOL_INPUT_DELTA,
        EventType.TOOL_STARTED,
        EventType.TOOL_COMPLETED,
        EventType.TOOL_FAILED,
        EventType.TOOL_PROGRESS,
        EventType.TOOL_APPROVAL_REQUIRED,
        EventType.TOOL_APPROVED,
        EventType.TOOL_DENIED,
    }
)
_ERROR_TYPES = frozenset(
    {
        EventType.ERROR,
        EventType.FLOW_FAILED,
        EventType.ITERATION_FAILED,
        EventType.TOOL_FAILED,
    }
)

_TYPE_RE = re.compile(r"[^\s\x00-\x1f\x7f]{1,200}")


@functools.lru_cache(maxsize=4096)
def validate_event_type(type: str) -> str:
    """Check that ``type`` can name an event, and return it as a plain ``str``.

    An event type is 1 to 200 characters with no white space and no control
    characters (so it is safe as an SSE ``event:`` field). Built-in types are
    :class:`EventType` members; custom ones are usually dotted
    (``"trade.executed"``).

    Raises:
        TypeError: ``type`` is not a string.
        ValueError: ``type`` is empty, too long or contains white space or
            control characters.
    """
    if not isinstance(type, str):
        raise TypeError(f"event type must be a str, not {type.__class__.__name__}")
    if _TYPE_RE.fullmatch(type) is None:
        raise ValueError(
            f"invalid event type {type!r}: use 1-200 characters with no white space "
            "or control characters (for example 'trade.executed')"
        )
    return str(type)


LEGACY_TYPE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        # The PHP StreamingFlowExecutor's output names (executeWithStreaming).
        "flow_started": str(EventType.FLOW_STARTED),
        "token": str(EventType.TOKEN_RECEIVED),
        "iteration_start": str(EventType.ITERATION_STARTED),
        "iteration_end": str(EventType.ITERATION_COMPLETED),
        "tool_start": str(EventType.TOOL_STARTED),
        "tool_end": str(EventType.TOOL_COMPLETED),
        "progress": str(EventType.PROGRESS_UPDATE),
        "end": str(EventType.FLOW_COMPLETED),
        "result": str(EventType.FLOW_COMPLETED),
        # Langflow's EventManager names that differ from trioflow's.
        "log": str(EventType.INFO),
        "message": str(EventType.ADD_MESSAGE),
    }
)
"""Old short names of the PHP original's executor and of Langflow, by the type that replaced them.

They are not event types: a filter that names one is rejected, and the
error says which type to use instead (``"tool_end"``: use ``"tool.completed"``).
"""

_BUILTIN_TYPES: frozenset[str] = frozenset(str(t) for t in EventType)
_custom_types: set[str] = set()


def register_event_type(*types: str) -> None:
    """Declare custom event types, so that filters accept them (for this process).

    Filters (``types=`` of :meth:`trioflow.EventBus.subscribe`,
    :func:`trioflow.patterns.event_predicate`, ...) accept only known types, so
    that a misspelt or outdated name fails loudly instead of matching
    nothing. Known are the :class:`EventType` values, the types registered
    here, the upper-case string constants of every :class:`FlowEvent`
    subclass (registered when the class is defined), and, on a bus, the
    types given to :meth:`trioflow.EventBus.register_event`. Emitting needs
    no registration.

    Raises:
        TypeError: a type is not a string.
        ValueError: a type is not a valid event type, or is an old short name
            (:data:`LEGACY_TYPE_NAMES`).
    """
    checked = [validate_event_type(t) for t in types]
    for t in checked:
        if t in LEGACY_TYPE_NAMES and t not in _BUILTIN_TYPES:
            raise ValueError(
                f"{t!r} is the old name of {LEGACY_TYPE_NAMES[t]!r}: use that type instead"
            )
    _custom_types.update(checked)


def known_event_types(extra: Iterable[str] = ()) -> frozenset[str]:
    """The types filters accept: built-in, registered (:func:`register_event_type`) and ``extra``."""
    return _BUILTIN_TYPES | _custom_types | frozenset(extra)


def check_event_types(types: Iterable[str], *, extra: Collection[str] = ()) -> frozenset[str]:
    """Check the type names of a filter and return them as a set.

    Each name must be a valid event type (:func:`validate_event_type`) and
    a known one: an :class:`EventType` value, a registered custom type
    (:func:`register_event_type`, :class:`FlowEvent` subclass constants) or
    one of ``extra`` (the caller's own, such as a bus's named events).

    Raises:
        TypeError: a name is not a string.
        ValueError: a name is invalid or unknown; the message lists the
            valid names and, for an old PHP or Langflow short name
            (:data:`LEGACY_TYPE_NAMES`), the type that replaced it.
    """
    checked = frozenset(validate_event_type(t) for t in types)
    unknown = checked - _BUILTIN_TYPES
    if unknown:
        unknown = unknown - _custom_types - frozenset(extra)
    if unknown:
        raise ValueError(_unknown_types_message(sorted(unknown), extra))
    return checked


def _unknown_types_message(unknown: list[str], extra: Collection[str]) -> str:
    hints = [
        f"{name!r} is the old name of {LEGACY_TYPE_NAMES[name]!r}"
        for name in unknown
        if name in LEGACY_TYPE_NAMES
    ]
    names = ", ".join(repr(n) for n in unknown)
    text = f"unknown event type{'s' if len(unknown) > 1 else ''} {names}"
    if hints:
        text += f" ({'; '.join(hints)})"
    valid = ", ".join(sorted(known_event_types(extra)))
    return (
        f"{text}; valid types: {valid}. Declare a custom type with "
        "trioflow.register_event_type() or EventBus.register_event()"
    )


def _json_default(value: object) -> object:
    """Encode what :mod:`json` does not know: mappings, sets, dataclasses, the rest as text."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, BaseException):
        return error_info(value)
    return str(value)


_encoder = json.JSONEncoder(separators=(",", ":"), default=_json_default, allow_nan=False)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


@dataclasses.dataclass(frozen=True, slots=True, eq=True)
class FlowEvent:
    """One immutable event of a run.

    Build events with the class-method factories (:meth:`token`,
    :meth:`tool_started`, ...) or let the bus build them
    (:meth:`trioflow.EventBus.emit`). ``seq`` is ``0`` until a bus emits the
    event and stamps it with its sequence number.

    Subclass to give a domain its own constants and factories; the bus keeps
    the subclass when it stamps ``seq``::

        class TradeEvent(FlowEvent):
            TRADE_EXECUTED: ClassVar[str] = "trade.executed"

            @classmethod
            def trade_executed(cls, symbol: str, qty: int) -> Self:
                return cls.create(cls.TRADE_EXECUTED, {"symbol": symbol, "qty": qty})

    ``data`` must be JSON-compatible. It is shared by every consumer, so it
    is read-only: see :attr:`data`. Events pickle and copy (:mod:`copy`),
    and compare equal when their fields are equal.
    """

    type: str
    """The event type: an :class:`EventType` value or a custom string."""
    data: Mapping[str, Any] = dataclasses.field(default_factory=lambda: EMPTY)
    """The payload, a JSON-compatible mapping, read-only all the way down.

    The event holds a deep copy of the mapping it was built with: mappings
    in it are read-only :class:`dict` subclasses, lists read-only
    :class:`list` subclasses, sets :class:`frozenset`; strings, numbers and
    other objects are kept as they are. Reading, ``==`` with plain dicts
    and lists, ``isinstance(..., dict)`` and :mod:`json` work as usual;
    ``data["k"] = v``, ``data.update(...)``, ``data["items"].append(...)``
    and every other change raise :exc:`TypeError`. Copy to change:
    ``dict(event.data)``, or :meth:`to_dict` for a mutable deep copy.

    The copy costs one dict copy and one pass over the top-level values for
    a flat payload (the common case: a token, a counter), and a walk of the
    nested containers otherwise.
    """
    timestamp: float = dataclasses.field(default_factory=time.time)
    """Wall-clock time of creation, in seconds since the epoch."""
    seq: int = 0
    """Sequence number assigned by the bus (1, 2, ...); 0 before emission."""
    run_id: str | None = None
    """The run this event belongs to, if any."""

    # Constants of the built-in types, so subclasses and callers can write
    # ``FlowEvent.TOKEN_RECEIVED`` as in the PHP original.
    FLOW_STARTED: ClassVar[str] = EventType.FLOW_STARTED
    FLOW_COMPLETED: ClassVar[str] = EventType.FLOW_COMPLETED
    FLOW_FAILED: ClassVar[str] = EventType.FLOW_FAILED
    FLOW_CANCELLED: ClassVar[str] = EventType.FLOW_CANCELLED
    TOKEN_RECEIVED: ClassVar[str] = EventType.TOKEN_RECEIVED
    TOOL_STARTED: ClassVar[str] = EventType.TOOL_STARTED
    TOOL_COMPLETED: ClassVar[str] = EventType.TOOL_COMPLETED
    TOOL_FAILED: ClassVar[str] = EventType.TOOL_FAILED
    ERROR: ClassVar[str] = EventType.ERROR

    def __post_init__(self) -> None:
        validate_event_type(self.type)
        if not isinstance(self.data, Mapping):
            raise TypeError(f"event data must be a mapping, not {type(self.data).__name__}")
        object.__setattr__(self, "data", freeze_data(self.data))
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 0:
            raise ValueError(f"event seq must be a non-negative int, not {self.seq!r}")

    def __hash__(self) -> int:
        return hash((self.type, self.seq, self.run_id, self.timestamp))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register the subclass's upper-case string constants as event types."""
        super(FlowEvent, cls).__init_subclass__(**kwargs)  # the slots class is a new one
        for name, value in vars(cls).items():
            if (
                name.isupper()
                and isinstance(value, str)
                and value not in _BUILTIN_TYPES
                and _TYPE_RE.fullmatch(value)
                and value not in LEGACY_TYPE_NAMES
            ):
                _custom_types.add(value)

    # -- construction -------------------------------------------------------

    @classmethod
    def create(
        cls,
        type: str,
        data: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> Self:
        """Build an unsequenced event of ``type`` with a read-only copy of ``data``, stamped now.

        Raises:
            TypeError: ``data`` is not a mapping or ``type`` not a string.
            ValueError: ``type`` is not a valid event type.
        """
        return cls(type, data if data else EMPTY, time.time(), 0, run_id)

    @classmethod
    def flow_started(cls, task: str = "", *, run_id: str | None = None, **data: Any) -> Self:
        """``flow.started`` for ``task``."""
        return cls.create(EventType.FLOW_STARTED, {"task": task, **data}, run_id=run_id)

    @classmethod
    def flow_completed(cls, output: Any = None, *, run_id: str | None = None, **data: Any) -> Self:
        """``flow.completed`` with the run's ``output``."""
        return cls.create(EventType.FLOW_COMPLETED, {"output": output, **data}, run_id=run_id)

    @classmethod
    def flow_failed(
        cls, error: BaseException | str, *, run_id: str | None = None, **data: Any
    ) -> Self:
        """``flow.failed`` with ``error`` as ``{"type", "message"}`` (no traceback)."""
        return cls.create(
            EventType.FLOW_FAILED, {"error": error_info(error), **data}, run_id=run_id
        )

    @classmethod
    def flow_cancelled(
        cls, reason: str = "cancelled", *, run_id: str | None = None, **data: Any
    ) -> Self:
        """``flow.cancelled`` with a ``reason`` (``"cancelled"``, ``"timeout"``, ...)."""
        return cls.create(EventType.FLOW_CANCELLED, {"reason": reason, **data}, run_id=run_id)

    @classmethod
    def token(cls, text: str, *, run_id: str | None = None, **data: Any) -> Self:
        """``token.received`` carrying one text delta as ``token``."""
        return cls.create(EventType.TOKEN_RECEIVED, {"token": text, **data}, run_id=run_id)

    @classmethod
    def token_chunk(cls, chunk: str, tokens: int, *, run_id: str | None = None) -> Self:
        """``token.chunk``: ``tokens`` deltas coalesced into ``chunk``."""
        return cls.create(EventType.TOKEN_CHUNK, {"chunk": chunk, "tokens": tokens}, run_id=run_id)

    @classmethod
    def iteration_started(cls, n: int, *, run_id: str | None = None, **data: Any) -> Self:
        """``iteration.started`` for iteration ``n`` (1-based)."""
        return cls.create(EventType.ITERATION_STARTED, {"iteration": n, **data}, run_id=run_id)

    @classmethod
    def iteration_completed(cls, n: int, *, run_id: str | None = None, **data: Any) -> Self:
        """``iteration.completed`` for iteration ``n``."""
        return cls.create(EventType.ITERATION_COMPLETED, {"iteration": n, **data}, run_id=run_id)

    @classmethod
    def tool_started(
        cls, tool: str, input: Mapping[str, Any], *, run_id: str | None = None, **data: Any
    ) -> Self:
        """``tool.started`` for a call of ``tool`` with ``input``."""
        return cls.create(
            EventType.TOOL_STARTED, {"tool": tool, "input": dict(input), **data}, run_id=run_id
        )

    @classmethod
    def tool_completed(
        cls, tool: str, result: Any, *, run_id: str | None = None, **data: Any
    ) -> Self:
        """``tool.completed`` with the tool's ``result``."""
        return cls.create(
            EventType.TOOL_COMPLETED, {"tool": tool, "result": result, **data}, run_id=run_id
        )

    @classmethod
    def tool_failed(
        cls, tool: str, error: BaseException | str, *, run_id: str | None = None, **data: Any
    ) -> Self:
        """``tool.failed`` with ``error`` as ``{"type", "message"}``."""
        return cls.create(
            EventType.TOOL_FAILED,
            {"tool": tool, "error": error_info(error), **data},
            run_id=run_id,
        )

    @classmethod
    def progress(cls, percent: float, *, run_id: str | None = None, **data: Any) -> Self:
        """``progress.update`` at ``percent`` (0-100) with further figures in ``data``."""
        return cls.create(
            EventType.PROGRESS_UPDATE, {"percent": _finite(percent), **data}, run_id=run_id
        )

    @classmethod
    def step_started(cls, step: str, *, run_id: str | None = None, **data: Any) -> Self:
        """``step.started`` for the named ``step``."""
        return cls.create(EventType.STEP_STARTED, {"step": step, **data}, run_id=run_id)

    @classmethod
    def step_completed(cls, step: str, *, run_id: str | None = None, **data: Any) -> Self:
        """``step.completed`` for the named ``step``."""
        return cls.create(EventType.STEP_COMPLETED, {"step": step, **data}, run_id=run_id)

    @classmethod
    def error(cls, message: str, *, run_id: str | None = None, **data: Any) -> Self:
        """``error`` with a human-readable ``message``."""
        return cls.create(EventType.ERROR, {"message": message, **data}, run_id=run_id)

    @classmethod
    def warning(cls, message: str, *, run_id: str | None = None, **data: Any) -> Self:
        """``warning`` with a human-readable ``message``."""
        return cls.create(EventType.WARNING, {"message": message, **data}, run_id=run_id)

    @classmethod
    def info(cls, message: str, *, run_id: str | None = None, **data: Any) -> Self:
        """``info`` with a human-readable ``message``."""
        return cls.create(EventType.INFO, {"message": message, **data}, run_id=run_id)

    # -- predicates ---------------------------------------------------------
    # Plain methods, so ``FlowEvent.is_token`` also serves as a ``types=`` filter.

    def is_token(self) -> bool:
        """True for ``token.received`` and ``token.chunk``."""
        return self.type in _TOKEN_TYPES

    def is_flow_event(self) -> bool:
        """True for the ``flow.*`` lifecycle types."""
        return self.type.startswith("flow.")

    def is_error(self) -> bool:
        """True for ``error`` and every built-in ``*.failed`` type."""
        return self.type in _ERROR_TYPES or self.type.endswith(".failed")

    def is_progress(self) -> bool:
        """True for ``progress.update``."""
        return self.type == EventType.PROGRESS_UPDATE

    def is_tool_event(self) -> bool:
        """True for the ``tool.*`` types (started, progress, completed, failed, and the approvals')."""
        return self.type in _TOOL_TYPES

    def is_terminal(self) -> bool:
        """True for the types that end a run (:data:`TERMINAL_TYPES`)."""
        return self.type in TERMINAL_TYPES

    # -- encoding -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The wire shape: ``{"id", "run_id", "type", "data", "timestamp"}``.

        ``id`` is :attr:`seq`. The result is the caller's to change: its
        ``data`` is a mutable deep copy (plain dicts and lists).
        """
        wire = self._wire()
        wire["data"] = thaw(self.data)
        return wire

    def _wire(self) -> dict[str, Any]:
        """:meth:`to_dict` sharing the read-only ``data``: for encoding, with no copy."""
        return {
            "id": self.seq,
            "run_id": self.run_id,
            "type": str(self.type),
            "data": self.data,
            "timestamp": self.timestamp,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON (ASCII only, so any payload is safe on any wire).

        Values :mod:`json` cannot encode are converted: mappings to objects,
        sets and tuples to arrays, dataclasses to objects, exceptions to
        ``{"type", "message"}``, anything else to its ``str``; NaN and
        infinities raise :class:`ValueError`.
        """
        return _encoder.encode(self._wire())

    def to_sse(self) -> str:
        """A complete Server-Sent Events frame: ``id:``, ``event:``, ``data:`` and a blank line.

        The ``data:`` line is :meth:`to_json`, which escapes every line break
        and control character, so a payload can never split or end the frame.
        """
        return event_frame(self.seq, self.type, self.to_json())

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Self:
        """Decode the shape :meth:`to_dict` produces.

        ``type`` is required; ``data`` defaults to ``{}``, ``id`` to ``0``,
        ``timestamp`` to now and ``run_id`` to ``None``.

        Raises:
            ValueError: ``obj`` is not a mapping, or a field is missing or of
                the wrong type; the message names the field.
        """
        if not isinstance(obj, Mapping):
            raise ValueError(f"event must be a JSON object, not {type(obj).__name__}")
        if "type" not in obj:
            raise ValueError("event field 'type' is missing")
        etype = obj["type"]
        try:
            validate_event_type(etype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"event field 'type': {exc}") from None
        data = obj.get("data", {})
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"event field 'data' must be an object, not {type(data).__name__}")
        seq = obj.get("id", 0)
        if seq is None:
            seq = 0
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"event field 'id' must be a non-negative integer, not {seq!r}")
        timestamp = obj.get("timestamp")
        if timestamp is None:
            timestamp = time.time()
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
            raise ValueError(f"event field 'timestamp' must be a number, not {timestamp!r}")
        run_id = obj.get("run_id")
        if run_id is not None and not isinstance(run_id, str):
            raise ValueError(f"event field 'run_id' must be a string or null, not {run_id!r}")
        return cls(etype, data, float(timestamp), seq, run_id)

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Decode :meth:`to_json` output.

        Decoded with ``trioflow._json.loads``: nesting deeper than 64 levels,
        ``NaN``/``Infinity`` and lone surrogates are refused (never a
        :exc:`RecursionError`).

        Raises:
            ValueError: the text is not such JSON, or a field is invalid (as
                :meth:`from_dict`).
        """
        try:
            obj = _json.loads(text)
        except _json.InvalidJSON as exc:
            raise ValueError(f"event is not valid JSON: {exc}") from None
        return cls.from_dict(obj)


class OutputText:
    """A run's answer as its events tell it: its tokens, less those a model retry voided.

    The text is that of the run's ``token.received`` events. A ``warning`` event with ``discarded_tokens: n`` says that the last ``n``
    tokens belonged to an attempt of the model turn that was cut and
    retried: they are dropped, so a turn counts once, with the text of its
    last attempt. Feed it every event of a run, in order, with
    :meth:`observe` (or the type and data before the event exists, as the
    executor does); read :attr:`text`.
    """

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[str] = []

    def observe(self, type: str, data: Mapping[str, Any]) -> None:
        """Take one event's type and data into account."""
        if type == EventType.TOKEN_RECEIVED:
            token = data.get("token")
            if isinstance(token, str):
                self._parts.append(token)
        elif type == EventType.WARNING:
            discarded = data.get("discarded_tokens")
            if isinstance(discarded, int) and not isinstance(discarded, bool) and discarded > 0:
                del self._parts[-discarded:]

    @property
    def text(self) -> str:
        """The text so far."""
        return "".join(self._parts)

    def __str__(self) -> str:
        return self.text


# Fast construction for the bus's hot path: set the slots directly, skipping the
# dataclass __init__ (which goes through object.__setattr__ five times) and
# re-validation of a type that was validated already.
_new = object.__new__
_slot = cast("dict[str, Any]", vars(FlowEvent))
_set_type: Callable[[FlowEvent, str], None] = _slot["type"].__set__
_set_data: Callable[[FlowEvent, Mapping[str, Any]], None] = _slot["data"].__set__
_set_timestamp: Callable[[FlowEvent, float], None] = _slot["timestamp"].__set__
_set_seq: Callable[[FlowEvent, int], None] = _slot["seq"].__set__
_set_run_id: Callable[[FlowEvent, str | None], None] = _slot["run_id"].__set__


class _Unfrozen:
    """:class:`FlowEvent`'s slots without its frozen ``__setattr__``: a blank to fill in.

    Plain attribute stores into these slots are specialised by the
    interpreter, so filling one in and then assigning ``__class__ =
    FlowEvent`` costs about 40% less than setting FlowEvent's five slots
    through their descriptors. The result is an ordinary, frozen FlowEvent.
    Python allows the ``__class__`` assignment only while both classes have
    the same slot names, so a change to FlowEvent's fields that is not made
    here too fails loudly (:exc:`TypeError`) on the first emit.
    """

    __slots__ = ("data", "run_id", "seq", "timestamp", "type")


def _stamp(
    cls: type[FlowEvent],
    type: str,
    data: Mapping[str, Any],
    timestamp: float,
    seq: int,
    run_id: str | None,
) -> FlowEvent:
    """Build an event without validation; ``type`` must have passed :func:`validate_event_type`.

    ``data`` must be frozen already (:func:`trioflow._frozen.freeze_data`).
    """
    if cls is FlowEvent:
        blank: Any = _Unfrozen()
        blank.type = type
        blank.data = data
        blank.timestamp = timestamp
        blank.seq = seq
        blank.run_id = run_id
        blank.__class__ = FlowEvent
        return cast("FlowEvent", blank)
    # A subclass may add slots or a __dict__: set the fields through the descriptors.
    event: FlowEvent = _new(cls)
    _set_type(event, type)
    _set_data(event, data)
    _set_timestamp(event, timestamp)
    _set_seq(event, seq)
    _set_run_id(event, run_id)
    return event
