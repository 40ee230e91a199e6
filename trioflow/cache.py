"""Caching: the :class:`Cache` interface, :class:`MemoryCache`, and :func:`cached` tools.

A cache maps string keys to values for a time to live (TTL). The
:class:`Cache` protocol is what callers depend on; :class:`MemoryCache` is
the in-memory implementation (least recently used entries go first once it
is full, and entries expire on Trio's clock, so
:class:`trio.testing.MockClock` drives expiry in tests). Another store, such
as Redis, implements the same five methods.

:func:`cached` wraps a :class:`~trioflow.tools.Tool` so that repeated calls
with the same input are answered from a cache::

    calc = cached(calculator, ttl=60.0)
    agent = Agent(tools=[calc])

A cached tool has the name, description and schema of the tool it wraps, so
the model sees no difference. Results are cached, errors are not. Hits and
misses are counted by the cache (:meth:`Cache.statistics`) and reported, by
tool, to the :class:`CacheObserver` given to :func:`cached`, if any: a
:class:`~trioflow.telemetry.Telemetry` is one, counting them on its
``trioflow.cache.hits`` / ``trioflow.cache.misses`` counters. This module
does not import the telemetry.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final, Protocol, runtime_checkable

import trio

from trioflow.tools import Tool

__all__ = [
    "Cache",
    "CacheObserver",
    "CacheStatistics",
    "MemoryCache",
    "cached",
    "tool_cache_key",
]


@dataclasses.dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of a cache's figures: what :meth:`Cache.statistics` returns."""

    hits: int
    """Lookups that found a live entry."""
    misses: int
    """Lookups that found nothing (or an expired entry)."""
    size: int
    """Entries held now (expired ones not yet noticed included)."""
    max_size: int
    """The most entries the cache holds."""
    evictions: int
    """Entries removed to make room for new ones."""
    expired: int
    """Entries found expired and removed."""

    @property
    def hit_rate(self) -> float:
        """Hits as a fraction of lookups (0.0 before the first lookup)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@runtime_checkable
class Cache(Protocol):
    """What trioflow needs from a cache: keyed values with a time to live.

    Keys are strings; values are whatever the implementation can store
    (anything for :class:`MemoryCache`; a networked store would want
    JSON-compatible values). Every method may be called concurrently from
    several tasks.
    """

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when it is absent or expired."""
        ...

    async def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (``None``: the cache's default)."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""
        ...

    async def clear(self) -> None:
        """Remove every entry (the statistics are kept)."""
        ...

    def statistics(self) -> CacheStatistics:
        """A snapshot of the cache's figures."""
        ...


@runtime_checkable
class CacheObserver(Protocol):
    """What a cached tool tells of each of its lookups (see :func:`cached`).

    :class:`~trioflow.telemetry.Telemetry` is one (its
    :meth:`~trioflow.telemetry.Telemetry.record_cache`); anything with this
    method is. It is called in the calling task, between the lookup and the
    tool call on a miss: keep it quick, and let it not raise.
    """

    def record_cache(self, *, hit: bool, tool: str | None = None) -> None:
        """One lookup: ``hit`` tells whether it found a value; ``tool`` is the tool's name."""
        ...


def _check_ttl(ttl: float | None, *, what: str = "ttl") -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ValueError(
            f"{what} must be a positive number of seconds (math.inf for no expiry) or None, "
            f"not {ttl!r}"
        )
    return float(ttl)


class MemoryCache:
    """An in-memory :class:`Cache`: least recently used first out, with a time to live.

    Expiry uses Trio's clock (:func:`trio.current_time`), so the cache must
    be used inside ``trio.run``, and :class:`trio.testing.MockClock` makes
    expiry exact in tests. Expired entries are removed when they are next
    looked up, or when the cache is full and needs room (:meth:`purge`
    removes them all at once). Values are stored as they are, not copied:
    treat what :meth:`get` returns as read-only.

    Args:
        max_size: the most entries held; once full, storing a new key first
            drops expired entries, then the least recently used one.
        ttl: the default time to live in seconds; ``None`` for no expiry.

    Raises:
        ValueError: ``max_size`` is below 1, or ``ttl`` is not positive.
    """

    __slots__ = ("_entries", "_evictions", "_expired", "_hits", "_max_size", "_misses", "_ttl")

    def __init__(self, *, max_size: int = 1024, ttl: float | None = 300.0) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be an int >= 1, not {max_size!r}")
        self._ttl = _check_ttl(ttl)
        self._max_size = max_size
        # key -> (value, expiry on Trio's clock); ordered from least to most recently used.
        self._entries: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expired = 0

    def __repr__(self) -> str:
        return f"MemoryCache(size={len(self._entries)}/{self._max_size}, ttl={self._ttl})"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_size(self) -> int:
        """The most entries held."""
        return self._max_size

    @property
    def ttl(self) -> float | None:
        """The default time to live in seconds; ``None`` for no expiry."""
        return self._ttl

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` when absent or expired.

        A hit makes the entry the most recently used. Counts a hit or a miss
        (an expired entry is a miss, and is removed).

        Returns:
            The value, or ``default``.
        """
        await trio.lowlevel.checkpoint()
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] > trio.current_time():
                self._entries.move_to_end(key)
                self._hits += 1
                return entry[0]
            del self._entries[key]
            self._expired += 1
        self._misses += 1
        return default

    async def set(self, key: str, value: Any, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds.

        Args:
            key: the key.
            value: the value (stored as it is, not copied).
            ttl: seconds to live; ``None`` for the cache's default, ``math.inf``
                for no expiry.

        Raises:
            ValueError: ``ttl`` is not positive.
        """
        ttl = _check_ttl(ttl)
        if ttl is None:
            ttl = self._ttl if self._ttl is not None else math.inf
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        elif len(entries) >= self._max_size:
            self._purge(now)
            while len(entries) >= self._max_size:
                entries.popitem(last=False)
                self._evictions += 1
        entries[key] = (value, now + ttl)

    async def delete(self, key: str) -> bool:
        """Remove ``key``.

        Returns:
            Whether the key was there (expired or not).
        """
        await trio.lowlevel.checkpoint()
        return self._entries.pop(key, None) is not None

    async def clear(self) -> None:
        """Remove every entry; the statistics are kept."""
        await trio.lowlevel.checkpoint()
        self._entries.clear()

    async def purge(self) -> int:
        """Remove every expired entry now.

        Returns:
            How many entries were removed.
        """
        await trio.lowlevel.checkpoint()
        return self._purge(trio.current_time())

    def _purge(self, now: float) -> int:
        dead = [k for k, (_, expires) in self._entries.items() if expires <= now]
        for k in dead:
            del self._entries[k]
        self._expired += len(dead)
        return len(dead)

    def statistics(self) -> CacheStatistics:
        """A snapshot of the cache's figures."""
        return CacheStatistics(
            hits=self._hits,
            misses=self._misses,
            size=len(self._entries),
            max_size=self._max_size,
            evictions=self._evictions,
            expired=self._expired,
        )


# -- cached tools ------------------------------------------------------------------------


def tool_cache_key(name: str, arguments: Mapping[str, Any]) -> str:
    """The cache key of a call of tool ``name`` with ``arguments``.

    The key is ``"tool:<name>:"`` followed by the canonical JSON of the
    arguments (sorted keys, no white space), so the same input always gives
    the same key whatever the order of its keys.

    Returns:
        The key.

    Raises:
        TypeError: the arguments are not JSON-compatible.
    """
    try:
        canonical = json.dumps(
            arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"tool {name!r}: the input cannot be a cache key: {exc}") from exc
    return f"tool:{name}:{canonical}"


_MISS: Final = object()


class _CachedCall:
    """The function of a cached tool: look up, else call the tool and store."""

    __slots__ = ("_cache", "_locks", "_observer", "_tool", "_ttl")

    def __init__(
        self, tool: Tool, cache: Cache, ttl: float | None, observer: CacheObserver | None
    ) -> None:
        self._tool = tool
        self._cache = cache
        self._ttl = ttl
        self._observer = observer
        # One lock per key being computed, so concurrent calls with the same
        # input run the tool once; the lock goes when its last user leaves.
        self._locks: dict[str, tuple[trio.Lock, list[int]]] = {}

    async def __call__(self, **arguments: Any) -> Any:
        key = tool_cache_key(self._tool.name, arguments)
        lock, users = self._locks.setdefault(key, (trio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                value = await self._cache.get(key, _MISS)
                if value is not _MISS:
                    self._record(hit=True)
                    return value
                self._record(hit=False)
                value = await self._tool.invoke(arguments)  # errors propagate, uncached
                await self._cache.set(key, value, ttl=self._ttl)
                return value
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    def _record(self, *, hit: bool) -> None:
        if self._observer is not None:
            self._observer.record_cache(hit=hit, tool=self._tool.name)


def cached(
    tool: Tool,
    cache: Cache | None = None,
    *,
    ttl: float | None = None,
    observer: CacheObserver | None = None,
    telemetry: CacheObserver | None = None,
) -> Tool:
    """A tool that answers repeated calls with the same input from a cache.

    The returned :class:`~trioflow.tools.Tool` has the name, description and
    input schema of ``tool``. A call checks its input against the schema,
    then looks it up (key: :func:`tool_cache_key` of the checked input); on
    a miss it invokes ``tool`` (with its own timeout) and stores the result
    for ``ttl`` seconds. Concurrent calls with the same input wait for the
    first one rather than all calling the tool. Failures are not cached:
    the exception propagates and the next call tries again.

    Args:
        tool: the tool to wrap.
        cache: where results are kept; ``None`` for a new
            :class:`MemoryCache` of this tool's own (default size and TTL).
        ttl: seconds a result lives; ``None`` for the cache's default.
        observer: told of each hit and miss (with this tool's name); a
            :class:`~trioflow.telemetry.Telemetry` counts them on its
            ``trioflow.cache.hits`` / ``trioflow.cache.misses`` counters
            (attribute ``tool``).
        telemetry: the same as ``observer`` (the older name).

    Returns:
        The cached tool.

    Raises:
        TypeError: ``tool`` is not a :class:`~trioflow.tools.Tool`.
        ValueError: ``ttl`` is not positive, or both ``observer`` and
            ``telemetry`` are given.
    """
    if not isinstance(tool, Tool):
        raise TypeError(f"cached() needs a Tool, not {type(tool).__name__}")
    ttl = _check_ttl(ttl)
    if observer is not None and telemetry is not None:
        raise ValueError("cached(): give observer or telemetry (the same thing), not both")
    observer = observer if observer is not None else telemetry
    call = _CachedCall(tool, cache if cache is not None else MemoryCache(), ttl, observer)

    async def function(**arguments: Any) -> Any:
        return await call(**arguments)

    function.__name__ = tool.name
    function.__doc__ = tool.description
    return Tool(
        name=tool.name,
        description=tool.description,
        input_schema=tool.input_schema,
        function=function,
    )
