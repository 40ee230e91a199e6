"""The work queue of runs: :func:`submit`, and the scripts workers take runs with.

A submitted run is a record (``pending``, see :class:`~trioflow.redis.RedisRunStore`)
and an entry ``run`` = its id on the queue stream (:attr:`Keys.queue
<trioflow.redis.Keys.queue>`), read by the consumer group :data:`QUEUE_GROUP`.
A worker *takes* an entry with one script (:data:`_TAKE_SCRIPT`): it
acknowledges and deletes the entry and, if the run is still ``pending``,
claims it (a new epoch), counts the attempt and starts its lease, all
atomically: an entry delivered twice never runs twice.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import coredis.exceptions

from trioflow.redis._store import _CREATE_SCRIPT, FORGET_APPROVALS_LUA, new_run_id
from trioflow.requests import RunRequest

if TYPE_CHECKING:
    from trioflow.redis._store import RedisRunStore

__all__ = ["QUEUE_GROUP", "submit"]

QUEUE_GROUP = "workers"
"""The consumer group of the queue stream: every worker reads as one consumer of it."""

_RETRY_FIELD = "max_attempts"
"""The member of a submitted request that is the run's retry policy (not a RunRequest field)."""

_SOURCE_FIELD = "source"
"""The member of a submitted request naming where it came from (``"http"``, ``"ws"``): the
run's ``metadata["source"]`` (not a RunRequest field)."""

_THREAD_FIELD = "thread_id"
_MESSAGES_FIELD = "messages"
"""The member of a submitted request naming the thread the run continues
(:class:`~trioflow.redis.RedisThreads`; begun by the submitter, not a RunRequest field)."""

_SUBMIT_SCRIPT = (
    _CREATE_SCRIPT.removesuffix("return 1\n")
    + """
-- then KEYS[3]: the queue; ARGV[5]: the most attempts the run may have
redis.call('HSET', KEYS[1], 'max_attempts', ARGV[5])
redis.call('XADD', KEYS[3], '*', 'run', ARGV[1])
return 1
"""
)
"""The record's creation (the store's script), then the run's retry policy and its queue entry."""
assert _SUBMIT_SCRIPT.count("return 1") == 1, "the store's create script changed its ending"

_NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""
"""Lua: ``now``, Redis's clock in seconds (leases are timed by the server, not the clients)."""

_REQUEUE_LUA = """
redis.call('HSET', KEYS[1], 'status', 'pending', 'owner', '', 'updated_at', tostring(now))
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'run', ARGV[1])
"""
"""Lua: back on the queue (KEYS: record, queue, leases; ARGV[1]: the run id), epoch already bumped."""

_TAKE_SCRIPT = (
    """
-- KEYS[1]: the run's record, KEYS[2]: the queue, KEYS[3]: the leases
-- ARGV[1]: the run id, ARGV[2]: the group, ARGV[3]: the entry id, ARGV[4]: owner, ARGV[5]: lease
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return false end
"""
    + _NOW_LUA
    + """
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
"""
    + FORGET_APPROVALS_LUA
    + """
redis.call('HSET', KEYS[1], 'owner', ARGV[4], 'status', 'running', 'updated_at', tostring(now))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[1])
local cancel = redis.call('HMGET', KEYS[1], 'cancel_reason', 'cancel_mode')
return {epoch, attempt, cancel[1] or '', cancel[2] or ''}
"""
)
"""Take a queue entry: ack and delete it; claim its run if ``pending`` (epoch, attempt, lease).

Returns nil when the run is not ``pending`` (taken already, finished,
expired), else ``{epoch, attempt, cancel_reason, cancel_mode}``."""

_HANDBACK_SCRIPT = (
    """
-- KEYS[1]: the run's record, KEYS[2]: the queue, KEYS[3]: the leases
-- ARGV[1]: the run id, ARGV[2]: the epoch of the worker handing it back
local f = redis.call('HMGET', KEYS[1], 'epoch', 'status')
if f[1] ~= ARGV[2] or f[2] ~= 'running' then return 0 end
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
"""
    + _NOW_LUA
    + _REQUEUE_LUA
    + "return 1\n"
)
"""Hand a run back: if the caller still holds it, fence the caller (epoch + 1) and re-queue it."""

_HEARTBEAT_SCRIPT = (
    """
-- KEYS[1]: the leases, KEYS[2..]: the runs' records
-- ARGV[1]: the lease in seconds, then per run: its id, the worker's epoch
"""
    + _NOW_LUA
    + """
local out = {}
for i = 2, #KEYS do
  local id, epoch = ARGV[2 * i - 2], ARGV[2 * i - 1]
  local f = redis.call('HMGET', KEYS[i], 'epoch', 'cancel_reason', 'cancel_mode')
  if f[1] ~= epoch then
    out[#out + 1] = {0, f[1] or '-1', ''}
  else
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
    out[#out + 1] = {1, f[2] or '', f[3] or ''}
  end
end
return out
"""
)
"""Renew the leases of a worker's runs; per run ``{1, cancel_reason, cancel_mode}``, or
``{0, current_epoch, ''}`` when the worker was fenced off (``-1``: the record is gone)."""


