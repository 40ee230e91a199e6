"""Read-only containers for event payloads: :class:`FrozenDict`, :class:`FrozenList`.

An event is delivered to every subscriber as one shared object, so its
``data`` must not change under them: :func:`freeze` copies a payload into
read-only containers, deeply. They subclass :class:`dict` and :class:`list`,
so reading them, comparing them with plain dicts and lists, ``isinstance``
checks, :mod:`json` (at C speed, with no ``default`` hook), :mod:`pickle`
and :mod:`copy` all work as before; every method that would change them
raises :exc:`TypeError`.

What is frozen: mappings become :class:`FrozenDict`, lists
:class:`FrozenList`, tuples stay tuples of frozen items, sets become
:class:`frozenset`. Strings, numbers, ``None`` and other objects (a
dataclass, an exception) are kept as they are: they are immutable, or the
emitter's to keep unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

__all__ = ["FrozenDict", "FrozenList", "freeze", "freeze_data", "thaw"]

_MESSAGE = "event data is read-only (shared by every subscriber): copy it first, e.g. {}"


class FrozenDict(dict[str, Any]):
    """A :class:`dict` whose mutating methods raise :exc:`TypeError`.

    Build one with :func:`freeze` (which also freezes the values); a copy
    (``dict(d)``, ``{**d}``, ``d | other``) is an ordinary, mutable dict.
    """

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(_MESSAGE.format("dict(event.data)"))

    def __setitem__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def __delitem__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def __ior__(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[misc]
        self._readonly()

    def clear(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def pop(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def popitem(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def setdefault(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def __copy__(self) -> FrozenDict:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


class FrozenList(list[Any]):
    """A :class:`list` whose mutating methods raise :exc:`TypeError`.

    Build one with :func:`freeze`; ``list(x)`` or ``x + [...]`` is an
    ordinary, mutable list.
    """

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(_MESSAGE.format("list(...)"))

    def __setitem__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def __delitem__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def __iadd__(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[misc]
        self._readonly()

    def __imul__(self, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[misc]
        self._readonly()

    def append(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def extend(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def insert(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def pop(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def remove(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def clear(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def sort(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def reverse(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._readonly()

    def __copy__(self) -> FrozenList:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenList, (list(self),))

    def __repr__(self) -> str:
        return f"FrozenList({list.__repr__(self)})"


# Values that need no freezing: checked by exact type first, the fast path.
_FLAT: frozenset[type] = frozenset(
    {str, int, float, bool, type(None), FrozenDict, FrozenList, bytes, frozenset}
)

EMPTY: FrozenDict = FrozenDict()
"""The shared empty payload."""


def freeze(value: Any) -> Any:
    """``value`` with every mapping, list and set inside it made read-only (a copy).

    Already frozen containers are returned as they are.
    """
    cls = type(value)
    if cls in _FLAT:
        return value
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList([freeze(v) for v in value])
    if isinstance(value, tuple):
        if cls is tuple:
            return tuple([freeze(v) for v in value])
        return value  # a named tuple: its fields cannot be assigned
    if isinstance(value, (set, frozenset)):
        return frozenset(value)
    return value


def freeze_data(data: Mapping[str, Any]) -> FrozenDict:
    """A read-only deep copy of an event's ``data`` (the same object if already frozen).

    Flat payloads (strings, numbers, ``None`` as values) cost one dict copy
    and one pass over the values; nested ones are copied as deep as they go.
    """
    # On the bus's hot path: the names are bound locally (no global look-ups).
    frozen_dict, flat = FrozenDict, _FLAT
    if type(data) is frozen_dict:
        return data
    frozen = frozen_dict(data)
    for value in frozen.values():
        if type(value) not in flat:
            return frozen_dict({k: freeze(v) for k, v in frozen.items()})
    return frozen


def thaw(value: Any) -> Any:
    """A mutable deep copy of a frozen value: plain dicts and lists again."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [thaw(v) for v in value]
    if type(value) is tuple:
        return tuple(thaw(v) for v in value)
    return value
