"""Connecting to Redis: :func:`open_redis`, and the start-up check of its eviction policy."""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import coredis.exceptions

from trioflow._util import collapse_single_group

__all__ = ["EVICTING_POLICY_WARNING", "check_eviction_policy", "open_redis", "redis_client"]

_log = logging.getLogger("trioflow.redis")

_SCHEMES = frozenset({"redis", "rediss", "unix"})

EVICTING_POLICY_WARNING = (
    "Redis maxmemory-policy is %r: under memory pressure Redis may evict the keys of "
    "runs (histories and records) silently; set 'maxmemory-policy noeviction'"
)
"""The warning logged (``trioflow.redis`` logger) when the server may evict keys."""


def redis_client(url: str, **options: Any) -> coredis.Redis[bytes]:
    """A :class:`coredis.Redis` client for ``url``, not yet connected (bytes replies).

    ``url`` is ``redis://[user:password@]host:port/db`` (``rediss://`` for
    TLS) or ``unix:///path/to/redis.sock`` (``?db=N`` for a database other
    than 0). ``options`` go to :meth:`coredis.Redis.from_url` (timeouts,
    ``max_connections``, ...). Prefer :func:`open_redis`, which also
    connects, checks the server and closes the client.

    Raises:
        ValueError: ``url`` has another scheme, or no host or path.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, not {url!r}")
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"a unix:// Redis URL needs a socket path (unix:///path), not {url!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"a Redis URL needs a host (redis://host:port/db), not {url!r}")
    return coredis.Redis.from_url(url, decode_responses=False, **options)


async def check_eviction_policy(client: coredis.Redis[bytes]) -> str | None:
    """Read the server's ``maxmemory-policy``; log a warning if it lets Redis evict keys.

    Any policy but ``noeviction`` lets Redis drop keys under memory pressure,
    which for trioflow means a run's history or record vanishing while
    clients still resume from it. ``CONFIG`` is disabled on some managed
    services: then nothing is logged but a debug line, and ``None`` returned.

    Returns:
        The policy, or ``None`` when the server would not say.

    Raises:
        coredis.exceptions.ConnectionError: the server cannot be reached.
    """
    try:
        config = await client.config_get(["maxmemory-policy"])
    except coredis.exceptions.ResponseError as exc:  # CONFIG renamed or refused
        _log.debug("could not read Redis maxmemory-policy: %s", exc)
        return None
    raw = config.get(b"maxmemory-policy")
    if raw is None:
        return None
    policy = raw.decode()
    if policy != "noeviction":
        _log.warning(EVICTING_POLICY_WARNING, policy)
    return policy


@asynccontextmanager
async def open_redis(url: str, **options: Any) -> AsyncIterator[coredis.Redis[bytes]]:
    """A connected Redis client for the ``async with`` block; closed on exit.

    The URL forms are those of :func:`redis_client` (``redis://host:port/db``,
    ``unix:///path``). On entry the server's ``maxmemory-policy`` is read
    (:func:`check_eviction_policy`): an evicting policy is logged as a
    warning, as it can silently drop runs. The client runs under Trio
    through anyio; it holds a connection pool, which the block owns.

    Raises:
        ValueError: a malformed URL.
        coredis.exceptions.ConnectionError: the server cannot be reached at start-up.
    """
    client = redis_client(url, **options)
    with collapse_single_group():  # the pool's task group wraps the block's errors
        async with client:
            await check_eviction_policy(client)
            yield client
