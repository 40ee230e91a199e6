"""An offline, deterministic model: :class:`ScriptedModel` and its :class:`Turn` records.

:class:`ScriptedModel` implements :class:`~trioflow.models.Model` without a
network. With no script it behaves like a very small assistant that knows
one trick, arithmetic with the built-in ``calculator`` tool:

1. If the conversation's last message holds tool results, it reports them:
   ``"25 * 4 = 100."`` for a calculator call (``"I could not compute that:
   division by zero."`` for an error), and ends its turn.
2. Else, if the last user text contains an arithmetic expression
   (``"What is 25 * 4?"``, ``"Compute (3 + 4) * 2"``, ``"what's 2^10"``, or
   with words: ``"12 plus 30"``, ``"7 times 6"``, ``"100 divided by 4"``,
   ``"minus"``, ``"multiplied by"``, ``"to the power of"``, ``"mod"``) and a
   tool named ``calculator`` is offered, it says ``"Let me calculate that."``
   and calls ``calculator`` with ``{"operation": "evaluate", "expression": ...}``.
3. Otherwise it replies that it is the offline model, quoting the task.

With a script, each :meth:`~ScriptedModel.stream` call plays the next
:class:`Turn`: its text, tool calls, retry notices, failure and timing, so
tests can drive an agent loop through any path.

Text streams as word-level deltas that keep their leading space (``"Let"``,
``" me"``, ``" calculate"``, ``" that."``). Usage is deterministic: input
tokens are the words of the conversation and system prompt, output tokens
the number of text deltas.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import trio

from trioflow.models._base import (
    Message,
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

__all__ = ["ScriptedModel", "Turn", "TurnFactory", "find_expression", "input_deltas", "tokenize"]


_TOKEN_RE = re.compile(r"\s*\S+|\s+")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into word-level deltas, each word with the white space before it.

    ``"".join(tokenize(text)) == text`` always holds.

    Returns:
        The pieces: ``tokenize("Let me see.")`` is ``["Let", " me", " see."]``.
    """
    return _TOKEN_RE.findall(text)


@dataclasses.dataclass(frozen=True, slots=True)
class Turn:
    """One scripted model turn: what :meth:`ScriptedModel.stream` plays for one call.

    The events come in this order: the :attr:`retries` notices, the text
    deltas, the tool calls, then one :class:`~trioflow.models.TurnEnd`. If
    :attr:`fail` is set, the turn stops after the retries and the first
    :attr:`fail_after` deltas and raises :attr:`fail` instead.

    Raises:
        ValueError: ``fail_after`` or ``delay`` is negative or not finite.
    """

    text: str | Sequence[str] = ""
    """The reply: a string is split into word deltas (:func:`tokenize`); a
    sequence of strings is taken as the exact deltas."""
    tool_calls: Sequence[ToolCall | tuple[str, Mapping[str, Any]]] = ()
    """Tool calls, as :class:`~trioflow.models.ToolCall` or ``(name, input)``
    pairs, which get the ids ``"toolu_scripted_1"``, ``"toolu_scripted_2"``, ..."""
    stop_reason: StopReason | str | None = None
    """The stop reason; ``None`` means ``tool_use`` with tool calls, else ``end_turn``."""
    usage: Usage | None = None
    """The usage to report; ``None`` means counted as the module describes."""
    fail: BaseException | None = None
    """An exception to raise (typically :class:`~trioflow.models.ModelError`)
    instead of finishing the turn."""
    fail_after: int = 0
    """How many text deltas to stream before raising :attr:`fail`."""
    delay: float = 0.0
    """Seconds to sleep on entering the stream, before the first event."""
    retries: Sequence[RetryNotice] = ()
    """:class:`~trioflow.models.RetryNotice` events to emit first."""

    def __post_init__(self) -> None:
        if isinstance(self.fail_after, bool) or not (
            isinstance(self.fail_after, int) and self.fail_after >= 0
        ):
            raise ValueError(f"fail_after must be a non-negative int, not {self.fail_after!r}")
        if not (isinstance(self.delay, (int, float)) and 0 <= self.delay < math.inf):
            raise ValueError(f"delay must be a non-negative number of seconds, not {self.delay!r}")


TurnFactory = Callable[[Sequence[Message], Sequence[ToolSpec]], Turn]
"""A scripted turn computed from the call: ``(messages, tools) -> Turn``."""

_CALCULATOR = "calculator"


