"""Small private helpers shared by several modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collapse_single_group"]


@contextmanager
def collapse_single_group() -> Iterator[None]:
    """Re-raise a lone exception out of the exception group a nursery wrapped it in.

    Context managers that own a nursery (``open_event_bus``, ``executor.stream``)
    run the caller's block inside it. Their own tasks never raise, so a group
    with a single exception carries the caller's own error: re-raise it bare,
    as if no nursery were there. Groups of several exceptions pass unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        raise
