"""Safe arithmetic: :func:`evaluate` and the built-in :data:`calculator` tool.

:func:`evaluate` parses an arithmetic expression with a small recursive-descent
parser and computes it with Python's arithmetic; no text is ever run as
Python code. The grammar, loosest binding first::

    expression := term (("+" | "-") term)*
    term       := unary (("*" | "/" | "//" | "%") unary)*
    unary      := ("+" | "-") unary | power
    power      := atom (("**" | "^") unary)?
    atom       := NUMBER | "(" expression ")"

so precedence and associativity are Python's: ``-2 ** 2`` is ``-4``,
``2 ** -1`` is ``0.5``, ``2 ** 3 ** 2`` is ``512``. People write ``2^10``
meaning a power, so ``^`` *is* ``**`` here (not exclusive or). The
multiplication sign (U+00D7), the division sign (U+00F7) and the minus sign
(U+2212) are accepted for ``*``, ``/`` and ``-``. Numbers are
decimal: ``42``, ``3.5``, ``.5``, ``1e3``; a number with a point or an
exponent is a float, others are ints of any size.

Abuse is bounded: at most :data:`MAX_EXPRESSION_LENGTH` characters,
:data:`MAX_NESTING_DEPTH` levels of parentheses and unary signs, exponents of
magnitude at most :data:`MAX_EXPONENT`, and results below about ``10**1000``
(:data:`MAX_RESULT_BITS`) for ints, finite for floats. Anything else raises
:class:`CalculationError`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

from trioflow.tools import ToolError, tool

__all__ = [
    "MAX_EXPONENT",
    "MAX_EXPRESSION_LENGTH",
    "MAX_NESTING_DEPTH",
    "MAX_RESULT_BITS",
    "CalculationError",
    "calculator",
    "evaluate",
]

MAX_EXPRESSION_LENGTH = 1000
"""The longest expression :func:`evaluate` accepts, in characters."""
MAX_NESTING_DEPTH = 100
"""How deep parentheses and unary signs may nest."""
MAX_EXPONENT = 10_000
"""The largest magnitude of an exponent."""
MAX_RESULT_BITS = 3322
"""The largest int result (and intermediate value), in bits: about 1000 decimal digits."""

Number = int | float


class CalculationError(ToolError):
    """An expression is malformed, or its value cannot be computed.

    Attributes:
        position: for a syntax error, the 1-based position in the expression
            where it was found; otherwise ``None``.
    """

    def __init__(self, message: str, *, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


# -- tokens ----------------------------------------------------------------------

_TIMES, _DIVIDE, _MINUS = "\u00d7", "\u00f7", "\u2212"
# One token per match; "bad" catches any other character, so the matches of
# re.finditer are contiguous and only trailing white space is left unmatched.
_TOKEN_PATTERN = (
    r"\s*(?:(?P<num>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    rf"|(?P<op>\*\*|//|[-+*/%^(){_TIMES}{_DIVIDE}{_MINUS}])|(?P<bad>\S))"
)
_SPELLINGS = {"^": "**", _TIMES: "*", _DIVIDE: "/", _MINUS: "-"}
_END = "end"


@dataclasses.dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "num", "op" or "end"
    text: str  # the operator in its canonical spelling, or the number's digits
    position: int  # 1-based


def _tokenize(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    for match in re.finditer(_TOKEN_PATTERN, expression):
        kind = match.lastgroup
        if kind == "bad":
            position = match.start("bad") + 1
            raise CalculationError(
                f"unexpected character {match.group('bad')!r} at position {position}",
                position=position,
            )
        assert kind is not None
        text = match.group(kind)
        tokens.append(_Token(kind, _SPELLINGS.get(text, text), match.start(kind) + 1))
    tokens.append(_Token(_END, "", len(expression.rstrip()) + 1))
    return tokens


# -- syntax tree -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Negate:
    operand: _Node


@dataclasses.dataclass(frozen=True, slots=True)
class _Power:
    base: _Node
    exponent: _Node


@dataclasses.dataclass(frozen=True, slots=True)
class _Chain:
    """A left-associative run such as ``a - b + c``, flat so evaluating it needs no recursion."""

    first: _Node
    rest: tuple[tuple[str, _Node], ...]


_Node = int | float | _Negate | _Power | _Chain


class _Parser:
    __slots__ = ("depth", "index", "tokens")

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def unexpected(self, token: _Token) -> CalculationError:
        if token.kind == _END:
            return CalculationError(
                f"unexpected end of expression at position {token.position} "
                "(expected a number or '(')",
                position=token.position,
            )
        return CalculationError(
            f"unexpected {token.text!r} at position {token.position}", position=token.position
        )

    def parse(self) -> _Node:
        node = self.expression()
        token = self.peek()
        if token.kind != _END:
            raise self.unexpected(token)
        return node

    # expression and term loop over their operators rather than recursing, so
    # each level of parentheses costs five frames and a long sum costs none.

    def expression(self) -> _Node:
        first = self.term()
        rest: list[tuple[str, _Node]] = []
        while (token := self.peek()).kind == "op" and token.text in _ADDITIVE:
            self.index += 1
            rest.append((token.text, self.term()))
        return _Chain(first, tuple(rest)) if rest else first

    def term(self) -> _Node:
        first = self.unary()
        rest: list[tuple[str, _Node]] = []
        while (token := self.peek()).kind == "op" and token.text in _MULTIPLICATIVE:
            self.index += 1
            rest.append((token.text, self.unary()))
        return _Chain(first, tuple(rest)) if rest else first

    def unary(self) -> _Node:
        self.depth += 1
        if self.depth > MAX_NESTING_DEPTH:
            position = self.peek().position
            raise CalculationError(
                f"expression is nested too deeply at position {position} "
                f"(at most {MAX_NESTING_DEPTH} levels)",
                position=position,
            )
        token = self.peek()
        if token.kind == "op" and token.text in ("+", "-"):
            self.index += 1
            operand = self.unary()
            node: _Node = _Negate(operand) if token.text == "-" else operand
        else:
            node = self.power()
        self.depth -= 1
        return node

    def power(self) -> _Node:
        base = self.atom()
        token = self.peek()
        if token.kind == "op" and token.text == "**":
            self.index += 1
            return _Power(base, self.unary())
        return base

    def atom(self) -> _Node:
        token = self.advance()
        if token.kind == "num":
            return _number(token)
        if token.text == "(":
            node = self.expression()
            if self.peek().text != ")":
                closing = self.peek()
                if closing.kind == _END:
                    raise CalculationError(
                        f"missing ')' for the '(' at position {token.position}",
                        position=token.position,
                    )
                raise self.unexpected(closing)
            self.index += 1
            return node
        raise self.unexpected(token)


_ADDITIVE = frozenset({"+", "-"})
_MULTIPLICATIVE = frozenset({"*", "/", "//", "%"})


def _number(token: _Token) -> Number:
    text = token.text
    if "." in text or "e" in text or "E" in text:
        value = float(text)
        if not math.isfinite(value):
            raise CalculationError(
                f"number at position {token.position} is too large", position=token.position
            )
        return value
    return _checked(int(text))


# -- arithmetic ------------------------------------------------------------------


def _checked(value: object) -> Number:
    if isinstance(value, int):
        if value.bit_length() > MAX_RESULT_BITS:
            raise CalculationError("result is too large")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise CalculationError("result is too large")
    else:  # complex: a negative number to a fractional power
        raise CalculationError("result is not a real number")
    return value


def _binary(op: str, a: Number, b: Number) -> Number:
    try:
        if op == "+":
            result = a + b
        elif op == "-":
            result = a - b
        elif op == "*":
            result = a * b
        elif op == "/":
            result = a / b
        elif op == "//":
            result = a // b
        else:
            result = a % b
    except ZeroDivisionError:
        raise CalculationError("division by zero") from None
    except OverflowError:
        raise CalculationError("result is too large") from None
    return _checked(result)


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculationError(f"exponent is too large (at most {MAX_EXPONENT} in magnitude)")
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and (base.bit_length() - 1) * exponent > MAX_RESULT_BITS
    ):
        raise CalculationError("result is too large")
    try:
        result = base**exponent
    except ZeroDivisionError:
        raise CalculationError("division by zero") from None
    except OverflowError:
        raise CalculationError("result is too large") from None
    return _checked(result)


def _evaluate(node: _Node) -> Number:
    if isinstance(node, (int, float)):
        return node
    if isinstance(node, _Chain):
        value = _evaluate(node.first)
        for op, operand in node.rest:
            value = _binary(op, value, _evaluate(operand))
        return value
    if isinstance(node, _Negate):
        return -_evaluate(node.operand)
    return _power(_evaluate(node.base), _evaluate(node.exponent))


def evaluate(expression: str) -> int | float:
    """Compute an arithmetic expression, safely.

    See the module documentation for the grammar and limits. The value
    follows Python's arithmetic: ``/`` gives a float (``"10 / 2"`` is
    ``5.0``), ``//`` and ``%`` floor, and an expression of ints alone gives
    an int of exact value.

    Args:
        expression: the expression, such as ``"(3 + 4) * 2"`` or ``"2^10"``.

    Returns:
        The value, an ``int`` or a ``float``.

    Raises:
        CalculationError: the expression is empty, too long, nested too
            deeply or malformed (the message and :attr:`~CalculationError.position`
            say where); it divides by zero (message ``"division by zero"``);
            an exponent or the result is too large; or the result is not real.
        TypeError: ``expression`` is not a string.
    """
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a str, not {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise CalculationError(
            f"expression is too long ({len(expression)} characters; "
            f"the limit is {MAX_EXPRESSION_LENGTH})"
        )
    if not expression.strip():
        raise CalculationError("empty expression")
    return _evaluate(_Parser(_tokenize(expression)).parse())


# -- the tool --------------------------------------------------------------------

_EXACT_FLOAT_LIMIT = 2**53


def _tidy(value: Number) -> Number:
    """Give an integral float as an int (only where floats are exact, below 2**53)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT_FLOAT_LIMIT:
        return int(value)
    return value