class ScriptedModel:
    """A deterministic, offline :class:`~trioflow.models.Model`.

    Args:
        script: the turns to play, one per :meth:`stream` call, each a
            :class:`Turn` or a :data:`TurnFactory`; ``None`` (the default)
            plays :meth:`default_turn` for every call, for ever. An iterable
            is consumed lazily, so a generator works.
        pace: text deltas per second; each delta arrives ``1 / pace``
            seconds (of Trio's clock) after the event before it. ``0`` means
            no delay, though every event still passes a checkpoint, so
            consumers see events live and cancellation is prompt. A paced
            model streams each tool call's input too, before the
            :class:`~trioflow.models.ToolCall`: an empty first
            :class:`~trioflow.models.ToolInputDelta`, then the input's JSON
            in up to 3 pieces (:func:`input_deltas`), each paced like a
            text delta.

    Raises:
        ValueError: ``pace`` is negative or not finite.

    Attributes:
        calls: the messages each :meth:`stream` call saw, in call order
            (recorded on entering the stream, also when it then fails).
    """

    __slots__ = ("_consumed", "_ids", "_interval", "_pace", "_script", "calls")

    def __init__(
        self,
        script: Iterable[Turn | TurnFactory] | None = None,
        *,
        pace: float = 0.0,
    ) -> None:
        if not (isinstance(pace, (int, float)) and 0 <= pace < math.inf):
            raise ValueError(f"pace must be a non-negative number, not {pace!r}")
        self._script: Iterator[Turn | TurnFactory] | None = None if script is None else iter(script)
        self._pace = float(pace)
        self._interval = 1.0 / pace if pace else 0.0
        self._consumed = 0
        self._ids = 0
        self.calls: list[tuple[Message, ...]] = []

    @property
    def name(self) -> str:
        """``"scripted"``."""
        return "scripted"

    @property
    def pace(self) -> float:
        """Text deltas per second; ``0.0`` for as fast as the consumer takes them."""
        return self._pace

    def __repr__(self) -> str:
        kind = "default" if self._script is None else "script"
        return f"ScriptedModel({kind}, pace={self._pace})"

    def stream(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[ToolSpec] = (),
        system: str | None = None,
        options: ModelOptions | None = None,
    ) -> AbstractAsyncContextManager[AsyncIterator[ModelEvent]]:
        """Stream the next turn's events in reply to ``messages`` (``options`` are taken and ignored).

        Use as ``async with model.stream(...) as events: async for event in
        events: ...``. The call is recorded in :attr:`calls`, the turn is
        taken from the script, and the turn's :attr:`~Turn.delay` is slept,
        on entering the ``async with``.

        Returns:
            An async context manager yielding an async iterator of
            :data:`~trioflow.models.ModelEvent`, ending with one
            :class:`~trioflow.models.TurnEnd`.

        Raises:
            ModelError: on entering, when the script is exhausted
                (``kind="script"``); while iterating, a turn's
                :attr:`~Turn.fail` (whatever exception it is).
            trio.ClosedResourceError: iterating after the ``async with`` exited.
            trio.Cancelled: when cancelled the stream stops at once; the
                turn counts as played.
        """
        return _ScriptedStream(self, tuple(messages), tuple(tools), system)

    def default_turn(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Turn:
        """The turn the model plays without a script (see the module documentation).

        Usable as a :data:`TurnFactory` inside a script to mix scripted and
        default turns.

        Returns:
            The :class:`Turn`.
        """
        last = messages[-1] if messages else None
        if last is not None:
            results = [b for b in last.content if isinstance(b, ToolResultBlock)]
            if results:
                return Turn(" ".join(_describe_result(r, messages) for r in results))
        task = _last_user_text(messages)
        if any(t.name == _CALCULATOR for t in tools):
            expression = find_expression(task)
            if expression is not None:
                call = ToolCall(
                    self._next_id(),
                    _CALCULATOR,
                    {"operation": "evaluate", "expression": expression},
                )
                return Turn("Let me calculate that.", tool_calls=(call,))
        return Turn(_plain_reply(task))

    # -- internals used by the stream ------------------------------------------------

    def _next_id(self) -> str:
        self._ids += 1
        return f"toolu_scripted_{self._ids}"

    def _next_turn(self, messages: tuple[Message, ...], tools: tuple[ToolSpec, ...]) -> Turn:
        self.calls.append(messages)
        if self._script is None:
            return self.default_turn(messages, tools)
        entry = next(self._script, None)
        if entry is None:
            raise ModelError(
                f"script exhausted: all {self._consumed} scripted turns were played",
                kind="script",
            )
        self._consumed += 1
        if isinstance(entry, Turn):
            return entry
        turn = entry(messages, tools)
        if not isinstance(turn, Turn):
            raise TypeError(f"a scripted turn factory returned {type(turn).__name__}, not a Turn")
        return turn

    def _plan(
        self, turn: Turn, messages: tuple[Message, ...], system: str | None
    ) -> tuple[list[ModelEvent], BaseException | None]:
        deltas = tokenize(turn.text) if isinstance(turn.text, str) else list(turn.text)
        events: list[ModelEvent] = list(turn.retries)
        if turn.fail is not None:
            events.extend(TextDelta(t) for t in deltas[: turn.fail_after])
            return events, turn.fail
        events.extend(TextDelta(t) for t in deltas)
        calls = [
            c if isinstance(c, ToolCall) else ToolCall(self._next_id(), c[0], dict(c[1]))
            for c in turn.tool_calls
        ]
        for call in calls:
            if self._interval:  # paced: the input streams too, in a few pieces
                events.extend(input_deltas(call))
            events.append(call)
        stop_reason = turn.stop_reason or (StopReason.TOOL_USE if calls else StopReason.END_TURN)
        usage = turn.usage or Usage(_count_words(messages, system), len(deltas))
        events.append(TurnEnd(stop_reason, usage))
        return events, None


def input_deltas(call: ToolCall, pieces: int = 3) -> list[ToolInputDelta]:
    """``call``'s input deltas, as a paced :class:`ScriptedModel` streams them.

    An empty first delta, then the input's JSON text in up to ``pieces`` pieces.
    """
    text = json.dumps(dict(call.input), ensure_ascii=False, default=str)
    size = max(1, -(-len(text) // pieces))
    return [
        ToolInputDelta(call.id, call.name, "", first=True),
        *(
            ToolInputDelta(call.id, call.name, text[i : i + size])
            for i in range(0, len(text), size)
        ),
    ]


_PACED = frozenset({TextDelta, ToolInputDelta})
_NEW, _OPEN, _CLOSED = 0, 1, 2


class _ScriptedStream:
    """One turn's events: an async context manager that is its own async iterator."""

    __slots__ = (
        "_events",
        "_failure",
        "_index",
        "_interval",
        "_messages",
        "_model",
        "_state",
        "_system",
        "_tools",
    )

    def __init__(
        self,
        model: ScriptedModel,
        messages: tuple[Message, ...],
        tools: tuple[ToolSpec, ...],
        system: str | None,
    ) -> None:
        self._model = model
        self._messages = messages
        self._tools = tools
        self._system = system
        self._events: Sequence[ModelEvent] = ()
        self._failure: BaseException | None = None
        self._index = 0
        self._interval = model._interval
        self._state = _NEW

    async def __aenter__(self) -> _ScriptedStream:
        if self._state != _NEW:
            raise RuntimeError("a model stream can be entered only once")
        self._state = _OPEN
        await trio.lowlevel.checkpoint()
        model = self._model
        turn = model._next_turn(self._messages, self._tools)
        self._events, self._failure = model._plan(turn, self._messages, self._system)
        if turn.delay:
            await trio.sleep(turn.delay)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = _CLOSED
        self._events = ()
        self._failure = None
        self._index = 0

    def __aiter__(self) -> _ScriptedStream:
        return self

    async def __anext__(self) -> ModelEvent:
        index = self._index
        events = self._events
        if index < len(events):
            event = events[index]
            if self._interval and type(event) in _PACED:
                await trio.sleep(self._interval)
            else:
                await trio.lowlevel.checkpoint()
            self._index = index + 1
            return event
        if self._state != _OPEN:
            if self._state == _NEW:
                raise RuntimeError("enter the stream with 'async with' before iterating")
            raise trio.ClosedResourceError("the model stream was closed")
        await trio.lowlevel.checkpoint()
        failure = self._failure
        if failure is not None:
            self._failure = None
            raise failure
        raise StopAsyncIteration


# -- the default assistant -------------------------------------------------------

_MAX_QUOTE = 200
_WORD_OPERATORS = {
    "plus": "+",
    "minus": "-",
    "times": "*",
    "multiplied by": "*",
    "divided by": "/",
    "to the power of": "^",
    "mod": "%",
    "modulo": "%",
}
_WORD_OPERATOR_RE = re.compile(
    r"\s*\b("
    + "|".join(w.replace(" ", r"\s+") for w in sorted(_WORD_OPERATORS, key=len, reverse=True))
    + r")\b\s*",
    re.IGNORECASE,
)
_SIGNS = "\u00d7\u00f7\u2212"  # multiplication, division and minus signs
_RUN_RE = re.compile(rf"[0-9.()+\-*/%^{_SIGNS}\s]+")
_BINARY_RE = re.compile(rf"[0-9.][\s)]*(?:\*\*|//|[-+*/%^{_SIGNS}])[\s(+\-{_SIGNS}]*[0-9.(]")
_DATE_RE = re.compile(r"\d{4}-\d{1,2}(?:-\d{1,2})?")
_LEADING_JUNK = f" */%^){_SIGNS[:2]}"
_TRAILING_JUNK = f" +-*/%^(.{_SIGNS}"


def _balance(text: str) -> str:
    """Drop the parentheses of ``text`` that have no partner."""
    chars = list(text)
    opened: list[int] = []
    for i, c in enumerate(chars):
        if c == "(":
            opened.append(i)
        elif c == ")":
            if opened:
                opened.pop()
            else:
                chars[i] = ""
    for i in opened:
        chars[i] = ""
    return "".join(chars)


def find_expression(text: str) -> str | None:
    """The longest arithmetic expression in ``text``, with operator words made symbols.

    A heuristic for the default assistant: ``"What is 25 * 4?"`` gives
    ``"25 * 4"`` and ``"12 plus 30"`` gives ``"12 + 30"``. An expression
    needs at least one binary operator between numbers; ISO dates such as
    ``2024-05-01`` are not taken for subtractions.

    Returns:
        The expression, or ``None`` when there is none.
    """
    text = _WORD_OPERATOR_RE.sub(lambda m: f" {_WORD_OPERATORS[_squash(m.group(1))]} ", text)
    best: str | None = None
    for run in _RUN_RE.findall(text):
        candidate = run.strip()
        while candidate and (
            candidate[0] in _LEADING_JUNK or (candidate[0] == "." and not candidate[1:2].isdigit())
        ):
            candidate = candidate[1:]
        while candidate and candidate[-1] in _TRAILING_JUNK:
            candidate = candidate[:-1]
        candidate = " ".join(_balance(candidate).split())
        if _BINARY_RE.search(candidate) is None or _DATE_RE.fullmatch(candidate):
            continue
        if best is None or len(candidate) > len(best):
            best = candidate
    return best


def _squash(words: str) -> str:
    return " ".join(words.lower().split())


def _last_user_text(messages: Sequence[Message]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            text = message.text.strip()
            if text:
                return text
    return ""


def _plain_reply(task: str) -> str:
    intro = "I am trioflow's offline scripted model."
    hint = "Set ANTHROPIC_API_KEY to talk to Claude."
    if not task:
        return f"{intro} {hint}"
    quoted = " ".join(task.split())
    if len(quoted) > _MAX_QUOTE:
        quoted = quoted[: _MAX_QUOTE - 3] + "..."
    return f'{intro} You asked: "{quoted}". {hint}'


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_OPERATION_SYMBOLS = {
    "add": "+",
    "subtract": "-",
    "multiply": "*",
    "divide": "/",
    "power": "^",
}


def _find_tool_use(tool_use_id: str, messages: Sequence[Message]) -> ToolUseBlock | None:
    for message in reversed(messages):
        for block in message.content:
            if isinstance(block, ToolUseBlock) and block.id == tool_use_id:
                return block
    return None


def _describe_result(result: ToolResultBlock, messages: Sequence[Message]) -> str:
    content = result.content.strip()
    use = _find_tool_use(result.tool_use_id, messages)
    if use is None or use.name != _CALCULATOR:
        name = f"The {use.name} tool" if use is not None else "The tool"
        verb = "failed" if result.is_error else "returned"
        return f"{name} {verb}: {content.rstrip('.')}."
    if result.is_error:
        return f"I could not compute that: {content.rstrip('.')}."
    args = use.input
    operation = args.get("operation")
    if operation == "evaluate" or operation not in _OPERATION_SYMBOLS:
        expression = str(args.get("expression", "")).strip()
    else:
        a, b = _number(args.get("a")), _number(args.get("b"))
        expression = f"{a} {_OPERATION_SYMBOLS[str(operation)]} {b}"
    return f"{expression} = {content}." if expression else f"The answer is {content}."


def _count_words(messages: Sequence[Message], system: str | None) -> int:
    words = len(system.split()) if system else 0
    for message in messages:
        for block in message.content:
            if isinstance(block, TextBlock):
                words += len(block.text.split())
            elif isinstance(block, ToolResultBlock):
                words += len(block.content.split())
    return words
