"""Tools the model can call: :class:`Tool`, the :func:`tool` decorator and :class:`ToolRegistry`.

A :class:`Tool` is a function with a name, a description and a JSON Schema of
its input, which is what a model is told about it (:meth:`Tool.spec`). Make one
from a typed function with :func:`tool`; the schema comes from the type hints
and the descriptions from the Google-style docstring::

    @tool(timeout=10.0)
    async def fetch_page(url: str, max_bytes: int = 100_000) -> str:
        ...  # with a docstring whose "Args:" section describes url and max_bytes

    result = await fetch_page.invoke({"url": "https://example.com"})

:meth:`Tool.invoke` checks the input against the schema
(:class:`ToolInputError`), runs the function and enforces the tool's timeout
(:class:`ToolTimeout`). A :class:`ToolRegistry` holds the tools of an agent
by name.

A tool that takes a parameter annotated :class:`ToolContext` gets its call's
context there (the parameter is not part of the input schema): the run and
call it belongs to, :meth:`ToolContext.emit` to put events of its own into
the run's stream, in order with the call's ``tool.started`` and
``tool.completed``, and :meth:`ToolContext.progress`::

    @tool
    async def crawl(site: str, ctx: ToolContext) -> int:
        pages = await list_pages(site)
        for n, page in enumerate(pages, 1):
            await ctx.emit("crawl.page", {"url": page})
            await ctx.progress(n, len(pages))
        return len(pages)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import math
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, overload

import trio

from trioflow.events import EventType, validate_event_type
from trioflow.models._base import ToolSpec

__all__ = [
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolInputError",
    "ToolRegistry",
    "ToolTimeout",
    "UnknownToolError",
    "tool",
]


# -- a call's context -------------------------------------------------------------

_OWN_TYPES = frozenset({EventType.INFO, EventType.WARNING})
"""The built-in types a tool may emit itself; every other built-in type is the run's."""


