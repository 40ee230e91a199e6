"""Callback listeners: subscriptions drained by supervised tasks in the bus's nursery.

A :class:`Listener` calls its callback (sync or async) for every event of its
own :class:`~trioflow.bus.Subscription`, in a task of its own, so a slow
listener stalls nobody. :class:`ListenerSupervisor` runs a bus's listeners
under a :class:`~trioflow.RestartPolicy`: a listener that raises is reported
(a ``warning`` event) and restarted, or removed once it has crashed too often
(an ``error`` event), never silently lost.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeAlias

import trio

from trioflow._subscription import SubscriberEvicted, Subscription, SubscriptionStatistics
from trioflow.events import EventType, FlowEvent
from trioflow.protocol import error_info
from trioflow.supervise import Crash, RestartPolicy, SupervisorGaveUp, supervise


class _Reporter(Protocol):
    """What the supervisor needs of its bus: a way to report crashes on it."""

    @property
    def closed(self) -> bool: ...

    def emit_nowait(self, type: str, data: Mapping[str, Any]) -> Any: ...

    async def emit(self, type: str, data: Mapping[str, Any]) -> Any: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ListenerStatistics:
    """A snapshot of one callback listener."""

    id: int
    """The listener id :meth:`EventBus.add_listener` returned."""
    name: str
    """The listener's name (its callable's name by default)."""
    calls: int
    """Events handed to the callback."""
    crashes: int
    """Times the callback raised."""
    restarts: int
    """Times the listener was restarted after a crash."""
    gave_up: bool
    """Whether the restart policy gave up and the listener was removed."""
    running: bool
    """Whether the listener's task is still running."""
    subscription: SubscriptionStatistics
    """Its channel's figures."""


ListenerFn: TypeAlias = Callable[[FlowEvent], Awaitable[object] | object]


class Listener:
    """A callback listener: a subscription drained by a supervised task in the bus's nursery.

    Made by :meth:`EventBus.add_listener`; :meth:`statistics` and
    :meth:`EventBus.remove_listener` are the public surface.
    """

    __slots__ = (
        "_calls",
        "_cancel_scope",
        "_crashes",
        "_done",
        "_fn",
        "_gave_up",
        "_is_async",
        "_restart",
        "_restarts",
        "_sub",
        "id",
        "name",
    )

    def __init__(
        self, lid: int, fn: ListenerFn, sub: Subscription, name: str, restart: RestartPolicy
    ) -> None:
        self.id = lid
        self.name = name
        self._fn = fn
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004
        )
        self._sub = sub
        self._restart = restart
        self._calls = 0
        self._crashes = 0
        self._restarts = 0
        self._gave_up = False
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()

    def statistics(self) -> ListenerStatistics:
        """A snapshot of this listener's figures."""
        return ListenerStatistics(
            id=self.id,
            name=self.name,
            calls=self._calls,
            crashes=self._crashes,
            restarts=self._restarts,
            gave_up=self._gave_up,
            running=not self._done.is_set(),
            subscription=self._sub.statistics(),
        )

    async def _drain(self) -> None:
        sub = self._sub
        fn = self._fn
        while True:
            try:
                batch = await sub.receive_batch()
            except (trio.EndOfChannel, trio.ClosedResourceError, SubscriberEvicted):
                return
            for event in batch:
                self._calls += 1
                if self._is_async:
                    await fn(event)  # type: ignore[misc]
                else:
                    result = fn(event)
                    if inspect.isawaitable(result):
                        await result


class ListenerSupervisor:
    """A bus's listeners: starts, supervises, stops and counts them.

    Crashes are reported on the bus itself, without ever waiting on the
    crashing listener's own full channel.
    """

    __slots__ = ("_bus", "_default_restart", "_finished", "_nursery", "_running", "crashes")

    def __init__(self, bus: _Reporter, nursery: trio.Nursery, restart: RestartPolicy) -> None:
        self._bus = bus
        self._nursery = nursery
        self._default_restart = restart
        self._running: dict[int, Listener] = {}
        self._finished: list[Listener] = []
        self.crashes = 0
        """Listener crashes since the bus opened."""

    def start(
        self, fn: ListenerFn, sub: Subscription, name: str, restart: RestartPolicy | None
    ) -> int:
        """Run ``fn`` on the events of ``sub`` in a new supervised task; return its id."""
        listener = Listener(sub.id, fn, sub, name, restart or self._default_restart)
        self._running[listener.id] = listener
        self._nursery.start_soon(self._run, listener, name=f"trioflow listener {name}")
        return listener.id

    def remove(self, listener_id: int) -> None:
        """Stop a running listener now.

        Raises:
            KeyError: no running listener has that id.
        """
        try:
            listener = self._running[listener_id]
        except KeyError:
            raise KeyError(f"no listener with id {listener_id}") from None
        listener._cancel_scope.cancel()
        listener._sub.close()

    def statistics(self) -> tuple[ListenerStatistics, ...]:
        """The running listeners' figures, then the finished ones' (the newest 64)."""
        return tuple(
            lst.statistics() for lst in itertools.chain(self._running.values(), self._finished)
        )

    async def wait(self) -> None:
        """Wait until every running listener has finished."""
        for listener in list(self._running.values()):
            await listener._done.wait()

    async def _run(self, listener: Listener) -> None:
        async def on_crash(crash: Crash) -> None:
            listener._crashes += 1
            self.crashes += 1
            error = error_info(crash.error)
            if crash.giving_up:
                listener._gave_up = True
                await self._report(
                    EventType.ERROR,
                    {
                        "message": f"listener {listener.name!r} removed after {listener._crashes} "
                        "crashes",
                        "listener": listener.name,
                        "error": error,
                    },
                )
            else:
                listener._restarts += 1
                await self._report(
                    EventType.WARNING,
                    {
                        "message": f"listener {listener.name!r} crashed; restarting in "
                        f"{crash.delay:.3g} s",
                        "listener": listener.name,
                        "error": error,
                        "restart": crash.restart,
                        "delay": crash.delay,
                    },
                )

        try:
            with listener._cancel_scope:
                await supervise(
                    listener._drain, listener._restart, name=listener.name, on_crash=on_crash
                )
        except SupervisorGaveUp:
            pass
        finally:
            listener._sub.close()
            listener._done.set()
            self._running.pop(listener.id, None)
            self._finished.append(listener)
            del self._finished[:-64]

    async def _report(self, type: str, data: Mapping[str, Any]) -> None:
        # A crashing listener must not wait on its own full channel: report
        # without blocking, or from a task of its own when a BLOCK subscriber is full.
        if self._bus.closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            self._bus.emit_nowait(type, data)
        except trio.WouldBlock:
            self._nursery.start_soon(self._emit_quietly, type, data)
        await trio.lowlevel.checkpoint()

    async def _emit_quietly(self, type: str, data: Mapping[str, Any]) -> None:
        try:
            await self._bus.emit(type, data)
        except trio.ClosedResourceError:
            pass
