"""Named events: ``on_...`` names for event types, the Langflow and PHP ``registerEvent`` layer.

A bus's :class:`NamedEvents` maps names such as ``"on_token"`` to the event
types they stand for; :meth:`~trioflow.bus.EventBus.register_event` and
:meth:`~trioflow.bus.EventBus.emit_named` use it. :data:`DEFAULT_EVENTS` and
:data:`STREAMING_EVENTS` are presets of names (documented in
:mod:`trioflow.bus`, which exports them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from trioflow.events import EventType, validate_event_type

DEFAULT_EVENTS: Final[Mapping[str, str]] = {
    "on_token": EventType.TOKEN_RECEIVED,
    "on_end": EventType.FLOW_COMPLETED,
    "on_error": EventType.ERROR,
    "on_add_message": EventType.ADD_MESSAGE,
    "on_remove_message": EventType.REMOVE_MESSAGE,
    "on_build_start": EventType.BUILD_START,
    "on_build_end": EventType.BUILD_END,
    "on_vertex_started": EventType.VERTEX_STARTED,
    "on_end_vertex": EventType.END_VERTEX,
    "on_vertices_sorted": EventType.VERTICES_SORTED,
    "on_log": EventType.INFO,
    "on_warning": EventType.WARNING,
}

STREAMING_EVENTS: Final[Mapping[str, str]] = {
    "on_token": EventType.TOKEN_RECEIVED,
    "on_message": EventType.ADD_MESSAGE,
    "on_end": EventType.FLOW_COMPLETED,
    "on_error": EventType.ERROR,
}


class NamedEvents:
    """The names registered on one bus, each for an event type."""

    __slots__ = ("_types",)

    def __init__(self) -> None:
        self._types: dict[str, str] = {}

    def register(self, name: str, type: str) -> str:
        """Give event ``type`` the name ``name``; return the type, checked.

        Raises:
            ValueError: ``name`` does not start with ``on_`` or is not an identifier,
                or ``type`` is invalid.
        """
        if not (isinstance(name, str) and name.startswith("on_") and name.isidentifier()):
            raise ValueError(
                f"event name {name!r} must be an identifier starting with 'on_' (e.g. 'on_token')"
            )
        checked = self._types[name] = validate_event_type(type)
        return checked

    def type_of(self, name: str) -> str:
        """The type registered as ``name``.

        Raises:
            KeyError: nothing is registered as ``name``.
        """
        try:
            return self._types[name]
        except KeyError:
            raise KeyError(
                f"no event registered as {name!r}; known: {sorted(self._types) or 'none'}"
            ) from None

    def types(self) -> frozenset[str]:
        """The types that have a name."""
        return frozenset(self._types.values())

    def as_dict(self) -> dict[str, str]:
        """The names and the types they stand for (a copy)."""
        return dict(self._types)
