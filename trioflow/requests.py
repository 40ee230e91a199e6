"""What a run is asked with, and the agent it gets: :class:`RunRequest`, :func:`request_agent`.

A :class:`RunRequest` is a validated request to start a run: the body of
``POST /runs`` (or of a thread's next run, a ``start`` message on ``/ws``),
and what the Redis work queue carries to a worker
(:func:`trioflow.redis.submit`). :func:`request_agent` and
:func:`open_request_agent` are the one rule by which the web server and the
workers turn a request into the agent that runs it: the model the request
names (only one the server allows), its system prompt and model options.
Nothing here knows HTTP or Redis; both build on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import trio

from trioflow import demo
from trioflow._json import json_type
from trioflow.agent import Agent
from trioflow.handle import OnDisconnect
from trioflow.models import ModelOptions, open_model

__all__ = [
    "AgentFactory",
    "ModelNotAllowed",
    "RunRequest",
    "default_agent",
    "open_request_agent",
    "request_agent",
    "with_model",
]


_FIELDS = frozenset(
    {
        "task",
        "timeout",
        "max_iterations",
        "on_disconnect",
        "model",
        "system",
        "max_tokens",
        "temperature",
        "metadata",
    }
)
_RESERVED_METADATA = frozenset({"source", "thread_id"})
"""Keys of a run's metadata the server sets: a request's ``metadata`` may not."""


@dataclasses.dataclass(frozen=True, slots=True)
class RunRequest:
    """A validated request to start a run.

    Build it with :meth:`parse` from untrusted JSON.
    """

    task: str
    """What to ask the agent; never empty."""
    timeout: float | None = None
    """The run's time limit in seconds (``None``: the executor's default)."""
    max_iterations: int | None = None
    """The run's iteration budget (``None``: the agent's)."""
    on_disconnect: OnDisconnect = OnDisconnect.CONTINUE
    """What happens when the last watching client disconnects."""
    model: str | None = None
    """The model to run with (``None``: the server's); the server must allow
    it (:attr:`~trioflow.web.WebConfig.allowed_models`)."""
    system: str | None = None
    """A system prompt instead of the agent's."""
    max_tokens: int | None = None
    """The most tokens one model turn may generate."""
    temperature: float | None = None
    """The model's sampling temperature (0 to 2)."""
    metadata: Mapping[str, Any] | None = None
    """The client's own metadata: kept as the run's and echoed on its ``flow.started``."""

    def to_json(self) -> dict[str, Any]:
        """The request as the JSON object :meth:`parse` reads back (members left unset omitted).

        What :func:`~trioflow.redis.submit` queues for a worker.
        """
        out: dict[str, Any] = {"task": self.task}
        for field in dataclasses.fields(self)[1:]:
            value = getattr(self, field.name)
            if field.name == "on_disconnect":
                if value is not OnDisconnect.CONTINUE:
                    out[field.name] = value.value
            elif value is not None:
                out[field.name] = dict(value) if field.name == "metadata" else value
        return out

    @property
    def options(self) -> ModelOptions | None:
        """The request's :class:`~trioflow.models.ModelOptions`, or ``None`` when it sets none."""
        options = ModelOptions(self.max_tokens, self.temperature)
        return options or None

    @classmethod
    def parse(
        cls, obj: object, *, ignore: frozenset[str] = frozenset(), task_field: str = "task"
    ) -> RunRequest:
        r"""Validate decoded JSON: ``{"task": str, "timeout"?, "max_iterations"?, "on_disconnect"?}``.

        Args:
            obj: the decoded JSON value.
            ignore: more member names to accept and skip (``"action"`` in a
                WebSocket message).
            task_field: the member holding the task (``"message"`` for a
                thread's next run).

        Raises:
            ValueError: ``obj`` is not an object, has an unknown member, or a
                member is missing, empty, of the wrong type, or a string
                that is not valid Unicode (a lone surrogate such as
                ``"\ud800"``, which could never be encoded as UTF-8 again);
                the message names the member and says what is expected.
        """
        if not isinstance(obj, Mapping):
            raise ValueError(f"expected a JSON object, not {json_type(obj)}")
        fields = _FIELDS - {"task"} | {task_field}
        unknown = sorted(set(obj) - fields - ignore)
        if unknown:
            raise ValueError(
                f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(fields))}"
            )
        task = obj.get(task_field)
        if task is None:
            raise ValueError(f"'{task_field}' is required: the text to ask the agent")
        if not isinstance(task, str):
            raise ValueError(f"'{task_field}' must be a string, not {json_type(task)}")
        if not task.strip():
            raise ValueError(f"'{task_field}' must not be empty")
        _check_unicode(task_field, task)
        timeout = obj.get("timeout")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise ValueError(f"'timeout' must be a number of seconds, not {json_type(timeout)}")
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ValueError(f"'timeout' must be a positive number of seconds, not {timeout}")
            timeout = float(timeout)
        max_iterations = obj.get("max_iterations")
        if max_iterations is not None:
            if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
                raise ValueError(
                    f"'max_iterations' must be an integer, not {json_type(max_iterations)}"
                )
            if max_iterations < 1:
                raise ValueError(f"'max_iterations' must be at least 1, not {max_iterations}")
        policy = obj.get("on_disconnect", OnDisconnect.CONTINUE)
        try:
            on_disconnect = OnDisconnect(policy)
        except ValueError:
            raise ValueError(
                f"'on_disconnect' must be 'continue' or 'cancel', not {policy!r}"
            ) from None
        model = obj.get("model")
        if model is not None and (
            not isinstance(model, str) or not model.strip() or len(model) > 200
        ):
            raise ValueError("'model' must be a model's name (1 to 200 characters)")
        system = obj.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise ValueError(f"'system' must be a string, not {json_type(system)}")
            _check_unicode("system", system)
        max_tokens = obj.get("max_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise ValueError(f"'max_tokens' must be an integer of at least 1, not {max_tokens!r}")
        temperature = obj.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not 0 <= temperature <= 2
        ):
            raise ValueError(f"'temperature' must be a number from 0 to 2, not {temperature!r}")
        metadata = obj.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                raise ValueError(f"'metadata' must be an object, not {json_type(metadata)}")
            reserved = sorted(_RESERVED_METADATA & set(metadata))
            if reserved:
                raise ValueError(
                    f"'metadata' may not set {', '.join(map(repr, reserved))}: the server sets it"
                )
        return cls(
            task,
            timeout,
            max_iterations,
            on_disconnect,
            model,
            system,
            max_tokens,
            None if temperature is None else float(temperature),
            metadata,
        )