_LEAVE_SCRIPT = """
-- KEYS[1]: the queue; ARGV[1]: the group, ARGV[2]: the consumer
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
"""Remove a stopping worker's consumer from the group, unless entries wait in its pending list."""


def _text(value: object) -> str:
    """A reply's value as text (scripts answer bytes and ints)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_request(request: Mapping[str, Any]) -> tuple[RunRequest, int]:
    """A submitted request as a :class:`~trioflow.requests.RunRequest`, and its ``max_attempts``.

    ``max_attempts`` is 1 unless the request gives it; a ``source`` member
    (a string: where the request came from), a ``thread_id`` (a string:
    the thread the run continues) and ``messages`` (a list: the conversation
    the run continues without a thread, as :meth:`Message.to_dict
    <trioflow.models.Message.to_dict>` makes each) are accepted and left to the caller.

    Raises:
        ValueError: not a valid ``POST /runs`` body, or ``max_attempts`` is not an int >= 1.
    """
    attempts = request.get(_RETRY_FIELD, 1)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"{_RETRY_FIELD} must be an integer >= 1, not {attempts!r}")
    source = request.get(_SOURCE_FIELD, "queue")
    if not isinstance(source, str):
        raise ValueError(f"{_SOURCE_FIELD} must be a string, not {source!r}")
    thread_id = request.get(_THREAD_FIELD, "")
    if not isinstance(thread_id, str):
        raise ValueError(f"{_THREAD_FIELD} must be a string, not {thread_id!r}")
    messages = request.get(_MESSAGES_FIELD, [])
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"{_MESSAGES_FIELD} must be a list, not {messages!r}")
    parsed = RunRequest.parse(
        request, ignore=frozenset({_RETRY_FIELD, _SOURCE_FIELD, _THREAD_FIELD, _MESSAGES_FIELD})
    )
    return parsed, attempts


async def submit(
    store: RedisRunStore,
    request: Mapping[str, Any],
    *,
    run_id: str | None = None,
    capacity: int = 4096,
) -> str:
    """Record a run (``pending``, with ``request``) and put it on the work queue, atomically.

    One round trip (one script): the run's record and index entry, as
    :meth:`RedisRunStore.create <trioflow.redis.RedisRunStore.create>` makes
    them, and its entry on the queue, which a worker (:func:`open_worker
    <trioflow.redis.open_worker>`) takes.

    Args:
        store: the runs' store.
        request: the JSON of a ``POST /runs`` body (:class:`trioflow.web.RunRequest`:
            ``task``, ``timeout``, ``max_iterations``, ``on_disconnect``,
            ``model``, ``system``, ``max_tokens``, ``temperature``,
            ``metadata``), optionally ``max_attempts`` (default 1): how many
            times the run may be started when its worker is lost (see
            :func:`~trioflow.redis.reap`), ``source`` (default
            ``"queue"``): the run's ``metadata["source"]``, and
            ``thread_id``: the thread the run continues, which the caller
            has begun with ``run_id`` (:meth:`RedisThreads.begin
            <trioflow.redis.RedisThreads.begin>`); the worker reads its
            messages and ends it.
        run_id: the run's id; a new one (:func:`~trioflow.redis.new_run_id`) by default.
        capacity: the most events its history retains.

    Returns:
        The run's id.

    Raises:
        ValueError: ``request`` is not a valid run request, a run with that
            id exists already, or ``capacity`` < 0.
        coredis.exceptions.RedisError: Redis failed.
    """
    if capacity < 0:
        raise ValueError(f"history capacity must be >= 0, not {capacity}")
    _, attempts = parse_request(request)
    rid = run_id or new_run_id()
    keys = store.keys
    body = json.dumps(dict(request), separators=(",", ":"))
    script = store.client.register_script(_SUBMIT_SCRIPT)
    try:
        await script(
            [keys.run(rid), keys.index, keys.queue],
            [rid, repr(time.time()), capacity, body, attempts],
        )
    except coredis.exceptions.ResponseError as exc:
        if str(exc).startswith("EXISTS"):
            raise ValueError(f"a run with id {rid!r} exists already") from None
        raise
    return rid


async def ensure_group(store: RedisRunStore) -> None:
    """Create the queue's consumer group (and the stream) unless it exists.

    The group starts at the stream's beginning: runs submitted before any
    worker existed are read too.

    Raises:
        coredis.exceptions.RedisError: Redis failed.
    """
    with contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError):
        await store.client.xgroup_create(store.keys.queue, QUEUE_GROUP, "0", mkstream=True)
