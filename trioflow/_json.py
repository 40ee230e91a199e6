r"""Decoding JSON from untrusted sources: request bodies, WebSocket messages, recordings.

:func:`loads` is :func:`json.loads` with the limits an input from outside
needs: no ``NaN``/``Infinity`` (not JSON), a bound on nesting (CPython's
decoder raises ``RecursionError`` on deep input, and every later walk of a
deep value risks it again), and, by default, no lone surrogates in strings
(``"\\ud800"`` decodes to a ``str`` that cannot be encoded as UTF-8 again, so
it would fail every later encoding of the value, far from its source).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_DEPTH", "InvalidJSON", "json_type", "loads"]

MAX_DEPTH = 64
"""The deepest nesting of arrays and objects :func:`loads` accepts by default."""


class InvalidJSON(ValueError):
    """The text is not JSON that :func:`loads` accepts; the message says why."""


def _reject_constant(name: str) -> object:
    raise InvalidJSON(f"{name} is not valid JSON")


def _check(value: Any, max_depth: int, unicode: bool) -> None:
    """Raise :exc:`InvalidJSON` if ``value`` nests deeper than ``max_depth`` or holds a lone surrogate."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if unicode and not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidJSON("a string is not valid Unicode (a lone surrogate)") from None
            continue
        if isinstance(item, dict):
            children: Any = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= max_depth:
            raise InvalidJSON(f"nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH, unicode: bool = True) -> Any:
    r"""Decode one JSON value from ``text`` (``bytes`` must be UTF-8).

    Args:
        text: the JSON document.
        max_depth: the deepest nesting of arrays and objects accepted (a
            scalar has depth 0, ``[1]`` depth 1).
        unicode: refuse strings (keys or values) holding a lone surrogate
            (``"\\ud800"``), which no UTF-8 encoder accepts.

    Returns:
        The decoded value.

    Raises:
        InvalidJSON: ``text`` is not valid UTF-8 or JSON, holds ``NaN`` or
            ``Infinity``, nests deeper than ``max_depth`` (never
            ``RecursionError``), or (with ``unicode``) holds a lone surrogate.
    """
    try:
        decoded = not isinstance(text, str)
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8")  # valid UTF-8: no raw lone surrogate
        value = json.loads(text, parse_constant=_reject_constant)
    except InvalidJSON:
        raise
    except RecursionError:
        raise InvalidJSON(f"nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidJSON(str(exc)) from None
    # The walk only when the text could fail it (scans at C speed; most
    # documents, such as an event's JSON, need none): a lone surrogate comes
    # from a \u escape (or, in a str, raw), and nesting needs brackets.
    if (unicode and ("\\u" in text or (not decoded and not _encodable(text)))) or (
        text.count("[") + text.count("{") > max_depth
    ):
        _check(value, max_depth, unicode)
    return value


def _encodable(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (holds no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_type(value: object) -> str:
    """What JSON calls ``value``'s type, for error messages: ``"an object"``, ``"null"``, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
