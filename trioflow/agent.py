"""The agent loop: a model, tools and a task become a stream of events.

Each iteration of an :class:`Agent` asks the model for a turn and streams it live:

* ``iteration.started``;
* ``step.started`` ``model``, one ``token.received`` per text delta *as it
  arrives*, a ``warning`` per model retry, ``step.completed`` ``model``;
* ``add_message`` for the assistant's message;
* when the model asks for tools: ``step.started`` ``tools``, the calls run
  concurrently in a nursery, each with ``tool.started`` then
  ``tool.completed`` or ``tool.failed``; their results go back to the model
  in the model's order (``add_message``), then ``step.completed`` ``tools``;
* ``iteration.completed`` with the turn's token usage, and ``progress.update``
  with the :class:`~trioflow.FlowProgress` figures.

A model retry voids what the failed attempt streamed: its ``warning``
carries ``discarded_tokens``, the number of ``token.received`` events just
before it (of the same iteration, since its ``step.started`` ``model`` or
the previous retry) whose text no longer counts. The turn's text, the
assistant message sent back to the model and the run's ``output`` hold only
the text of the attempt that counted (for a turn that failed for good: its
last attempt).

The loop ends when the model answers without asking for a tool; it raises
:exc:`MaxIterationsExceeded` when it runs out of iterations and
:exc:`~trioflow.models.ModelError` when the model fails for good. The agent
knows nothing of buses or transports: it emits through the ``emit``
coroutine it is given (the executor binds it to the run's bus).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import trio

from trioflow._frozen import FrozenDict
from trioflow.approvals import ApprovalDecision, Approvals, PendingApproval
from trioflow.events import (
    AddMessageData,
    EventType,
    FlowPausedData,
    IterationCompletedData,
    IterationFailedData,
    IterationStartedData,
    ModelRetryData,
    StepCompletedData,
    StepStartedData,
    ToolApprovalRequiredData,
    ToolApprovedData,
    ToolCompletedData,
    ToolDeniedData,
    ToolFailedData,
    ToolInputDeltaData,
    ToolStartedData,
)
from trioflow.models._base import (
    Message,
    Model,
    ModelError,
    ModelOptions,
    RetryNotice,
    TextBlock,
    TextDelta,
    ToolCall,
    ToolInputDelta,
    ToolResultBlock,
    ToolUseBlock,
    TurnEnd,
    Usage,
)
from trioflow.progress import FlowProgress
from trioflow.protocol import error_info
from trioflow.tools import Tool, ToolContext, ToolError, ToolRegistry

__all__ = [
    "Agent",
    "AgentResult",
    "Emit",
    "MaxIterationsExceeded",
    "OutputSchemaError",
    "RunControl",
    "StoppedAfterTurn",
    "TurnResult",
]


class Emit(Protocol):
    """How the agent emits an event: ``await emit(type, data)``.

    An ``emit`` may also have a ``token_nowait(data) -> bool`` attribute, a
    plain function: the agent then offers it each ``token.received``
    payload first, and awaits ``emit`` only when it returns False (it did
    not take the event). True means the event was taken, exactly as
    ``await emit(EventType.TOKEN_RECEIVED, data)`` would have, only without
    a checkpoint or a coroutine: the executor's ``emit`` stages tokens so,
    for a model streaming many small deltas. It may have a ``run_id``
    attribute too (the executor's does): tools see it as
    :attr:`ToolContext.run_id <trioflow.ToolContext.run_id>`.
    """

    def __call__(self, type: str, data: Mapping[str, Any], /) -> Awaitable[object]:
        """Emit one event of ``type`` with ``data``."""
        ...


def _token_nowait(emit: Emit) -> Callable[[Mapping[str, Any]], bool] | None:
    """``emit``'s ``token_nowait`` (see :class:`Emit`), or ``None`` if it has none."""
    token_nowait = getattr(emit, "token_nowait", None)
    return token_nowait if callable(token_nowait) else None


class StoppedAfterTurn(Exception):
    """The run was asked to stop after a turn (:meth:`RunControl.stop_after_turn`) and did.

    Attributes:
        reason: the reason given.
        iterations: how many iterations ran (the last one in full).
        output: the text the model produced so far.
        usage: the tokens used so far.
    """

    def __init__(self, reason: str, iterations: int, output: str, usage: Usage) -> None:
        super().__init__(f"stopped after iteration {iterations}: {reason}")
        self.reason = reason
        self.iterations = iterations
        self.output = output
        self.usage = usage


class OutputSchemaError(ValueError):
    """The model's final answer is not JSON matching the agent's ``output_schema``.

    Attributes:
        output: the answer as the model wrote it.
        path: where in the answer the mismatch is (JSON Pointer style,
            ``""`` for the whole answer or when it is not JSON at all).
    """

    def __init__(self, message: str, *, output: str, path: str = "") -> None:
        super().__init__(message)
        self.output = output
        self.path = path


class MaxIterationsExceeded(Exception):
    """The agent used all its iterations without a final answer.

    Attributes:
        iterations: how many iterations ran.
        output: the text the model produced so far.
        usage: the tokens used so far.
    """

    def __init__(self, iterations: int, output: str, usage: Usage) -> None:
        super().__init__(
            f"stopped after {iterations} iteration{'s' if iterations != 1 else ''} without a "
            "final answer (max_iterations reached)"
        )
        self.iterations = iterations
        self.output = output
        self.usage = usage


@dataclasses.dataclass(frozen=True, slots=True)
class AgentResult:
    """What one agent run produced."""

    output: str
    """The text of the model's final answer."""
    iterations: int
    """Iterations run."""
    usage: Usage
    """Tokens used over all iterations."""
    stop_reason: str
    """The model's stop reason for the last turn (``"end_turn"``, ...)."""
    messages: tuple[Message, ...]
    """The whole conversation."""
    structured: Any = None
    """With an ``output_schema``: the answer parsed as JSON and checked against it."""


class RunControl:
    """Pause, resume, stop after a turn, and tool approvals for a running agent.

    :meth:`pause` asks the run to hold at its next checkpoint (between two
    model deltas, or before a tool call); it then emits ``flow.paused`` and
    waits until :meth:`resume`, which emits ``flow.resumed``. Time limits and
    cancellation still apply while paused.
    """

    __slots__ = ("_emit", "_holding", "_paused", "_resume", "_stop_after_turn", "approvals")

    def __init__(self) -> None:
        self.approvals = Approvals()
        """The run's tool calls waiting for a person (:mod:`trioflow.approvals`)."""
        self._stop_after_turn: str | None = None
        self._paused = False
        self._holding = False
        self._resume = trio.Event()
        self._resume.set()
        self._emit: Emit | None = None

    @property
    def paused(self) -> bool:
        """Whether a pause was asked for and not yet resumed."""
        return self._paused

    @property
    def holding(self) -> bool:
        """Whether the run is holding at a checkpoint right now."""
        return self._holding

    def pause(self) -> bool:
        """Ask the run to hold at its next checkpoint. Returns False if already paused."""
        if self._paused:
            return False
        self._paused = True
        self._resume = trio.Event()
        return True

    def stop_after_turn(self, reason: str) -> bool:
        """Ask the run to stop once the current model turn and its tool calls are done.

        The agent then raises :exc:`StoppedAfterTurn` with ``reason`` instead
        of starting another turn (a turn that answered ends the run as
        usual). Returns False if a stop was asked for already.
        """
        if self._stop_after_turn is not None:
            return False
        self._stop_after_turn = reason
        return True

    def resume(self) -> bool:
        """Let a paused run go on. Returns False if it was not paused."""
        if not self._paused:
            return False
        self._paused = False
        self._resume.set()
        return True

    async def checkpoint(self) -> None:
        """Hold here while paused (emitting ``flow.paused`` / ``flow.resumed``)."""
        if not self._paused or self._emit is None:
            return
        emit = self._emit
        self._holding = True
        try:
            paused: FlowPausedData = {"message": "paused"}
            await emit(EventType.FLOW_PAUSED, paused)
            await self._resume.wait()
        finally:
            self._holding = False
        resumed: FlowPausedData = {"message": "resumed"}
        await emit(EventType.FLOW_RESUMED, resumed)


@dataclasses.dataclass(frozen=True, slots=True)
class TurnResult:
    """What one model turn produced: the attempt that counted."""

    text: str
    """The turn's text (of its last attempt, after retries)."""
    calls: tuple[ToolCall, ...]
    """The tools the model asked for, in its order."""
    usage: Usage
    """The turn's token usage."""
    stop_reason: str
    """The model's stop reason."""
    streamed: frozenset[str] = frozenset()
    """The ids of the calls whose input the model streamed (``tool.input_delta``)."""


def _ask_json(schema: Mapping[str, Any]) -> str:
    """What the model is told when its answer must be JSON matching ``schema``."""
    text = json.dumps(schema, ensure_ascii=False, sort_keys=True)
    return (
        "Give your final answer as a single JSON value and nothing else (no prose, no "
        f"code fence), matching this JSON Schema: {text}"
    )


_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)


