"""Services: a :class:`ServiceManager` creates, shares and tears down trioflow's services.

Services are registered by
name (a :class:`ServiceType` or any string) with a factory, created lazily
on first :meth:`~ServiceManager.get`, each once, with their dependencies
resolved on the way, and torn down in reverse creation order when the
manager closes::

    async with ServiceManager() as services:
        executor = await services.get(ServiceType.FLOW_EXECUTOR)
        run = await executor.start(agent, "What is 25 * 4?")

A factory takes the manager (so it can ``await services.get(...)`` what it
depends on) and returns the service, directly or as an awaitable. When what
it returns is an async context manager, the manager enters it and the
service is what ``__aenter__`` returns: that is how services that own tasks
or connections (an event bus, an executor) live, in a task of the
manager's nursery, until the manager exits them in reverse creation order.

The default registrations (``ServiceManager(defaults=False)`` for none):

=================  ==================================================================
service            what
=================  ==================================================================
``settings``       :meth:`Settings.from_env() <trioflow.settings.Settings.from_env>`
                   (or the ``settings`` given to the manager)
``cache``          a :class:`~trioflow.cache.MemoryCache` sized by the settings
``telemetry``      a :class:`~trioflow.telemetry.Telemetry` on the global
                   OpenTelemetry providers, with its own Prometheus-read meter
                   provider when ``settings.metrics`` is set
``tracing``        the telemetry's OpenTelemetry tracer
``event_manager``  an event bus for every run's events (``open_event_bus``), with
                   the telemetry listening when ``settings.telemetry`` is set and
                   OpenTelemetry is installed
``flow_executor``  a :class:`~trioflow.StreamingFlowExecutor` publishing to the
                   event manager, open (``start()`` needs no nursery)
``storage``        a :class:`MemoryStorage`
=================  ==================================================================

Scripts that want a process-wide default wrap their program in
:func:`open_default_services` and call :func:`current_services` anywhere
inside it; nothing requires it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import importlib.util
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, overload, runtime_checkable

import trio

from trioflow._util import collapse_single_group
from trioflow.bus import EventBus, open_event_bus
from trioflow.cache import Cache, MemoryCache
from trioflow.executor import StreamingFlowExecutor
from trioflow.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from trioflow.telemetry import Telemetry

__all__ = [
    "Factory",
    "MemoryStorage",
    "ServiceCycleError",
    "ServiceError",
    "ServiceManager",
    "ServiceName",
    "ServiceNotFound",
    "ServiceType",
    "Storage",
    "current_services",
    "open_default_services",
]


class ServiceType(enum.StrEnum):
    """The built-in services. Any other string names a custom service."""

    SETTINGS = "settings"
    """The :class:`~trioflow.settings.Settings`."""
    CACHE = "cache"
    """A :class:`~trioflow.cache.Cache`."""
    TELEMETRY = "telemetry"
    """A :class:`~trioflow.telemetry.Telemetry`."""
    TRACING = "tracing"
    """An OpenTelemetry ``Tracer``."""
    EVENT_MANAGER = "event_manager"
    """An :class:`~trioflow.EventBus` that carries every run's events."""
    FLOW_EXECUTOR = "flow_executor"
    """A :class:`~trioflow.StreamingFlowExecutor`."""
    STORAGE = "storage"
    """A :class:`Storage`."""


ServiceName: TypeAlias = ServiceType | str
"""A service's name: a :class:`ServiceType` or a custom string."""

Factory: TypeAlias = Callable[["ServiceManager"], Any]
"""Makes a service: ``factory(services)`` returns the service, an awaitable of
it, or an async context manager the manager enters (the service is what
``__aenter__`` returns)."""


class ServiceError(Exception):
    """The base of this module's errors."""


class ServiceNotFound(ServiceError, KeyError):
    """No service is registered under that name (also a :class:`KeyError`).

    Attributes:
        name: the name looked up.
    """

    def __init__(self, name: str, known: Any = ()) -> None:
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(f"no service registered as {name!r} (registered: {listed})")
        self.name = name

    def __str__(self) -> str:
        # KeyError.__str__ would quote the message.
        return str(self.args[0])


