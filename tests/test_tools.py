from __future__ import annotations

import enum
import threading
from typing import Any, Literal

import pytest
import trio
import trio.testing

from trioflow.models._base import ToolSpec
from trioflow.tools import (
    Tool,
    ToolError,
    ToolInputError,
    ToolRegistry,
    ToolTimeout,
    UnknownToolError,
    tool,
)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


def _props(t: Tool) -> dict[str, Any]:
    return dict(t.input_schema["properties"])


# -- schema derivation -----------------------------------------------------------


def test_schema_for_primitive_types() -> None:
    @tool
    def f(s: str, i: int, x: float, b: bool) -> None: ...

    assert f.input_schema == {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "x": {"type": "number"},
            "b": {"type": "boolean"},
        },
        "required": ["s", "i", "x", "b"],
        "additionalProperties": False,
    }


def test_schema_for_lists_and_dicts() -> None:
    @tool
    def f(xs: list[int], tags: list[str], anything: list, d: dict, m: dict[str, float]) -> None: ...  # type: ignore[type-arg]

    assert _props(f) == {
        "xs": {"type": "array", "items": {"type": "integer"}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "anything": {"type": "array"},
        "d": {"type": "object"},
        "m": {"type": "object", "additionalProperties": {"type": "number"}},
    }


def test_schema_for_literal_is_enum() -> None:
    @tool
    def f(mode: Literal["fast", "slow"], level: Literal[1, 2, 3]) -> None: ...

    assert _props(f) == {
        "mode": {"type": "string", "enum": ["fast", "slow"]},
        "level": {"type": "integer", "enum": [1, 2, 3]},
    }


def test_schema_for_enum_subclass_is_enum_of_values() -> None:
    @tool
    def f(color: Color) -> None: ...

    assert _props(f) == {"color": {"type": "string", "enum": ["red", "green"]}}


def test_schema_for_optional_with_default_is_nullable_and_not_required() -> None:
    @tool
    def f(a: int | None = None, b: str | None = "x") -> None: ...

    assert _props(f) == {
        "a": {"type": ["integer", "null"], "default": None},
        "b": {"type": ["string", "null"], "default": "x"},
    }
    assert f.input_schema["required"] == []


def test_schema_for_optional_without_default_is_required() -> None:
    @tool
    def f(a: float | None) -> None: ...

    assert f.input_schema["required"] == ["a"]


def test_schema_for_any_is_unconstrained() -> None:
    @tool
    def f(value: Any) -> None: ...

    assert _props(f) == {"value": {}}


def test_parameters_with_defaults_are_not_required() -> None:
    @tool
    def f(a: int, b: int = 2, *, c: str = "c") -> None: ...

    assert f.input_schema["required"] == ["a"]
    assert _props(f)["b"] == {"type": "integer", "default": 2}


def test_string_annotations_are_resolved() -> None:
    @tool
    def f(a: list[int], b: Color | None = None) -> None: ...

    assert _props(f)["a"] == {"type": "array", "items": {"type": "integer"}}
    assert _props(f)["b"]["enum"] == ["red", "green", None]


def test_description_and_parameter_descriptions_come_from_docstring() -> None:
    @tool
    def search(query: str, limit: int = 10) -> list[str]:
        """Search the catalogue.

        Finds items whose title
        matches the query.

        Args:
            query: What to look for,
                in plain words.
            limit (int): At most this many results.

        Returns:
            The titles.
        """
        return []

    assert (
        search.description == "Search the catalogue.\n\nFinds items whose title matches the query."
    )
    assert _props(search)["query"]["description"] == "What to look for, in plain words."
    assert _props(search)["limit"]["description"] == "At most this many results."


def test_function_without_docstring_has_empty_description() -> None:
    @tool
    def f(a: int) -> None: ...

    assert f.description == ""
    assert "description" not in _props(f)["a"]


@pytest.mark.parametrize(
    "annotation",
    [complex, tuple[int, int], int | str, dict[int, str], set[int], type(None)],
)
def test_unsupported_annotation_raises_TypeError(annotation: object) -> None:
    def f(a): ...  # type: ignore[no-untyped-def]

    f.__annotations__ = {"a": annotation}
    with pytest.raises(TypeError, match=r"tool 'f' parameter 'a': (unsupported|dict keys)"):
        tool(f)


def test_missing_annotation_raises_TypeError() -> None:
    def f(a, b: int): ...  # type: ignore[no-untyped-def]

    with pytest.raises(TypeError, match="parameter 'a' has no type annotation"):
        tool(f)


def test_var_positional_raises_TypeError() -> None:
    def f(*args: int) -> None: ...

    with pytest.raises(TypeError, match=r"\*args and \*\*kwargs are not supported"):
        tool(f)


def test_var_keyword_raises_TypeError() -> None:
    def f(**kwargs: int) -> None: ...

    with pytest.raises(TypeError, match=r"\*args and \*\*kwargs are not supported"):
        tool(f)


def test_unresolvable_annotation_raises_TypeError() -> None:
    class Local:
        pass

    def f(a: Local) -> None: ...

    with pytest.raises(TypeError, match="cannot resolve the type annotations"):
        tool(f)


def test_positional_only_parameter_raises_TypeError() -> None:
    def f(a: int, /) -> None: ...

    with pytest.raises(TypeError, match="positional-only"):
        tool(f)


# -- the decorator -----------------------------------------------------------------


def test_bare_decorator_uses_function_name_and_defaults() -> None:
    @tool
    def greet(name: str) -> str:
        """Say hello."""
        return f"hello {name}"

    assert isinstance(greet, Tool)
    assert (greet.name, greet.description, greet.timeout, greet.thread) == (
        "greet",
        "Say hello.",
        None,
        False,
    )


def test_decorator_with_options_overrides_name_description_timeout() -> None:
    @tool(name="hello", description="Greets.", timeout=2)
    async def greet(name: str) -> str:
        """Ignored."""
        return name

    assert (greet.name, greet.description, greet.timeout) == ("hello", "Greets.", 2.0)


def test_invalid_tool_name_raises_ValueError() -> None:
    with pytest.raises(ValueError, match="invalid tool name"):
        tool(name="no spaces")(lambda: None)


def test_lambda_needs_a_name() -> None:
    with pytest.raises(ValueError, match="invalid tool name '<lambda>'"):
        tool(lambda: None)


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan")])
def test_bad_timeout_raises_ValueError(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number"):

        @tool(timeout=timeout)
        def f() -> None: ...


def test_thread_with_async_function_raises_ValueError() -> None:
    with pytest.raises(ValueError, match="thread=True needs a synchronous function"):

        @tool(thread=True)
        async def f() -> None: ...


def test_spec_returns_tool_spec() -> None:
    @tool
    def f(a: int) -> None:
        """Do f."""

    assert f.spec() == ToolSpec("f", "Do f.", f.input_schema)


# -- invoking ------------------------------------------------------------------------


async def test_invoke_sync_tool_returns_result() -> None:
    @tool
    def add(a: int, b: int = 1) -> int:
        return a + b

    assert await add.invoke({"a": 2}) == 3
    assert await add.invoke({"a": 2, "b": 5}) == 7


async def test_invoke_async_tool_returns_result() -> None:
    @tool
    async def echo(text: str) -> str:
        await trio.lowlevel.checkpoint()
        return text.upper()

    assert await echo.invoke({"text": "hi"}) == "HI"


async def test_thread_tool_runs_in_a_worker_thread() -> None:
    @tool(thread=True)
    def where() -> int:
        return threading.get_ident()

    assert await where.invoke({}) != threading.get_ident()


async def test_sync_tool_without_thread_runs_in_the_trio_thread() -> None:
    @tool
    def where() -> int:
        return threading.get_ident()

    assert await where.invoke({}) == threading.get_ident()


async def test_enum_argument_arrives_as_member() -> None:
    @tool
    def paint(color: Color, others: list[Color] | None = None) -> tuple[Color, Any]:
        return color, others

    assert await paint.invoke({"color": "green", "others": ["red"]}) == (Color.GREEN, [Color.RED])
    assert await paint.invoke({"color": "red", "others": None}) == (Color.RED, None)


async def test_integral_float_is_accepted_as_integer() -> None:
    @tool
    def double(n: int) -> int:
        return n * 2

    result = await double.invoke({"n": 3.0})
    assert result == 6
    assert type(result) is int


async def test_exception_from_function_propagates_unchanged() -> None:
    @tool
    def boom() -> None:
        raise LookupError("nope")

    with pytest.raises(LookupError, match="nope"):
        await boom.invoke({})


async def test_hand_built_tool_validates_against_its_schema() -> None:
    t = Tool(
        name="hand",
        description="Built by hand.",
        input_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
        function=lambda n=0: n + 1,
    )
    assert await t.invoke({"n": 1}) == 2
    with pytest.raises(ToolInputError, match="argument 'n' must be an integer, not string"):
        await t.invoke({"n": "1"})


# -- input validation ----------------------------------------------------------------


@tool
def _target(
    count: int,
    ratio: float = 1.0,
    flag: bool = False,
    names: list[str] | None = None,
    mode: Literal["a", "b"] = "a",
) -> None:
    """Validation target."""


async def test_missing_required_argument_raises_ToolInputError() -> None:
    with pytest.raises(
        ToolInputError, match="tool '_target': missing required argument 'count'"
    ) as info:
        await _target.invoke({})
    assert (info.value.tool, info.value.argument) == ("_target", "count")


async def test_unknown_argument_raises_ToolInputError() -> None:
    with pytest.raises(ToolInputError, match="unknown argument 'colour'") as info:
        await _target.invoke({"count": 1, "colour": "red"})
    assert info.value.argument == "colour"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"count": "3"}, "argument 'count' must be an integer, not string"),
        ({"count": 1.5}, "argument 'count' must be an integer, not number"),
        ({"count": True}, "argument 'count' must be an integer, not boolean"),
        ({"count": 1, "ratio": "x"}, "argument 'ratio' must be a number, not string"),
        ({"count": 1, "ratio": False}, "argument 'ratio' must be a number, not boolean"),
        ({"count": 1, "flag": 1}, "argument 'flag' must be a boolean, not integer"),
        ({"count": 1, "names": "ab"}, "argument 'names' must be an array or null, not string"),
        ({"count": 1, "names": ["a", 2]}, "argument 'names' item 1 must be a string, not integer"),
        ({"count": 1, "mode": "c"}, "argument 'mode' must be one of 'a', 'b', not 'c'"),
    ],
)
async def test_wrong_type_raises_ToolInputError_naming_the_argument(
    arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(ToolInputError, match=message):
        await _target.invoke(arguments)


async def test_input_that_is_not_an_object_raises_ToolInputError() -> None:
    with pytest.raises(ToolInputError, match="input must be an object, not array"):
        await _target.invoke([1, 2])  # type: ignore[arg-type]


async def test_invalid_input_does_not_call_the_function() -> None:
    calls = []

    @tool
    def f(a: int) -> None:
        calls.append(a)

    with pytest.raises(ToolInputError):
        await f.invoke({"a": "x"})
    assert calls == []


def test_tool_errors_share_a_base() -> None:
    assert issubclass(ToolInputError, ToolError)
    assert issubclass(ToolTimeout, ToolError)
    assert issubclass(UnknownToolError, ToolError)
    assert issubclass(UnknownToolError, KeyError)
    assert issubclass(ToolError, Exception)


# -- timeouts --------------------------------------------------------------------------


async def test_timeout_raises_ToolTimeout_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @tool(timeout=2)
    async def slow() -> str:
        await trio.sleep(10)
        return "done"

    start = trio.current_time()
    with pytest.raises(ToolTimeout, match=r"tool 'slow' timed out after 2\.0 s") as info:
        await slow.invoke({})
    assert trio.current_time() - start == 2.0
    assert (info.value.tool, info.value.timeout) == ("slow", 2.0)


async def test_tool_finishing_before_timeout_returns_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @tool(timeout=2)
    async def quick() -> str:
        await trio.sleep(1.5)
        return "done"

    assert await quick.invoke({}) == "done"


async def test_thread_tool_timeout_abandons_the_thread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = threading.Event()

    @tool(thread=True, timeout=1)
    def blocking() -> str:
        release.wait(10)
        return "late"

    try:
        with pytest.raises(ToolTimeout):
            await blocking.invoke({})
    finally:
        release.set()


async def test_outer_cancellation_is_not_reported_as_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @tool(timeout=5)
    async def slow() -> None:
        await trio.sleep(10)

    with trio.move_on_after(1) as scope:
        await slow.invoke({})
    assert scope.cancelled_caught


# -- the registry ----------------------------------------------------------------------


@tool
def _alpha(x: int) -> int:
    """First."""
    return x


@tool
def _beta(y: str) -> str:
    """Second."""
    return y


def test_registry_holds_tools_in_order() -> None:
    registry = ToolRegistry([_alpha, _beta])
    assert len(registry) == 2
    assert list(registry) == [_alpha, _beta]
    assert "_alpha" in registry
    assert "gamma" not in registry
    assert registry.get("_beta") is _beta


def test_registry_specs_lists_each_tool_spec() -> None:
    registry = ToolRegistry([_alpha, _beta])
    assert registry.specs() == [_alpha.spec(), _beta.spec()]


def test_registry_get_unknown_raises_UnknownToolError() -> None:
    registry = ToolRegistry([_alpha])
    with pytest.raises(UnknownToolError, match=r"unknown tool 'nope' \(available: '_alpha'\)"):
        registry.get("nope")
    with pytest.raises(KeyError):
        registry.get("nope")


def test_registry_duplicate_name_raises_ValueError() -> None:
    registry = ToolRegistry([_alpha])
    with pytest.raises(ValueError, match="a tool named '_alpha' is registered already"):
        registry.add(_alpha)


def test_registry_add_makes_a_tool_of_a_plain_function() -> None:
    registry = ToolRegistry()

    @registry.add
    def shout(text: str) -> str:
        return text.upper()

    assert isinstance(shout, Tool)
    assert registry.get("shout") is shout


async def test_registry_invoke_calls_the_named_tool() -> None:
    registry = ToolRegistry([_alpha])
    assert await registry.invoke("_alpha", {"x": 4}) == 4
    with pytest.raises(UnknownToolError):
        await registry.invoke("nope", {})
