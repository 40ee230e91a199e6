"""Conditional streaming: event filters as predicates, named presets, filtered iteration."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from types import MappingProxyType

from trioflow.bus import EventFilter
from trioflow.events import TERMINAL_TYPES, EventType, FlowEvent, check_event_types

__all__ = ["PRESETS", "event_predicate", "filter_events", "preset"]


def _types(*types: str) -> frozenset[str]:
    return frozenset(str(t) for t in types)


_ERRORS = _types(
    EventType.ERROR, EventType.FLOW_FAILED, EventType.ITERATION_FAILED, EventType.TOOL_FAILED
)

PRESETS: Mapping[str, frozenset[str] | None] = MappingProxyType(
    {
        "essential": _types(
            EventType.TOKEN_RECEIVED,
            EventType.TOKEN_CHUNK,
            EventType.TOOL_COMPLETED,
            EventType.TOOL_FAILED,
            EventType.ERROR,
            *TERMINAL_TYPES,
        ),
        "minimal": _ERRORS | TERMINAL_TYPES,
        "progress": _types(
            EventType.FLOW_STARTED,
            EventType.FLOW_PAUSED,
            EventType.FLOW_RESUMED,
            EventType.ITERATION_STARTED,
            EventType.ITERATION_COMPLETED,
            EventType.ITERATION_FAILED,
            EventType.STEP_STARTED,
            EventType.STEP_COMPLETED,
            EventType.TOOL_STARTED,
            EventType.TOOL_COMPLETED,
            EventType.TOOL_FAILED,
            EventType.PROGRESS_UPDATE,
            EventType.WARNING,
            EventType.ERROR,
            *TERMINAL_TYPES,
        ),
        "verbose": None,
    }
)
"""Named event filters for conditional streaming, each usable as ``types=``.

* ``essential``: what a reader of the answer needs: the text
  (``token.received``, ``token.chunk``), tool results (``tool.completed``,
  ``tool.failed``; not ``tool.started``), ``error`` and the terminal events.
* ``minimal``: only the outcome: the terminal events, ``error`` and every
  built-in ``*.failed`` type.
* ``progress``: the run's life without its text, for dashboards: ``flow.*``,
  ``iteration.*``, ``step.*``, ``tool.*``, ``progress.update``, ``warning``
  and ``error``.
* ``verbose``: everything (``None``).
"""


def preset(name: str) -> frozenset[str] | None:
    """The event filter named ``name`` in :data:`PRESETS`.

    The result is a set of event types, or ``None`` for every event, and goes
    straight into ``types=`` of :meth:`trioflow.EventBus.subscribe`,
    :meth:`trioflow.Run.subscribe`, :meth:`trioflow.EventBus.add_listener`,
    :meth:`trioflow.StreamingFlowExecutor.stream` or :func:`filter_events`::

        async with run.subscribe(types=preset("essential")) as events: ...

    Raises:
        KeyError: no preset has that name; the message lists the known ones.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"no event preset named {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None


def _accept_all(event: FlowEvent) -> bool:
    return True


def event_predicate(types: EventFilter) -> Callable[[FlowEvent], bool]:
    """Turn an :data:`~trioflow.EventFilter` into a predicate on events.

    Args:
        types: ``None`` for every event, one event type, a collection of
            types (a :func:`preset`, :data:`~trioflow.TERMINAL_TYPES`, ...),
            or a predicate (returned as it is).

    Returns:
        A function ``event -> bool`` that says whether ``types`` selects the event.

    Raises:
        TypeError: a type name in ``types`` is not a string.
        ValueError: a type name is invalid or unknown: not an
            :class:`~trioflow.EventType` value nor a registered custom type
            (:func:`trioflow.register_event_type`). The message lists the
            valid names, and says which type replaced an old PHP or
            Langflow short name (``"token"``, ``"tool_end"``, ...).
    """
    if types is None:
        return _accept_all
    if isinstance(types, str):
        (wanted,) = check_event_types((types,))
        return lambda event: event.type == wanted
    if callable(types):
        return types
    selected = check_event_types(types)
    return lambda event: event.type in selected


async def filter_events(
    events: AsyncIterable[FlowEvent], types: EventFilter
) -> AsyncIterator[FlowEvent]:
    """Yield the events of ``events`` that ``types`` selects, in order.

    For streams that take no ``types=`` of their own, such as a
    :func:`trioflow.recording.replay` or :func:`coalesce_tokens` stream
    (a bus subscription filters better with ``types=``, before buffering)::

        async for event in filter_events(stream, preset("minimal")): ...

    Args:
        events: any async iterable of events.
        types: an :data:`~trioflow.EventFilter` (see :func:`event_predicate`).

    Returns:
        An async iterator of the selected events. Whatever ``events`` raises
        propagates unchanged.

    Raises:
        TypeError, ValueError: a type name in ``types`` is invalid or unknown
            (see :func:`event_predicate`; raised on the first iteration).
    """
    accepts = event_predicate(types)
    async for event in events:
        if accepts(event):
            yield event