class ToolContext:
    """A tool call's context: its run, the call, and a way to emit events into the run.

    A tool gets one by taking a parameter annotated ``ToolContext`` (see the
    module documentation); the agent makes one per call. Made by hand, it
    lets a test call a tool with a recorder as ``emit``.

    Args:
        emit: ``await emit(type, data)`` puts an event into the run's stream
            (the agent's :class:`~trioflow.agent.Emit`).
        tool: the tool's name.
        call_id: the model's id of this call.
        iteration: the agent's iteration the call belongs to.
        run_id: the run's id, when the run has one (runs of the executor do).
    """

    __slots__ = ("_emit", "call_id", "iteration", "run_id", "tool")

    def __init__(
        self,
        emit: Callable[[str, Mapping[str, Any]], Awaitable[object]],
        *,
        tool: str,
        call_id: str,
        iteration: int = 0,
        run_id: str | None = None,
    ) -> None:
        self._emit = emit
        self.tool = tool
        """The tool's name."""
        self.call_id = call_id
        """The model's id of this call (``call_id`` of its ``tool.*`` events)."""
        self.iteration = iteration
        """The agent's iteration the call belongs to."""
        self.run_id = run_id
        """The run's id, or ``None`` outside an executor's run."""

    def __repr__(self) -> str:
        return f"<ToolContext {self.tool} call {self.call_id} run {self.run_id}>"

    async def emit(self, type: str, data: Mapping[str, Any] | None = None) -> None:
        """Emit an event of ``type`` into the run's stream, between the call's ``tool.started`` and its end.

        ``data`` gets the call's ``tool`` and ``call_id`` unless it has
        them already, so a client can tell which call an event came from.
        The run's own event types (``flow.*``, ``token.*``, ``tool.*``,
        ``iteration.*``, ...) are the agent's and the executor's to emit:
        a tool may emit custom types (``"crawl.page"``), ``info`` and
        ``warning``.

        Raises:
            ValueError: ``type`` is not a valid event type name, or is one
                of the run's own types.
            TypeError: ``type`` is not a string, or ``data`` is not a mapping.
        """
        name = validate_event_type(type)
        if name in _BUILTIN_TYPES and name not in _OWN_TYPES:
            raise ValueError(
                f"a tool cannot emit {name!r}: the run's own event types are the agent's and "
                "the executor's; use a type of your own (for example 'crawl.page'), 'info' "
                "or 'warning'"
            )
        if data is not None and not isinstance(data, Mapping):
            raise TypeError(f"event data must be a mapping, not {type.__class__.__name__}")
        await self._emit(name, {"tool": self.tool, "call_id": self.call_id, **(data or {})})

    async def progress(
        self, done: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Emit ``tool.progress``: ``done`` of ``total`` units of this call's work (``total`` ``None``: unknown).

        Raises:
            ValueError: ``done`` or ``total`` is negative or not finite.
        """
        for what, value in (("done", done), ("total", total)):
            if value is None and what == "total":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"progress {what} must be a finite number >= 0, not {value!r}")
        data = {
            "tool": self.tool,
            "call_id": self.call_id,
            "iteration": self.iteration,
            "done": done,
            "total": total,
            "message": message,
        }
        await self._emit(EventType.TOOL_PROGRESS, data)


_BUILTIN_TYPES = frozenset(str(t) for t in EventType)


# -- errors --------------------------------------------------------------------


class ToolError(Exception):
    """A tool could not do what it was asked; the base of this module's errors.

    Tool functions may raise it (or a subclass) for failures the model should
    hear about in plain words, such as :class:`trioflow.builtin.CalculationError`.
    """


class ToolInputError(ToolError):
    """The input of a tool call does not match the tool's schema.

    Attributes:
        tool: the name of the tool.
        argument: the argument at fault, or ``None`` when the input as a whole is.
    """

    def __init__(self, message: str, *, tool: str, argument: str | None = None) -> None:
        super().__init__(message)
        self.tool = tool
        self.argument = argument


class ToolTimeout(ToolError):
    """A tool call ran longer than the tool's :attr:`~Tool.timeout` and was cancelled.

    Attributes:
        tool: the name of the tool.
        timeout: the limit that expired, in seconds.
    """

    def __init__(self, tool: str, timeout: float) -> None:
        super().__init__(f"tool {tool!r} timed out after {timeout} s")
        self.tool = tool
        self.timeout = timeout


class UnknownToolError(ToolError, KeyError):
    """No tool of that name is registered (also a :class:`KeyError`).

    Attributes:
        name: the name that was looked up.
    """

    def __init__(self, name: str, available: Iterable[str] = ()) -> None:
        names = ", ".join(repr(n) for n in available) or "none"
        super().__init__(f"unknown tool {name!r} (available: {names})")
        self.name = name

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message.
        return str(self.args[0])


# -- the tool ------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Tool:
    """A callable tool: a name, a description, an input schema and the function itself.

    Usually made with :func:`tool`. Built by hand, ``input_schema`` is a JSON
    Schema object (``{"type": "object", "properties": ..., "required": [...],
    "additionalProperties": False}``) and ``function`` takes the input's
    properties as keyword arguments. Treat ``input_schema`` as read-only.
    Tools compare by identity.

    Raises:
        ValueError: ``name`` is not 1-64 letters, digits, ``_`` or ``-``;
            ``timeout`` is not a positive number; or ``thread`` is set for a
            coroutine function.
        TypeError: ``function`` is not callable, or ``context`` is set for a
            synchronous function (a context's methods are awaited).
    """

    name: str
    """The name the model calls the tool by."""
    description: str
    """What the tool does, for the model."""
    input_schema: Mapping[str, Any]
    """The JSON Schema of the input, an ``"object"`` schema."""
    function: Callable[..., Any]
    """The function :meth:`invoke` calls with the input as keyword arguments."""
    timeout: float | None = None
    """The longest a call may run, in seconds; ``None`` for no limit."""
    thread: bool = False
    """Run a synchronous ``function`` in a worker thread."""
    context: str | None = None
    """The name of the parameter that receives the call's :class:`ToolContext` (``None``: none does)."""
    _is_async: bool = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _NAME_RE.fullmatch(self.name) is None:
            raise ValueError(
                f"invalid tool name {self.name!r}: use 1-64 letters, digits, '_' or '-'"
            )
        if not callable(self.function):
            raise TypeError(f"tool {self.name!r}: function is not callable")
        if self.timeout is not None:
            if not (isinstance(self.timeout, (int, float)) and 0 < self.timeout < math.inf):
                raise ValueError(
                    f"tool {self.name!r}: timeout must be a positive number of seconds "
                    f"or None, not {self.timeout!r}"
                )
            object.__setattr__(self, "timeout", float(self.timeout))
        is_async = inspect.iscoroutinefunction(self.function)
        if is_async and self.thread:
            raise ValueError(f"tool {self.name!r}: thread=True needs a synchronous function")
        if self.context is not None and not is_async:
            raise TypeError(
                f"tool {self.name!r}: a ToolContext parameter needs an async function "
                "(its emit and progress are awaited)"
            )
        object.__setattr__(self, "_is_async", is_async)

    def spec(self) -> ToolSpec:
        """What a model is told about this tool: its name, description and input schema."""
        return ToolSpec(self.name, self.description, self.input_schema)

    def validate(self, input: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``input`` against :attr:`input_schema` and return the arguments to call with.

        The checks are those of the schemas :func:`tool` writes: required and
        unknown properties, the basic JSON types (``bool`` is not a number; an
        integral float such as ``3.0`` is accepted as an integer and becomes
        ``3``), ``enum`` values, array ``items`` and object values.

        Raises:
            ToolInputError: the input does not match; the message names the argument.
        """
        return _check_arguments(self.name, input, self.input_schema)

    async def invoke(self, input: Mapping[str, Any], context: ToolContext | None = None) -> Any:
        """Call the tool with ``input`` and return what the function returned.

        ``context`` is the call's :class:`ToolContext`, passed to the
        function's :attr:`context` parameter (the agent gives one to every
        call; a tool without such a parameter ignores it).

        The input is checked first (:meth:`validate`). An async function is
        awaited; a sync one is called directly (it should be quick), or in a
        worker thread with ``trio.to_thread.run_sync`` when :attr:`thread` is
        set. Exceptions the function raises propagate unchanged.

        If :attr:`timeout` is set the call runs in a cancel scope with that
        deadline. A sync function called directly cannot be interrupted: it
        runs to completion and its result is returned even if late.

        Raises:
            ToolInputError: ``input`` does not match the schema; the function
                was not called.
            TypeError: the tool takes a :class:`ToolContext` and ``context``
                is ``None``; the function was not called.
            ToolTimeout: the call was cancelled because the timeout expired.
            trio.Cancelled: an enclosing scope was cancelled. A thread
                tool's worker thread is then abandoned and runs on in the
                background; its result is discarded.
        """
        arguments = _check_arguments(self.name, input, self.input_schema)
        if self.context is not None:
            if context is None:
                raise TypeError(
                    f"tool {self.name!r} takes a ToolContext: invoke it with context=ToolContext(...)"
                )
            arguments[self.context] = context
        if self.timeout is None:
            return await self._call(arguments)
        with trio.move_on_after(self.timeout):
            return await self._call(arguments)
        raise ToolTimeout(self.name, self.timeout)

    async def _call(self, arguments: dict[str, Any]) -> Any:
        if self._is_async:
            return await self.function(**arguments)
        if self.thread:
            return await trio.to_thread.run_sync(
                functools.partial(self.function, **arguments), abandon_on_cancel=True
            )
        await trio.lowlevel.checkpoint()
        return self.function(**arguments)


# -- input validation ------------------------------------------------------------

_JSON_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _matches_type(value: object, json_type: str) -> bool:
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if json_type == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "array":
        return isinstance(value, (list, tuple))
    if json_type == "object":
        return isinstance(value, Mapping)
    if json_type == "null":
        return value is None
    return True  # a type this validator does not know: let the function judge


def _same_value(a: object, b: object) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _check_value(
    tool: str, argument: str, where: str, value: Any, schema: Mapping[str, Any]
) -> Any:
    """Check one value against a (sub)schema and return it, integral floats made ints."""
    expected = schema.get("type")
    if expected is not None:
        allowed = [expected] if isinstance(expected, str) else list(expected)
        matched = next((t for t in allowed if _matches_type(value, t)), None)
        if matched is None:
            wanted = " or ".join(_JSON_TYPE_NAMES.get(t, t) for t in allowed)
            raise ToolInputError(
                f"tool {tool!r}: {where} must be {wanted}, not {_json_type(value)}",
                tool=tool,
                argument=argument,
            )
        if matched == "integer" and isinstance(value, float):
            value = int(value)
    choices = schema.get("enum")
    if choices is not None and not any(_same_value(value, c) for c in choices):
        listed = ", ".join(repr(c) for c in choices)
        raise ToolInputError(
            f"tool {tool!r}: {where} must be one of {listed}, not {value!r}",
            tool=tool,
            argument=argument,
        )
    if isinstance(value, (list, tuple)) and isinstance(schema.get("items"), Mapping):
        items = schema["items"]
        value = [
            _check_value(tool, argument, f"{where} item {i}", v, items) for i, v in enumerate(value)
        ]
    elif isinstance(value, Mapping):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        if properties or isinstance(extra, Mapping):
            checked = {}
            for key, v in value.items():
                sub = properties.get(key, extra)
                if isinstance(sub, Mapping):
                    v = _check_value(tool, argument, f"{where} key {key!r}", v, sub)
                checked[key] = v
            value = checked
    return value


def _check_arguments(
    tool: str, input: Mapping[str, Any], schema: Mapping[str, Any]
) -> dict[str, Any]:
    if not isinstance(input, Mapping):
        raise ToolInputError(
            f"tool {tool!r}: input must be an object, not {_json_type(input)}", tool=tool
        )
    properties: Mapping[str, Any] = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in input:
            raise ToolInputError(
                f"tool {tool!r}: missing required argument {name!r}", tool=tool, argument=name
            )
    extra = schema.get("additionalProperties", True)
    arguments: dict[str, Any] = {}
    for name, value in input.items():
        sub = properties.get(name)
        if sub is None:
            if extra is False:
                known = ", ".join(repr(p) for p in properties) or "none"
                raise ToolInputError(
                    f"tool {tool!r}: unknown argument {name!r} (arguments: {known})",
                    tool=tool,
                    argument=name,
                )
            sub = extra if isinstance(extra, Mapping) else {}
        arguments[name] = _check_value(tool, name, f"argument {name!r}", value, sub)
    return arguments


# -- the decorator ---------------------------------------------------------------

_ARGS_SECTIONS = frozenset(
    {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments"}
)
_SECTION_RE = re.compile(
    r"(args|arguments|parameters|params|keyword args|keyword arguments|returns?|yields?|"
    r"raises|examples?|notes?|attributes|see also|warnings?|todo|references|"
    r"cancellation)\s*:",
    re.IGNORECASE,
)
_PARAM_RE = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")


def _reflow(lines: list[str]) -> str:
    """Join lines into paragraphs: one line each, separated by a blank line."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(paragraphs)


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its description and its ``Args:`` entries."""
    if not doc:
        return "", {}
    description: list[str] = []
    params: dict[str, list[str]] = {}
    section: str | None = None
    base_indent: int | None = None
    current: list[str] | None = None
    for line in inspect.cleandoc(doc).splitlines():
        indent = len(line) - len(line.lstrip())
        if indent == 0 and _SECTION_RE.fullmatch(line.strip()):
            section = line.strip()[:-1].strip().lower()
            base_indent = None
            current = None
            continue
        if section is None:
            description.append(line)
            continue
        if section not in _ARGS_SECTIONS or not line.strip():
            continue
        if base_indent is None:
            base_indent = indent
        match = _PARAM_RE.fullmatch(line.strip()) if indent <= base_indent else None
        if match is not None:
            current = params.setdefault(match.group(1), [])
            current.append(match.group(2))
        elif current is not None:
            current.append(line.strip())
    return _reflow(description), {k: " ".join(v).strip() for k, v in params.items()}


_Converter = Callable[[Any], Any]
_PRIMITIVES: dict[object, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _enum_schema(values: list[Any], what: str) -> dict[str, Any]:
    for v in values:
        if not isinstance(v, (str, int, float, bool)) and v is not None:
            raise TypeError(f"{what}: value {v!r} is not a JSON string, number or boolean")
    kinds = {_json_type(v) for v in values}
    if kinds == {"integer", "number"}:
        kinds = {"number"}
    schema: dict[str, Any] = {}
    if len(kinds) == 1:
        schema["type"] = kinds.pop()
    schema["enum"] = values
    return schema


def _schema_for(annotation: Any, what: str) -> tuple[dict[str, Any], _Converter | None]:
    """The JSON schema of ``annotation``, and a converter from JSON to it when one is needed."""
    if annotation is Any:
        return {}, None
    if annotation in _PRIMITIVES:
        return {"type": _PRIMITIVES[annotation]}, None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        enum_type: type[enum.Enum] = annotation
        schema = _enum_schema([m.value for m in enum_type], what)
        return schema, enum_type
    if annotation is list:
        return {"type": "array"}, None
    if annotation is dict:
        return {"type": "object"}, None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return _enum_schema(list(args), what), None
    if origin is list and len(args) == 1:
        items, convert = _schema_for(args[0], what)
        if convert is None:
            return {"type": "array", "items": items}, None
        item_convert = convert
        return {"type": "array", "items": items}, lambda v: [item_convert(x) for x in v]
    if origin is dict and len(args) == 2:
        if args[0] is not str:
            raise TypeError(f"{what}: dict keys must be str, not {args[0]!r}")
        values, convert = _schema_for(args[1], what)
        schema = {"type": "object", "additionalProperties": values}
        if convert is None:
            return schema, None
        value_convert = convert
        return schema, lambda v: {k: value_convert(x) for k, x in v.items()}
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and len(args) == 2:
            inner, convert = _schema_for(members[0], what)
            schema = dict(inner)
            if isinstance(schema.get("type"), str):
                schema["type"] = [schema["type"], "null"]
            if "enum" in schema:
                schema["enum"] = [*schema["enum"], None]
            if convert is None:
                return schema, None
            inner_convert = convert
            return schema, lambda v: None if v is None else inner_convert(v)
    raise TypeError(
        f"{what}: unsupported type annotation {annotation!r} (use str, int, float, bool, "
        "list[X], dict[str, X], Literal[...], an Enum, Any or X | None)"
    )


def _json_default(value: object) -> tuple[bool, Any]:
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (str, int, float, bool)):
        return True, value
    return False, None


def _make_tool(
    function: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    timeout: float | None,
    thread: bool,
) -> Tool:
    if not callable(function):
        raise TypeError(f"@tool needs a function, not {type(function).__name__}")
    tool_name = name if name is not None else getattr(function, "__name__", "")
    what = f"tool {tool_name!r}"
    doc_description, doc_params = _parse_docstring(inspect.getdoc(function))
    try:
        hints = typing.get_type_hints(function)
    except Exception as exc:
        raise TypeError(f"{what}: cannot resolve the type annotations: {exc}") from exc
    signature = inspect.signature(function)
    properties: dict[str, Any] = {}
    required: list[str] = []
    converters: dict[str, _Converter] = {}
    context: str | None = None
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{what}: *args and **kwargs are not supported ({param})")
        if param.kind is param.POSITIONAL_ONLY:
            raise TypeError(f"{what}: parameter {param.name!r} is positional-only")
        if param.name not in hints:
            raise TypeError(f"{what}: parameter {param.name!r} has no type annotation")
        if hints[param.name] is ToolContext:
            if context is not None:
                raise TypeError(f"{what}: two ToolContext parameters ({context!r}, {param.name!r})")
            context = param.name  # the call's context: not part of the input
            continue
        schema, convert = _schema_for(hints[param.name], f"{what} parameter {param.name!r}")
        if param.name in doc_params:
            schema["description"] = doc_params[param.name]
        if param.default is param.empty:
            required.append(param.name)
        else:
            ok, default = _json_default(param.default)
            if ok:
                schema["default"] = default
        properties[param.name] = schema
        if convert is not None:
            converters[param.name] = convert
    input_schema = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return Tool(
        name=tool_name,
        description=description if description is not None else doc_description,
        input_schema=input_schema,
        function=_with_converters(function, converters) if converters else function,
        timeout=timeout,
        thread=thread,
        context=context,
    )


def _with_converters(
    function: Callable[..., Any], converters: dict[str, _Converter]
) -> Callable[..., Any]:
    """Wrap ``function`` so that JSON values become the Enum members it was annotated with."""

    def convert(kwargs: dict[str, Any]) -> dict[str, Any]:
        for key, conv in converters.items():
            if key in kwargs:
                kwargs[key] = conv(kwargs[key])
        return kwargs

    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def async_wrapper(**kwargs: Any) -> Any:
            return await function(**convert(kwargs))

        return async_wrapper

    @functools.wraps(function)
    def wrapper(**kwargs: Any) -> Any:
        return function(**convert(kwargs))

    return wrapper


@overload
def tool(function: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    thread: bool = False,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    function: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | None = None,
    thread: bool = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Turn a typed sync or async function into a :class:`Tool`; use as ``@tool`` or ``@tool(...)``.

    The input schema has one property per parameter, from its type hint:
    ``str`` → string, ``int`` → integer, ``float`` → number, ``bool`` →
    boolean, ``list[X]`` → array of X, ``dict`` / ``dict[str, X]`` → object,
    ``Literal[...]`` and Enum subclasses → ``enum`` of the values (an Enum
    parameter receives the member), ``Any`` → anything, and ``X | None`` →
    X or null. Parameters with a default are not required; JSON-compatible
    defaults appear in the schema as ``default``. The description is the
    docstring's text before its first section, and each parameter's
    description comes from the docstring's ``Args:`` section
    (``name: text``, continued on more-indented lines).

    Args:
        function: the function, when used bare as ``@tool``.
        name: the tool's name; defaults to the function's ``__name__``.
        description: the tool's description; defaults to the docstring's.
        timeout: the longest a call may run, in seconds (see :meth:`Tool.invoke`).
        thread: run a sync function in a worker thread (for blocking work).

    Returns:
        The :class:`Tool`, or with options only, a decorator that makes it.

    A parameter annotated :class:`ToolContext` is not part of the schema:
    it receives the call's context (an ``async def`` tool only).

    Raises:
        TypeError: a parameter has no annotation or an unsupported one, is
            positional-only, or is ``*args`` / ``**kwargs``; two parameters
            are :class:`ToolContext`; or a synchronous function takes one.
        ValueError: the name is invalid, the timeout is not positive, or
            ``thread`` is set for an async function.
    """
    if function is not None:
        return _make_tool(
            function, name=name, description=description, timeout=timeout, thread=thread
        )

    def decorate(fn: Callable[..., Any]) -> Tool:
        return _make_tool(fn, name=name, description=description, timeout=timeout, thread=thread)

    return decorate


def _as_tool(function: Callable[..., Any]) -> Tool:
    return tool(function)


# -- the registry ----------------------------------------------------------------


class ToolRegistry:
    """The tools an agent may call, by name, in the order they were added.

    Iterating yields the tools; ``len`` counts them; ``name in registry``
    tests for a name.

    Args:
        tools: tools to add at once; plain functions are made tools with :func:`tool`.

    Raises:
        ValueError: two tools have the same name.
    """

    __slots__ = ("_tools",)

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool | Callable[..., Any]) -> Tool:
        """Add a tool (a plain function is made one with :func:`tool`) and return it.

        Returns the :class:`Tool`, so ``@registry.add`` works as a decorator.

        Raises:
            ValueError: a tool of the same name is registered already.
            TypeError: a plain function cannot be made a tool (see :func:`tool`).
        """
        t = tool if isinstance(tool, Tool) else _as_tool(tool)
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is registered already")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool:
        """The tool called ``name``.

        Raises:
            UnknownToolError: no such tool (a :class:`KeyError` too).
        """
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownToolError(name, self._tools) from None

    def specs(self) -> list[ToolSpec]:
        """The :class:`~trioflow.models.ToolSpec` of each tool, for the model."""
        return [t.spec() for t in self._tools.values()]

    async def invoke(
        self, name: str, input: Mapping[str, Any], context: ToolContext | None = None
    ) -> Any:
        """Look up tool ``name`` and :meth:`~Tool.invoke` it with ``input`` (and ``context``).

        Raises:
            UnknownToolError: no such tool.
            ToolInputError: ``input`` does not match the tool's schema.
            TypeError: the tool takes a :class:`ToolContext` and ``context`` is ``None``.
            ToolTimeout: the tool's timeout expired.
        """
        return await self.get(name).invoke(input, context)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __repr__(self) -> str:
        return f"ToolRegistry([{', '.join(self._tools)}])"
