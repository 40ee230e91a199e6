from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import trioflow.builtin
from trioflow.builtin import (
    MAX_EXPRESSION_LENGTH,
    MAX_NESTING_DEPTH,
    CalculationError,
    calculator,
    evaluate,
)
from trioflow.tools import Tool, ToolError, ToolInputError

# -- evaluate ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("25 * 4", 100),
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("(3 + 4) * 2", 14),
        ("10 - 4 - 3", 3),
        ("2 * (3 + (4 - 1))", 12),
        ("-3 + 5", 2),
        ("--3", 3),
        ("+4", 4),
        ("2 * -3", -6),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("-7 % 3", 2),
        ("10 / 4", 2.5),
        ("10 / 2", 5.0),
        ("2 ** 10", 1024),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("(-2) ** 2", 4),
        ("2 ** -1", 0.5),
        ("1.5 + 2.25", 3.75),
        (".5 * 4", 2.0),
        ("1e3 + 1", 1001.0),
        ("  42  ", 42),
        ("123456789012345678901234567890 * 10", 1234567890123456789012345678900),
    ],
)
def test_evaluate_follows_python_precedence_and_values(expression: str, value: float) -> None:
    result = evaluate(expression)
    assert result == value
    assert type(result) is type(value)


def test_caret_is_power() -> None:
    assert evaluate("2^10") == 1024
    assert evaluate("2 ^ 3 ^ 2") == 512


def test_times_divide_and_minus_signs_are_accepted() -> None:
    assert evaluate("3 \u00d7 4 \u00f7 2") == 6.0
    assert evaluate("5 \u2212 7") == -2


@pytest.mark.parametrize("expression", ["1 / 0", "1 // 0", "5 % 0", "1.5 / 0.0", "0 ** -1"])
def test_division_by_zero_raises_CalculationError(expression: str) -> None:
    with pytest.raises(CalculationError, match=r"^division by zero$"):
        evaluate(expression)


@pytest.mark.parametrize(
    ("expression", "message", "position"),
    [
        ("2 +", "unexpected end of expression at position 4", 4),
        ("2 + * 3", "unexpected '*' at position 5", 5),
        ("(1 + 2", "missing ')' for the '(' at position 1", 1),
        ("1 + 2)", "unexpected ')' at position 6", 6),
        ("2(3)", "unexpected '(' at position 2", 2),
        ("1 2", "unexpected '2' at position 3", 3),
        ("1 & 2", "unexpected character '&' at position 3", 3),
        ("x + 1", "unexpected character 'x' at position 1", 1),
        ("()", "unexpected ')' at position 2", 2),
    ],
)
def test_syntax_error_reports_position(expression: str, message: str, position: int) -> None:
    with pytest.raises(CalculationError, match=re.escape(message)) as info:
        evaluate(expression)
    assert info.value.position == position


@pytest.mark.parametrize("expression", ["", "   "])
def test_empty_expression_raises_CalculationError(expression: str) -> None:
    with pytest.raises(CalculationError, match="empty expression"):
        evaluate(expression)