class ServiceCycleError(ServiceError):
    """Services depend on each other in a cycle, so none of them can be created.

    Attributes:
        cycle: the names along the cycle, the first repeated at the end
            (``("settings", "cache", "settings")``).
    """

    def __init__(self, cycle: tuple[str, ...]) -> None:
        super().__init__("service dependency cycle: " + " -> ".join(cycle))
        self.cycle = cycle


# -- storage -------------------------------------------------------------------------------


@runtime_checkable
class Storage(Protocol):
    """A small key/value store: what the ``storage`` service provides.

    Values are whatever the implementation can keep (anything for
    :class:`MemoryStorage`; a networked store would want JSON-compatible
    values). Unlike a :class:`~trioflow.cache.Cache`, nothing expires.
    """

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        ...

    async def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, replacing any value there."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        ...

    async def keys(self, prefix: str = "") -> list[str]:
        """The keys that start with ``prefix``, sorted."""
        ...


class MemoryStorage:
    """An in-memory :class:`Storage`: a dict behind async methods.

    Values are kept as they are, not copied.
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"MemoryStorage({len(self._data)} keys)"

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        await trio.lowlevel.checkpoint()
        return self._data.get(key, default)

    async def set(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``.

        Raises:
            TypeError: ``key`` is not a string.
        """
        if not isinstance(key, str):
            raise TypeError(f"storage keys are strings, not {type(key).__name__}")
        await trio.lowlevel.checkpoint()
        self._data[key] = value

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        await trio.lowlevel.checkpoint()
        return self._data.pop(key, _ABSENT) is not _ABSENT

    async def keys(self, prefix: str = "") -> list[str]:
        """The keys that start with ``prefix``, sorted."""
        await trio.lowlevel.checkpoint()
        return sorted(k for k in self._data if k.startswith(prefix))


_ABSENT: Any = object()


# -- the manager ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False, slots=True)
class _Registration:
    factory: Factory | None
    instance: Any = _ABSENT  # an override's ready instance (never entered nor closed)


@dataclasses.dataclass(eq=False, slots=True)
class _Pending:
    """A service being created: who waits for it, and what its creation waits on."""

    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    waiting_on: str | None = None


@dataclasses.dataclass(eq=False, slots=True)
class _Holder:
    """The task that keeps a context-manager service entered until told to stop."""

    stop: trio.Event = dataclasses.field(default_factory=trio.Event)
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    error: Exception | None = None


# The services being created along this task's chain of nested get() calls.
_resolving: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "trioflow_services_resolving", default=()
)


def _key(name: ServiceName) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a service name is a ServiceType or a non-empty str, not {name!r}")
    return str(name)