def _schema_validator(schema: Mapping[str, Any]) -> Any:
    """A ``jsonschema`` validator of ``schema``.

    Raises:
        ValueError: ``schema`` is not a valid JSON Schema.
        ImportError: ``jsonschema`` is not installed.
    """
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the extra is in `all`
        raise ImportError(
            "an output_schema needs jsonschema: pip install 'trioflow[structured]'"
        ) from None
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(dict(schema))
    except jsonschema.SchemaError as exc:
        raise ValueError(f"output_schema is not a valid JSON Schema: {exc.message}") from None
    return cls(schema)


def _best_error(validator: Any, value: Any) -> Any:
    import jsonschema

    return jsonschema.exceptions.best_match(validator.iter_errors(value))


def _result_text(result: Any) -> str:
    """A tool's result as the text the model reads."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)


class Agent:
    """An LLM agent: a model, its tools, a system prompt and an iteration budget.

    Args:
        model: the :class:`~trioflow.models.Model` to drive; ``None`` for the
            offline :class:`~trioflow.models.ScriptedModel`. To pick Claude
            when ``ANTHROPIC_API_KEY`` is set, use
            :func:`trioflow.models.open_model`.
        tools: the tools the model may call (:class:`~trioflow.tools.Tool`
            objects or functions to wrap with :func:`~trioflow.tools.tool`).
        system: the system prompt.
        max_iterations: the most model turns per run (>= 1).
        name: a name for events and statistics.
        approval: which calls wait for a person's decision, beyond those of
            tools marked ``requires_approval`` (:mod:`trioflow.approvals`):
            called with each :class:`~trioflow.models.ToolCall`, True to ask.
        approval_timeout: seconds a call waits for a decision before it is
            denied (``None``: it waits as long as the run lasts).
        options: sampling options for every turn
            (:class:`~trioflow.models.ModelOptions`: ``max_tokens``,
            ``temperature``), instead of the model's own.
        output_schema: a JSON Schema the final answer must match: the model
            is told to answer with JSON only (after the system prompt), the
            answer is parsed (a fenced ````json`` block is accepted) and
            checked, and the result's ``structured`` holds it; an answer
            that does not match raises :exc:`OutputSchemaError` (a run ends
            ``flow.failed``). Needs ``jsonschema`` (the ``structured`` extra).

    Raises:
        ValueError: ``max_iterations`` is below 1, two tools share a name,
            ``approval_timeout`` is not a positive number, or
            ``output_schema`` is not a valid JSON Schema.
        ImportError: ``output_schema`` is given and ``jsonschema`` is not installed.
    """

    def __init__(
        self,
        model: Model | None = None,
        *,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        system: str | None = None,
        max_iterations: int = 10,
        name: str = "agent",
        approval: Callable[[ToolCall], bool] | None = None,
        approval_timeout: float | None = None,
        options: ModelOptions | None = None,
        output_schema: Mapping[str, Any] | None = None,
    ) -> None:
        if approval_timeout is not None and not (
            isinstance(approval_timeout, (int, float)) and 0 < approval_timeout < math.inf
        ):
            raise ValueError(
                f"approval_timeout must be a positive number of seconds, not {approval_timeout!r}"
            )
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
            raise TypeError(f"max_iterations must be an int, not {max_iterations!r}")
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, not {max_iterations}")
        if model is None:
            from trioflow.models._scripted import ScriptedModel

            model = ScriptedModel()
        self.model = model
        self.tools = ToolRegistry(tools)
        self.system = system
        self.max_iterations = max_iterations
        self.name = name
        self.approval = approval
        self.approval_timeout = approval_timeout
        self.options = options
        self.output_schema = output_schema
        self._validator = None if output_schema is None else _schema_validator(output_schema)
        self._ask_json = None if output_schema is None else _ask_json(output_schema)

    def replace(
        self,
        *,
        model: Model | None = None,
        system: str | None = None,
        options: ModelOptions | None = None,
    ) -> Agent:
        """A copy of this agent with another ``model``, ``system`` prompt or ``options`` (those given).

        The tools, budget, name and approval policy are the same objects.
        How a server gives one run the model and options its request asked for.
        """
        copy = Agent(
            model if model is not None else self.model,
            system=system if system is not None else self.system,
            max_iterations=self.max_iterations,
            name=self.name,
            approval=self.approval,
            approval_timeout=self.approval_timeout,
            options=options if options is not None else self.options,
        )
        # The same tools, and the schema checked once (not again per run).
        copy.tools = self.tools
        copy.output_schema, copy._validator = self.output_schema, self._validator
        copy._ask_json = self._ask_json
        return copy

    @property
    def instructions(self) -> str | None:
        """The system prompt the model gets: :attr:`system`, and the answer's schema if there is one."""
        if self._ask_json is None:
            return self.system
        return self._ask_json if not self.system else f"{self.system}\n\n{self._ask_json}"

    def __repr__(self) -> str:
        return (
            f"Agent({self.name!r}, model={self.model.name!r}, tools={[t.name for t in self.tools]}, "
            f"max_iterations={self.max_iterations})"
        )

    async def run(
        self,
        task: str,
        emit: Emit,
        *,
        progress: FlowProgress | None = None,
        control: RunControl | None = None,
        max_iterations: int | None = None,
        history: Sequence[Message] = (),
    ) -> AgentResult:
        """Run the agent on ``task``, emitting its events through ``emit``.

        Emits no ``flow.*`` lifecycle events: those belong to whoever owns the
        run (the executor), which also guarantees the terminal event.

        Args:
            task: the user's request.
            emit: ``await emit(type, data)`` for every event.
            progress: updated after each iteration (its total is set to the
                iteration budget, and to the iterations taken once the model
                answers, so that a run that answers reads 100 %); a fresh
                one when ``None``.
            control: pause/resume (:class:`RunControl`).
            max_iterations: this run's budget instead of the agent's.
            history: the conversation before ``task`` (a thread's messages,
                :mod:`trioflow.threads`): the model sees it first; the
                result's ``messages`` continue it.

        Returns:
            The final answer, iteration count, usage and conversation.

        Raises:
            MaxIterationsExceeded: the budget ran out before a final answer.
            StoppedAfterTurn: ``control`` asked to stop after a turn
                (:meth:`RunControl.stop_after_turn`), and a turn with tool
                calls finished.
            ModelError: the model failed for good (after its retries).
            ValueError: ``task`` is empty or ``max_iterations`` is below 1.
        """
        if not isinstance(task, str) or not task.strip():
            raise ValueError("task must be a non-empty string")
        budget = self.max_iterations if max_iterations is None else max_iterations
        if budget < 1:
            raise ValueError(f"max_iterations must be >= 1, not {budget}")
        progress = progress if progress is not None else FlowProgress(budget)
        progress.set_total(budget)
        progress.start()
        control = control if control is not None else RunControl()
        control._emit = emit  # flow.paused / flow.resumed go to this run
        try:
            return await self._loop(task, budget, emit, progress, control, history)
        finally:
            control._emit = None

    async def _loop(
        self,
        task: str,
        budget: int,
        emit: Emit,
        progress: FlowProgress,
        control: RunControl,
        history: Sequence[Message],
    ) -> AgentResult:
        """The iterations: a model turn, its tools, until an answer or the budget's end."""
        specs = self.tools.specs()
        messages: list[Message] = [*history, Message.user(task)]
        asked: AddMessageData = {"role": "user", "content": task, "index": len(history)}
        await emit(EventType.ADD_MESSAGE, asked)
        usage = Usage()
        output = ""
        for n in range(1, budget + 1):
            started: IterationStartedData = {"iteration": n, "max_iterations": budget}
            await emit(EventType.ITERATION_STARTED, started)
            try:
                turn = await self._model_turn(n, messages, specs, emit, progress, control)
            except ModelError as exc:
                failed: IterationFailedData = {"iteration": n, "error": error_info(exc)}
                await emit(EventType.ITERATION_FAILED, failed)
                raise
            usage += turn.usage
            if turn.text:
                output = turn.text
            await self._add_assistant_message(turn, messages, emit)
            if turn.calls:
                results = await self._run_tools(
                    n, list(turn.calls), emit, progress, control, turn.streamed
                )
                await self._add_tool_results(results, messages, emit)
            await self._end_iteration(n, turn, emit, progress)
            if not turn.calls:
                structured = None if self._validator is None else self._structured(output)
                return AgentResult(output, n, usage, turn.stop_reason, tuple(messages), structured)
            if control._stop_after_turn is not None:
                raise StoppedAfterTurn(control._stop_after_turn, n, output, usage)
        raise MaxIterationsExceeded(budget, output, usage)

    @staticmethod
    async def _add_assistant_message(turn: TurnResult, messages: list[Message], emit: Emit) -> None:
        """Add the turn's text and tool calls to the conversation (if it has any)."""
        content: list[TextBlock | ToolUseBlock] = []
        if turn.text:
            content.append(TextBlock(turn.text))
        content.extend(ToolUseBlock(c.id, c.name, dict(c.input)) for c in turn.calls)
        if not content:
            return
        messages.append(Message("assistant", tuple(content)))
        data: AddMessageData = {
            "role": "assistant",
            "content": turn.text,
            "tool_calls": [
                {"id": c.id, "name": c.name, "input": dict(c.input)} for c in turn.calls
            ],
            "index": len(messages) - 1,
        }
        await emit(EventType.ADD_MESSAGE, data)

    @staticmethod
    async def _add_tool_results(
        results: list[ToolResultBlock], messages: list[Message], emit: Emit
    ) -> None:
        """Add the tools' results to the conversation, for the model's next turn."""
        messages.append(Message("user", tuple(results)))
        data: AddMessageData = {
            "role": "user",
            "tool_results": [
                {"tool_use_id": r.tool_use_id, "content": r.content, "is_error": r.is_error}
                for r in results
            ],
            "index": len(messages) - 1,
        }
        await emit(EventType.ADD_MESSAGE, data)

    @staticmethod
    async def _end_iteration(n: int, turn: TurnResult, emit: Emit, progress: FlowProgress) -> None:
        """Count the iteration done; emit ``iteration.completed`` and ``progress.update``."""
        progress.complete_iteration(n)
        if not turn.calls:
            # The answer came in n iterations: that is the run's whole length,
            # so its last progress.update reads 100 %, not n / budget.
            progress.set_total(n)
        completed: IterationCompletedData = {
            "iteration": n,
            "usage": turn.usage.to_dict(),
            "stop_reason": turn.stop_reason,
            "tool_calls": len(turn.calls),
        }
        await emit(EventType.ITERATION_COMPLETED, completed)
        figures = progress.to_dict()
        await emit(EventType.PROGRESS_UPDATE, {"percent": figures["progress_percent"], **figures})

    async def _model_turn(
        self,
        n: int,
        messages: list[Message],
        specs: list[Any],
        emit: Emit,
        progress: FlowProgress,
        control: RunControl,
    ) -> TurnResult:
        """One model turn: stream its deltas as tokens, collect its tool calls.

        Each :class:`~trioflow.models.ToolInputDelta` becomes a
        ``tool.input_delta`` event at once (a call's first one with
        ``first: true`` and an empty ``delta``, then one per non-empty
        piece). They are not batched like tokens: each is an ordinary
        ``emit`` (models send a tool's input in a few dozen pieces at most,
        not thousands).

        On a :class:`~trioflow.models.RetryNotice` the text and tool calls
        collected so far are dropped (the model streams the turn again from
        its start) and the ``warning`` event says how many ``token.received``
        events that voids (``discarded_tokens``), so that consumers who
        assemble text from tokens can drop them too, and which calls'
        ``tool.input_delta`` events it voids (``discarded_tool_calls``).

        Returns:
            The text and tool calls of the attempt that completed, its usage
            and stop reason.

        Raises:
            ModelError: the model failed for good, or its stream ended
                without a :class:`~trioflow.models.TurnEnd`.
        """
        started: StepStartedData = {"step": "model", "iteration": n, "model": self.model.name}
        await emit(EventType.STEP_STARTED, started)
        progress.start_step("model")
        parts: list[str] = []
        calls: list[ToolCall] = []
        end: TurnEnd | None = None
        token = EventType.TOKEN_RECEIVED
        token_nowait = _token_nowait(emit)
        opened = (
            self.model.stream(messages, tools=specs, system=self.instructions, options=self.options)
            if self.options
            else self.model.stream(messages, tools=specs, system=self.instructions)
        )
        streamed: dict[str, str] = {}  # call id -> tool, of the calls whose input streams
        input_delta = EventType.TOOL_INPUT_DELTA
        async with opened as stream:
            async for event in stream:
                if control._paused:
                    await control.checkpoint()
                if type(event) is TextDelta:
                    parts.append(event.text)
                    # A TokenData, built read-only (flat: str and int), so the bus need not copy it.
                    data = FrozenDict(token=event.text, iteration=n)
                    if token_nowait is None or not token_nowait(data):
                        await emit(token, data)
                elif type(event) is ToolInputDelta:
                    if event.first or event.id not in streamed:
                        streamed[event.id] = event.name
                        first: ToolInputDeltaData = {
                            "tool": event.name,
                            "call_id": event.id,
                            "iteration": n,
                            "delta": "",
                            "first": True,
                        }
                        await emit(input_delta, FrozenDict(first))
                    if event.partial_json:
                        # A ToolInputDeltaData, read-only and flat like a token's.
                        piece = FrozenDict(
                            tool=event.name, call_id=event.id, iteration=n, delta=event.partial_json
                        )
                        await emit(input_delta, piece)
                elif isinstance(event, ToolCall):
                    calls.append(event)
                elif isinstance(event, RetryNotice):
                    # The failed attempt's deltas are void, restarted or not.
                    await emit(EventType.WARNING, _retry_warning(event, len(parts), n, streamed))
                    parts.clear()
                    calls.clear()
                    streamed.clear()
                elif isinstance(event, TurnEnd):
                    end = event
        if end is None:
            raise ModelError("the model stream ended without a stop reason", kind="protocol")
        duration = progress.complete_step("model")
        completed: StepCompletedData = {
            "step": "model",
            "iteration": n,
            "duration": duration,
            "usage": end.usage.to_dict(),
        }
        await emit(EventType.STEP_COMPLETED, completed)
        return TurnResult(
            "".join(parts), tuple(calls), end.usage, str(end.stop_reason), frozenset(streamed)
        )

    def _structured(self, output: str) -> Any:
        """``output`` parsed as JSON and checked against :attr:`output_schema`.

        Raises:
            OutputSchemaError: it is not JSON, or does not match.
        """
        text = output.strip()
        fenced = _FENCE.fullmatch(text)
        if fenced is not None:
            text = fenced[1].strip()
        try:
            value = json.loads(text)
        except ValueError:
            raise OutputSchemaError(
                f"the answer is not JSON (an output_schema asks for JSON): {output[:200]!r}",
                output=output,
            ) from None
        assert self._validator is not None
        error = _best_error(self._validator, value)
        if error is not None:
            where = "".join(f"/{p}" for p in error.absolute_path)
            raise OutputSchemaError(
                f"the answer does not match the output_schema at {where or 'the top'}: "
                f"{error.message}",
                output=output,
                path=where,
            )
        return value

    async def _ask_approval(
        self,
        tool: Tool,
        call: ToolCall,
        n: int,
        emit: Emit,
        control: RunControl,
        streamed: bool = False,
    ) -> PendingApproval:
        """Announce the call, wait for its decision, announce the decision; return it."""
        asked: ToolApprovalRequiredData = {
            "tool": call.name,
            "call_id": call.id,
            "iteration": n,
            "input": dict(call.input),
            "timeout": self.approval_timeout,
        }
        if streamed:
            asked["streamed"] = True
        # Registered before the announcement goes out: a decision may follow it at once.
        pending = control.approvals.ask(
            call_id=call.id,
            tool=tool,
            input=call.input,
            iteration=n,
            timeout=self.approval_timeout,
        )
        try:
            await emit(EventType.TOOL_APPROVAL_REQUIRED, asked)
        except BaseException:
            control.approvals.withdraw(pending)
            raise
        decided = await control.approvals.wait(pending)
        if decided.decision is ApprovalDecision.DENY:
            await _announce_denial(decided, emit, streamed)
        else:
            approved: ToolApprovedData = {
                "tool": call.name,
                "call_id": call.id,
                "iteration": n,
                "input": dict(decided.input),
                "edited": decided.decision is ApprovalDecision.EDIT,
            }
            await emit(EventType.TOOL_APPROVED, approved)
        return decided

    async def _run_tools(
        self,
        n: int,
        calls: list[ToolCall],
        emit: Emit,
        progress: FlowProgress,
        control: RunControl,
        streamed: frozenset[str] = frozenset(),
    ) -> list[ToolResultBlock]:
        """Run the calls concurrently; return their results in the model's order.

        A call in ``streamed`` (its input was streamed as ``tool.input_delta``
        events) says so (``streamed: true``) in its ``tool.approval_required``,
        ``tool.denied`` and ``tool.started``.
        """
        started: StepStartedData = {"step": "tools", "iteration": n, "calls": len(calls)}
        await emit(EventType.STEP_STARTED, started)
        progress.start_step("tools")
        results: list[ToolResultBlock | None] = [None] * len(calls)
        run_id = getattr(emit, "run_id", None)  # an executor's run has one (see Emit)

        async def call_one(i: int, call: ToolCall) -> None:
            if control._paused:
                await control.checkpoint()
            input = call.input
            asking = self.tools.get(call.name) if call.name in self.tools else None
            if asking is not None and (
                asking.requires_approval or (self.approval is not None and self.approval(call))
            ):
                decided = await self._ask_approval(
                    asking, call, n, emit, control, call.id in streamed
                )
                if decided.decision is ApprovalDecision.DENY:
                    text = f"the user denied this call: {decided.reason or 'no reason given'}"
                    results[i] = ToolResultBlock(call.id, text, is_error=True)
                    return
                input = decided.input
            started: ToolStartedData = {
                "tool": call.name,
                "call_id": call.id,
                "iteration": n,
                "input": dict(input),
            }
            if call.id in streamed:
                started["streamed"] = True
            await emit(EventType.TOOL_STARTED, started)
            start = trio.current_time()
            try:
                tool = self.tools.get(call.name)
                context = ToolContext(
                    emit, tool=call.name, call_id=call.id, iteration=n, run_id=run_id
                )
                value = await tool.invoke(input, context)
            except Exception as exc:
                # A tool's failure is the model's to handle: report it and go on.
                message = str(exc) if isinstance(exc, ToolError) else f"{type(exc).__name__}: {exc}"
                failed: ToolFailedData = {
                    "tool": call.name,
                    "call_id": call.id,
                    "iteration": n,
                    "error": error_info(exc),
                    "duration": trio.current_time() - start,
                }
                await emit(EventType.TOOL_FAILED, failed)
                results[i] = ToolResultBlock(call.id, message, is_error=True)
                return
            duration = trio.current_time() - start
            completed: ToolCompletedData = {
                "tool": call.name,
                "call_id": call.id,
                "iteration": n,
                "result": _jsonable(value),
                "duration": duration,
            }
            await emit(EventType.TOOL_COMPLETED, completed)
            results[i] = ToolResultBlock(call.id, _result_text(value))

        if len(calls) == 1:
            await call_one(0, calls[0])
        else:
            async with trio.open_nursery() as nursery:
                for i, call in enumerate(calls):
                    nursery.start_soon(call_one, i, call, name=f"tool {call.name}")
        duration = progress.complete_step("tools")
        await emit(
            EventType.STEP_COMPLETED, {"step": "tools", "iteration": n, "duration": duration}
        )
        return [r for r in results if r is not None]


async def _announce_denial(pending: PendingApproval, emit: Emit, streamed: bool) -> None:
    denied: ToolDeniedData = {
        "tool": pending.tool,
        "call_id": pending.call_id,
        "iteration": pending.iteration,
        "reason": pending.reason,
        "timed_out": pending.timed_out,
    }
    if streamed:
        denied["streamed"] = True
    await emit(EventType.TOOL_DENIED, denied)


def _retry_warning(
    notice: RetryNotice, discarded: int, n: int, streamed: Mapping[str, str]
) -> ModelRetryData:
    """The ``warning`` of a model retry that voids the ``discarded`` tokens and ``streamed`` calls."""
    warning: ModelRetryData = {
        "message": f"model request failed ({notice.error}); retry "
        f"{notice.attempt} in {notice.delay:.3g} s",
        "attempt": notice.attempt,
        "delay": notice.delay,
        "kind": notice.kind,
        "restarted": notice.restarted,
        "discarded_tokens": discarded,
        "iteration": n,
    }
    if streamed:
        warning["discarded_tool_calls"] = [
            {"call_id": call_id, "tool": tool} for call_id, tool in streamed.items()
        ]
    return warning


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can carry it (finite numbers), else its text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return _result_text(value)