def test_too_long_expression_raises_CalculationError() -> None:
    expression = "1+" * (MAX_EXPRESSION_LENGTH // 2) + "1"
    with pytest.raises(CalculationError, match="expression is too long"):
        evaluate(expression)


def test_longest_allowed_expression_is_evaluated() -> None:
    expression = "1+" * ((MAX_EXPRESSION_LENGTH - 1) // 2) + "1"
    assert len(expression) <= MAX_EXPRESSION_LENGTH
    assert evaluate(expression) == (MAX_EXPRESSION_LENGTH - 1) // 2 + 1


def test_deep_nesting_raises_CalculationError() -> None:
    depth = MAX_NESTING_DEPTH + 1
    with pytest.raises(CalculationError, match="nested too deeply"):
        evaluate("(" * depth + "1" + ")" * depth)
    with pytest.raises(CalculationError, match="nested too deeply"):
        evaluate("-" * depth + "1")


def test_nesting_at_the_limit_is_evaluated() -> None:
    depth = MAX_NESTING_DEPTH - 1
    assert evaluate("(" * depth + "1" + ")" * depth) == 1


def test_huge_exponent_raises_CalculationError() -> None:
    with pytest.raises(CalculationError, match="exponent is too large"):
        evaluate("2 ** 100000")


@pytest.mark.parametrize("expression", ["10 ** 5000", "9 ** 9999", "2.0 ** 5000", "1e300 * 1e300"])
def test_huge_result_raises_CalculationError(expression: str) -> None:
    with pytest.raises(CalculationError, match="result is too large"):
        evaluate(expression)


def test_huge_number_literal_raises_CalculationError() -> None:
    with pytest.raises(CalculationError, match="number at position 1 is too large"):
        evaluate("1e999")


def test_fractional_power_of_negative_number_raises_CalculationError() -> None:
    with pytest.raises(CalculationError, match="not a real number"):
        evaluate("(-8) ** 0.5")


def test_evaluate_rejects_non_string() -> None:
    with pytest.raises(TypeError):
        evaluate(42)  # type: ignore[arg-type]


def test_calculation_error_is_a_tool_error() -> None:
    assert issubclass(CalculationError, ToolError)


def test_calculator_module_never_runs_code() -> None:
    source = Path(trioflow.builtin.__file__).read_text(encoding="utf-8")
    assert re.search(r"\b(eval|exec|compile)\b", source) is None


# -- property: the parser agrees with Python's arithmetic ----------------------------

_ATOM, _POWER, _UNARY, _MUL, _ADD = 5, 4, 3, 2, 1
_MAX_BITS = trioflow.builtin.MAX_RESULT_BITS


class _Failure(str):
    pass


_ZERO = _Failure("division by zero")
_BIG = _Failure("too large")

_BINARY: dict[str, tuple[int, Callable[[Any, Any], Any]]] = {
    "+": (_ADD, operator.add),
    "-": (_ADD, operator.sub),
    "*": (_MUL, operator.mul),
    "/": (_MUL, operator.truediv),
    "//": (_MUL, operator.floordiv),
    "%": (_MUL, operator.mod),
}


@dataclasses.dataclass(frozen=True)
class _Expr:
    """An expression's text, built alongside its value (or the failure it must raise)."""

    text: str
    value: int | float | _Failure
    precedence: int


def _settle(compute: Callable[[], Any]) -> int | float | _Failure:
    try:
        value = compute()
    except ZeroDivisionError:
        return _ZERO
    except OverflowError:
        return _BIG
    if isinstance(value, int) and value.bit_length() > _MAX_BITS:
        return _BIG
    if isinstance(value, float) and not math.isfinite(value):
        return _BIG
    assert isinstance(value, (int, float))
    return value


def _wrap(e: _Expr, parenthesize: bool) -> str:
    return f"({e.text})" if parenthesize else e.text


def _binary(args: tuple[_Expr, str, _Expr, str]) -> _Expr:
    left, op, right, space = args
    precedence, function = _BINARY[op]
    text = f"{_wrap(left, left.precedence < precedence)}{space}{op}{space}"
    text += _wrap(right, right.precedence <= precedence)
    if isinstance(left.value, _Failure):
        value: int | float | _Failure = left.value
    elif isinstance(right.value, _Failure):
        value = right.value
    else:
        a, b = left.value, right.value
        value = _settle(lambda: function(a, b))
    return _Expr(text, value, precedence)


def _negate(e: _Expr) -> _Expr:
    value = e.value if isinstance(e.value, _Failure) else -e.value
    return _Expr("-" + _wrap(e, e.precedence < _UNARY), value, _UNARY)


def _power(args: tuple[_Expr, int, str]) -> _Expr:
    base, exponent, spelling = args
    text = f"{_wrap(base, base.precedence <= _POWER)}{spelling}{exponent}"
    if isinstance(base.value, _Failure):
        return _Expr(text, base.value, _POWER)
    b = base.value
    return _Expr(text, _settle(lambda: b**exponent), _POWER)


def _extend(children: st.SearchStrategy[_Expr]) -> st.SearchStrategy[_Expr]:
    return st.one_of(
        st.tuples(
            children, st.sampled_from(list(_BINARY)), children, st.sampled_from(["", " "])
        ).map(_binary),
        children.map(_negate),
        st.tuples(children, st.integers(-2, 3), st.sampled_from(["**", "^", " ** "])).map(_power),
    )


_expressions = st.recursive(
    st.integers(0, 60).map(lambda n: _Expr(str(n), n, _ATOM)), _extend, max_leaves=12
)


@given(_expressions)
def test_evaluate_agrees_with_python_arithmetic(expr: _Expr) -> None:
    assume(expr.value is not _BIG)
    if expr.value is _ZERO:
        with pytest.raises(CalculationError, match="division by zero"):
            evaluate(expr.text)
    else:
        result = evaluate(expr.text)
        assert result == expr.value
        assert type(result) is type(expr.value)


# -- the calculator tool -------------------------------------------------------------


def test_calculator_is_a_tool_named_calculator() -> None:
    assert isinstance(calculator, Tool)
    assert calculator.name == "calculator"
    assert calculator.description.startswith("Do arithmetic, exactly for whole numbers.")


def test_calculator_schema() -> None:
    schema = calculator.input_schema
    assert schema["required"] == ["operation"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["operation"]["enum"] == [
        "add",
        "subtract",
        "multiply",
        "divide",
        "power",
        "evaluate",
    ]
    assert schema["properties"]["a"]["type"] == ["number", "null"]
    assert schema["properties"]["expression"]["type"] == ["string", "null"]
    assert all("description" in p for p in schema["properties"].values())


@pytest.mark.parametrize(
    ("operation", "a", "b", "value"),
    [
        ("add", 12, 30, 42),
        ("subtract", 5, 8, -3),
        ("multiply", 25, 4, 100),
        ("multiply", 2.5, 4, 10),
        ("divide", 100, 4, 25),
        ("divide", 10, 4, 2.5),
        ("power", 2, 10, 1024),
        ("power", 4, 0.5, 2),
    ],
)
async def test_calculator_operations(operation: str, a: float, b: float, value: float) -> None:
    result = await calculator.invoke({"operation": operation, "a": a, "b": b})
    assert result == value
    assert type(result) is type(value)


async def test_calculator_evaluate_returns_int_when_integral() -> None:
    result = await calculator.invoke({"operation": "evaluate", "expression": "100 / 4"})
    assert result == 25
    assert type(result) is int


async def test_calculator_evaluate_keeps_large_exact_ints() -> None:
    result = await calculator.invoke({"operation": "evaluate", "expression": "2 ^ 100"})
    assert result == 2**100


async def test_calculator_keeps_floats_beyond_exact_range() -> None:
    result = await calculator.invoke({"operation": "multiply", "a": 1e300, "b": 10})
    assert result == 1e301
    assert type(result) is float


async def test_calculator_divide_by_zero_raises_CalculationError() -> None:
    with pytest.raises(CalculationError, match=r"^division by zero$"):
        await calculator.invoke({"operation": "divide", "a": 1, "b": 0})


async def test_calculator_missing_operand_raises_CalculationError() -> None:
    with pytest.raises(CalculationError, match="operation 'add' needs both 'a' and 'b'"):
        await calculator.invoke({"operation": "add", "a": 1})


async def test_calculator_missing_expression_raises_CalculationError() -> None:
    with pytest.raises(CalculationError, match="operation 'evaluate' needs an 'expression'"):
        await calculator.invoke({"operation": "evaluate"})


async def test_calculator_unknown_operation_raises_ToolInputError() -> None:
    with pytest.raises(ToolInputError, match="argument 'operation' must be one of"):
        await calculator.invoke({"operation": "sqrt", "a": 4})


async def test_calculator_non_finite_operand_raises_CalculationError() -> None:
    with pytest.raises(CalculationError, match="operand 'a' must be a finite number"):
        await calculator.invoke({"operation": "add", "a": math.inf, "b": 1})


async def test_calculator_huge_power_raises_CalculationError() -> None:
    with pytest.raises(CalculationError, match="exponent is too large"):
        await calculator.invoke({"operation": "power", "a": 2, "b": 1e6})