class ServiceManager:
    """Creates services lazily from factories, shares them, and tears them down in order.

    Use it as an async context manager; services are available inside the
    block only. On exit, the services that are async context managers are
    exited one at a time, newest first, also when the block raised or was
    cancelled (each service then exits under that cancellation).

    Args:
        settings: the settings service's value; ``None`` reads them from the
            environment when first needed (:meth:`Settings.from_env`).
        defaults: register the built-in services (see the module's table).

    Raises:
        TypeError: ``settings`` is not a :class:`~trioflow.settings.Settings`.
    """

    def __init__(self, *, settings: Settings | None = None, defaults: bool = True) -> None:
        if settings is not None and not isinstance(settings, Settings):
            raise TypeError(f"settings must be a Settings, not {type(settings).__name__}")
        self._registrations: dict[str, _Registration] = {}
        self._instances: dict[str, Any] = {}
        self._order: list[str] = []
        self._pending: dict[str, _Pending] = {}
        self._holders: dict[str, _Holder] = {}
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._lifetime: AbstractAsyncContextManager[ServiceManager] | None = None
        if defaults:
            for name, factory in _DEFAULT_FACTORIES.items():
                self._registrations[name] = _Registration(factory)
        if settings is not None:
            self._registrations[ServiceType.SETTINGS] = _Registration(None, settings)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._nursery else "not open"
        return f"<ServiceManager {state} created={self._order}>"

    # -- registry --------------------------------------------------------------------------

    def register(self, name: ServiceName, factory: Factory, *, replace: bool = False) -> None:
        """Register ``factory`` to make the service ``name``.

        Args:
            name: a :class:`ServiceType` or a custom name.
            factory: see :data:`Factory`.
            replace: replace a registration of the same name (one not
                created yet).

        Raises:
            ValueError: ``name`` is registered already and ``replace`` is false.
            RuntimeError: the service was created already.
            TypeError: ``factory`` is not callable, or ``name`` is not a name.
        """
        key = _key(name)
        if not callable(factory):
            raise TypeError(f"the factory of service {key!r} is not callable")
        self._check_replaceable(key, replace=replace)
        self._registrations[key] = _Registration(factory)

    def override(
        self, name: ServiceName, instance: Any = _ABSENT, *, factory: Factory | None = None
    ) -> None:
        """Replace the service ``name`` with a ready ``instance`` or another ``factory``.

        Meant for tests. An instance is returned as it is by :meth:`get`:
        the manager neither enters nor closes it, its owner does.

        Raises:
            TypeError: both or neither of ``instance`` and ``factory`` were given.
            RuntimeError: the service was created already.
        """
        key = _key(name)
        if (instance is _ABSENT) == (factory is None):
            raise TypeError("override() takes an instance or a factory=..., not both or neither")
        if factory is not None and not callable(factory):
            raise TypeError(f"the factory of service {key!r} is not callable")
        self._check_replaceable(key, replace=True)
        self._registrations[key] = _Registration(factory, instance)

    def _check_replaceable(self, key: str, *, replace: bool) -> None:
        if key in self._instances or key in self._pending:
            raise RuntimeError(f"service {key!r} was created already; it cannot be replaced now")
        if key in self._registrations and not replace:
            raise ValueError(
                f"a service is registered as {key!r} already (use replace=True or override())"
            )

    def has(self, name: ServiceName) -> bool:
        """Whether a service is registered as ``name`` (created or not)."""
        return _key(name) in self._registrations

    @property
    def registered(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._registrations)

    @property
    def created(self) -> tuple[str, ...]:
        """The names of the services created so far, oldest first."""
        return tuple(self._order)

    # -- getting -----------------------------------------------------------------------------

    @overload
    async def get(self, name: Literal[ServiceType.SETTINGS]) -> Settings: ...
    @overload
    async def get(self, name: Literal[ServiceType.CACHE]) -> Cache: ...
    @overload
    async def get(self, name: Literal[ServiceType.TELEMETRY]) -> Telemetry: ...
    @overload
    async def get(self, name: Literal[ServiceType.TRACING]) -> Tracer: ...
    @overload
    async def get(self, name: Literal[ServiceType.EVENT_MANAGER]) -> EventBus: ...
    @overload
    async def get(self, name: Literal[ServiceType.FLOW_EXECUTOR]) -> StreamingFlowExecutor: ...
    @overload
    async def get(self, name: Literal[ServiceType.STORAGE]) -> Storage: ...
    @overload
    async def get(self, name: str) -> Any: ...

    async def get(self, name: ServiceName) -> Any:
        """The service ``name``, created (with its dependencies) on first use.

        Concurrent calls for a service being created wait for that creation:
        each service is created once. If its creation fails, the error
        propagates to the caller that ran the factory, nothing is kept, and
        the next call tries again.

        Returns:
            The service.

        Raises:
            ServiceNotFound: nothing is registered as ``name``.
            ServiceCycleError: the service depends on itself, directly or not.
            RuntimeError: the manager is not open yet.
            trio.ClosedResourceError: the manager is closed or closing.
            Exception: whatever the factory raised.
        """
        key = _key(name)
        while True:
            self._check_open()
            if key in self._instances:
                await trio.lowlevel.checkpoint()
                return self._instances[key]
            chain = _resolving.get()
            if key in chain:
                raise ServiceCycleError((*chain[chain.index(key) :], key))
            registration = self._registrations.get(key)
            if registration is None:
                raise ServiceNotFound(key, self._registrations)
            parent = self._pending.get(chain[-1]) if chain else None
            pending = self._pending.get(key)
            if pending is None:
                return await self._create(key, registration, chain, parent)
            # Another task is creating it: wait, unless that creation waits on us.
            self._check_wait_cycle(key, chain)
            if parent is not None:
                parent.waiting_on = key
            try:
                await pending.done.wait()
            finally:
                if parent is not None:
                    parent.waiting_on = None

    def _check_wait_cycle(self, key: str, chain: tuple[str, ...]) -> None:
        path = [key]
        pending = self._pending.get(key)
        while pending is not None and pending.waiting_on is not None:
            nxt = pending.waiting_on
            path.append(nxt)
            if nxt in chain:
                raise ServiceCycleError((*chain[chain.index(nxt) :], *path))
            if len(path) > len(self._pending) + 1:
                return  # a cycle not through us: its own members will see it
            pending = self._pending.get(nxt)

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the ServiceManager is closed")
        if self._nursery is None:
            raise RuntimeError(
                "the ServiceManager is not open: use 'async with ServiceManager() as services:'"
            )

    async def _create(
        self,
        key: str,
        registration: _Registration,
        chain: tuple[str, ...],
        parent: _Pending | None,
    ) -> Any:
        pending = self._pending[key] = _Pending()
        if parent is not None:
            parent.waiting_on = key
        token = _resolving.set((*chain, key))
        try:
            if registration.instance is not _ABSENT:
                await trio.lowlevel.checkpoint()
                value = registration.instance
            else:
                assert registration.factory is not None
                value = registration.factory(self)
                if inspect.isawaitable(value):
                    value = await value
                if isinstance(value, AbstractAsyncContextManager):
                    value = await self._enter(key, value)
            self._instances[key] = value
            self._order.append(key)
            return value
        finally:
            _resolving.reset(token)
            if parent is not None:
                parent.waiting_on = None
            del self._pending[key]
            pending.done.set()

    async def _enter(self, key: str, manager: AbstractAsyncContextManager[Any]) -> Any:
        assert self._nursery is not None
        holder = _Holder()
        value = await self._nursery.start(self._hold, manager, holder, name=f"service {key}")
        self._holders[key] = holder
        if self._closed:  # the manager began closing while this service was created
            del self._holders[key]
            holder.scope.cancel()
            holder.stop.set()
            with trio.CancelScope(shield=True):
                await holder.done.wait()
            raise trio.ClosedResourceError("the ServiceManager is closed")
        return value

    @staticmethod
    async def _hold(
        manager: AbstractAsyncContextManager[Any],
        holder: _Holder,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Until started, the caller of get() can cancel the entering. Once the
        # service is in use, only the manager's teardown ends it (holder.stop,
        # or holder.scope.cancel() for a prompt exit), so that services exit
        # one at a time, newest first; the service's own internal cancellations
        # still work, being inside the context manager.
        try:
            with holder.scope:
                async with manager as value:
                    holder.scope.shield = True
                    task_status.started(value)
                    await holder.stop.wait()
        except Exception as exc:
            if not holder.stop.is_set():
                raise  # the service crashed while in use: the manager's block fails
            holder.error = exc
        finally:
            holder.done.set()

    # -- lifetime ------------------------------------------------------------------------------

    async def __aenter__(self) -> ServiceManager:
        if self._lifetime is not None:
            raise RuntimeError("a ServiceManager can be entered only once")
        self._lifetime = self._open()
        return await self._lifetime.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._lifetime is not None
        return await self._lifetime.__aexit__(*exc_info)

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[ServiceManager]:
        errors: list[tuple[str, Exception]] = []
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    yield self
                except BaseException as exc:
                    # Cancelled, KeyboardInterrupt...: services exit promptly, still in order.
                    cancel = not isinstance(exc, Exception)
                    for name, error in await self._teardown(cancel=cancel):
                        exc.add_note(f"tearing down service {name!r} also failed: {error!r}")
                    raise
                errors = await self._teardown(cancel=False)
        if len(errors) == 1:
            raise errors[0][1]
        if errors:
            raise ExceptionGroup(
                "tearing down services failed: " + ", ".join(n for n, _ in errors),
                [e for _, e in errors],
            )

    async def _teardown(self, *, cancel: bool) -> list[tuple[str, Exception]]:
        """Exit the entered services one at a time, newest first; return their errors.

        With ``cancel``, each exits under cancellation (promptly). Otherwise
        each exits normally; if this task is cancelled meanwhile, the rest
        exit under cancellation, still in order, and the cancellation is
        re-raised at the end.
        """
        self._closed = True
        errors: list[tuple[str, Exception]] = []
        cancelled: trio.Cancelled | None = None
        while self._holders:
            key = next(k for k in reversed(self._order) if k in self._holders)
            holder = self._holders.pop(key)
            if cancel or cancelled is not None:
                holder.scope.cancel()
            holder.stop.set()
            if not holder.done.is_set() and not (cancel or cancelled is not None):
                try:
                    await holder.done.wait()
                except trio.Cancelled as exc:
                    cancelled = exc
                    holder.scope.cancel()
            with trio.CancelScope(shield=True):
                await holder.done.wait()  # prompt: it is done, or its scope is cancelled
            if holder.error is not None:
                errors.append((key, holder.error))
        if cancelled is not None:
            raise cancelled
        return errors


# -- the default factories ---------------------------------------------------------------


async def _settings(services: ServiceManager) -> Settings:
    await trio.lowlevel.checkpoint()
    return Settings.from_env()


async def _cache(services: ServiceManager) -> MemoryCache:
    settings = await services.get(ServiceType.SETTINGS)
    return MemoryCache(max_size=settings.cache_size, ttl=settings.cache_ttl)


async def _telemetry(services: ServiceManager) -> AbstractAsyncContextManager[Telemetry]:
    settings = await services.get(ServiceType.SETTINGS)
    from trioflow.telemetry import open_telemetry

    return open_telemetry(metrics=settings.metrics)


async def _tracing(services: ServiceManager) -> Tracer:
    telemetry = await services.get(ServiceType.TELEMETRY)
    return telemetry.tracer


def _opentelemetry_installed() -> bool:
    return importlib.util.find_spec("opentelemetry") is not None


@asynccontextmanager
async def _open_event_manager(services: ServiceManager) -> AsyncIterator[EventBus]:
    settings = await services.get(ServiceType.SETTINGS)
    telemetry = None
    if settings.telemetry and _opentelemetry_installed():
        telemetry = await services.get(ServiceType.TELEMETRY)
    async with open_event_bus(history=settings.history_size, name="events") as bus:
        if telemetry is not None:
            telemetry.attach(bus)
        yield bus


def _event_manager(services: ServiceManager) -> AbstractAsyncContextManager[EventBus]:
    return _open_event_manager(services)


async def _flow_executor(services: ServiceManager) -> StreamingFlowExecutor:
    settings = await services.get(ServiceType.SETTINGS)
    bus = await services.get(ServiceType.EVENT_MANAGER)
    # An async context manager: the manager enters it, so start() needs no nursery.
    return StreamingFlowExecutor(bus=bus, history=settings.history_size, timeout=settings.timeout)


def _storage(services: ServiceManager) -> MemoryStorage:
    return MemoryStorage()


_DEFAULT_FACTORIES: Mapping[str, Factory] = {
    ServiceType.SETTINGS: _settings,
    ServiceType.CACHE: _cache,
    ServiceType.TELEMETRY: _telemetry,
    ServiceType.TRACING: _tracing,
    ServiceType.EVENT_MANAGER: _event_manager,
    ServiceType.FLOW_EXECUTOR: _flow_executor,
    ServiceType.STORAGE: _storage,
}


# -- the process-wide default ----------------------------------------------------------------

_default: ServiceManager | None = None


@asynccontextmanager
async def open_default_services(
    *, settings: Settings | None = None, defaults: bool = True
) -> AsyncIterator[ServiceManager]:
    """Open a :class:`ServiceManager` and make it the process-wide default for the block.

    Inside the block, :func:`current_services` returns it from anywhere
    (any task, any module), which suits scripts; libraries should take a
    manager as an argument instead.

    Args:
        settings: see :class:`ServiceManager`.
        defaults: see :class:`ServiceManager`.

    Raises:
        RuntimeError: a default is open already (there is one per process).
    """
    global _default
    if _default is not None:
        raise RuntimeError("open_default_services(): a default ServiceManager is open already")
    async with ServiceManager(settings=settings, defaults=defaults) as services:
        _default = services
        try:
            yield services
        finally:
            _default = None


def current_services() -> ServiceManager:
    """The process-wide default :class:`ServiceManager`.

    Returns:
        The manager :func:`open_default_services` opened.

    Raises:
        RuntimeError: no default is open.
    """
    if _default is None:
        raise RuntimeError(
            "no default ServiceManager is open: wrap the program in "
            "'async with open_default_services():' or pass a ServiceManager explicitly"
        )
    return _default