def _check_unicode(name: str, value: str) -> None:
    """Raise :exc:`ValueError` naming ``name`` if ``value`` holds a lone surrogate."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{name} is not valid Unicode: it holds a lone surrogate (such as \\ud800)"
            ) from None


AgentFactory: TypeAlias = Callable[[RunRequest], Agent]
"""Builds the :class:`~trioflow.Agent` for one run from its request.

A factory that raises :exc:`ValueError` rejects the request (``400``).
"""


def default_agent(request: RunRequest) -> Agent:
    """The agent used when none is given: :func:`trioflow.demo.default_agent`."""
    return demo.default_agent()


class ModelNotAllowed(ValueError):
    """A request names a model the server does not allow (:attr:`trioflow.web.WebConfig.allowed_models`)."""

    def __init__(self, model: str, allowed: Sequence[str]) -> None:
        self.model = model
        self.allowed = tuple(allowed)
        names = ", ".join(self.allowed) or "none"
        super().__init__(f"this server does not run model {model!r} on request (allowed: {names})")


def request_agent(
    factory: AgentFactory, request: RunRequest, allowed_models: Sequence[str] = ()
) -> Agent:
    """The agent of ``request``'s run, its model not yet opened: the one rule of the server and its workers.

    Checks that the model the request names (if any) is in ``allowed_models``,
    calls ``factory(request)``, then applies the request's ``system`` and
    model options (``max_tokens``, ``temperature``) with
    :meth:`~trioflow.Agent.replace`. A model the request names is opened by
    :func:`open_request_agent`, for the run's lifetime.

    Raises:
        ModelNotAllowed: (a :exc:`ValueError`) the request names a model not allowed.
        ValueError: the factory rejects the request.
    """
    if request.model is not None and request.model not in allowed_models:
        raise ModelNotAllowed(request.model, allowed_models)
    agent = factory(request)
    if request.system is not None or request.options is not None:
        agent = agent.replace(system=request.system, options=request.options)
    return agent


@asynccontextmanager
async def with_model(agent: Agent, model: str | None) -> AsyncIterator[Agent]:
    """``agent``, or with ``model`` opened for the block in place of its own."""
    if model is None:
        await trio.lowlevel.checkpoint()
        yield agent
        return
    async with open_model(model) as opened:
        yield agent.replace(model=opened)


@asynccontextmanager
async def open_request_agent(
    factory: AgentFactory, request: RunRequest, allowed_models: Sequence[str] = ()
) -> AsyncIterator[Agent]:
    """:func:`request_agent`, with the model the request names opened for the block (a run's lifetime).

    What a worker (:class:`~trioflow.redis.Worker`) runs a queued request
    with; the web server builds the agents it executes by the same two steps.

    Raises:
        ModelNotAllowed, ValueError: as :func:`request_agent`.
        ModelError, ImportError: the named model cannot be opened (no API
            key, its SDK not installed).
    """
    async with with_model(request_agent(factory, request, allowed_models), request.model) as agent:
        yield agent