def _operand(name: str, value: float | None, operation: str) -> Number:
    if value is None:
        raise CalculationError(f"operation {operation!r} needs both 'a' and 'b' (missing {name!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculationError(f"operand {name!r} must be a finite number, not {value!r}")
    return value


_OPERATORS = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}


@tool(name="calculator")
def calculator(
    operation: Literal["add", "subtract", "multiply", "divide", "power", "evaluate"],
    a: float | None = None,
    b: float | None = None,
    expression: str | None = None,
) -> int | float:
    """Do arithmetic, exactly for whole numbers.

    Use operation "evaluate" with an expression such as "(3 + 4) * 2" or
    "2^10" (operators: + - * / // % and ** or ^ for powers, with
    parentheses), or one of add, subtract, multiply, divide and power with
    the operands a and b. Returns the number; a whole number comes back as
    an integer.

    Args:
        operation: What to do: add, subtract, multiply, divide, power (a to
            the power b) or evaluate (the expression).
        a: The first operand, for every operation but evaluate.
        b: The second operand, for every operation but evaluate.
        expression: The arithmetic expression, for operation evaluate.

    Returns:
        The value: an ``int`` when it is a whole number below 2**53 in
        magnitude (``100``, not ``100.0``), else a ``float``; for "evaluate",
        an int result of any size (up to :data:`MAX_RESULT_BITS`) stays exact.

    Raises:
        CalculationError: an operand or the expression is missing for the
            operation, the expression is malformed or too long, it divides by
            zero ("division by zero"), or the result is too large or not real.
    """
    if operation == "evaluate":
        if expression is None:
            raise CalculationError("operation 'evaluate' needs an 'expression'")
        return _tidy(evaluate(expression))
    x = _operand("a", a, operation)
    y = _operand("b", b, operation)
    if operation == "power":
        return _tidy(_power(x, y))
    return _tidy(_binary(_OPERATORS[operation], x, y))
