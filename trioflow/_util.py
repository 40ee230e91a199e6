"""Small private helpers shared by several modules."""

from __future__ import annotations

from types import TracebackType

__all__ = ["collapse_single_group"]


class collapse_single_group:  # lower case: used as a function, `with collapse_single_group():`
    """Re-raise a lone exception out of the exception group a nursery wrapped it in.

    Context managers that own a nursery (``open_event_bus``, ``executor.stream``)
    run the caller's block inside it. Their own tasks never raise, so a group
    with a single exception carries the caller's own error: re-raise it bare,
    as if no nursery were there. Groups of several exceptions pass unchanged.
    (A class, not a generator: it is on every connection's path.)
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(error, BaseExceptionGroup):
            inner = error.exceptions
            if len(inner) == 1 and not isinstance(inner[0], BaseExceptionGroup):
                exc = inner[0]
                raise exc from exc.__cause__
