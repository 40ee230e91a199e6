"""Runs whose worker was lost, and cancels from any process: :func:`reap`, :func:`request_cancel`."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trioflow.events import EventType, FlowEvent
from trioflow.handle import CancelMode, CancelReason, cancel_reason
from trioflow.history import Fenced
from trioflow.redis._queue import _NOW_LUA, _REQUEUE_LUA, _text

if TYPE_CHECKING:
    from trioflow.redis._store import RedisRunStore

__all__ = ["WORKER_LOST", "reap", "request_cancel"]

_log = logging.getLogger("trioflow.redis")

WORKER_LOST = "worker_lost"
"""The ``reason`` of the ``flow.failed`` event of a run whose worker was lost."""

_SCAN_SCRIPT = (
    """
-- KEYS[1]: the leases; ARGV[1]: the most run ids to return
"""
    + _NOW_LUA
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""
)
"""The runs whose lease lapsed (Redis time)."""

_REAP_SCRIPT = (
    """
-- KEYS[1]: the run's record, KEYS[2]: the queue, KEYS[3]: the leases
-- ARGV[1]: the run id, ARGV[2]: the reaper, ARGV[3]: seconds the reaper holds the run
"""
    + _NOW_LUA
    + """
local lapse = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not lapse or tonumber(lapse) > now then return false end
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'max_attempts', 'last_seq',
                     'cancel_reason', 'created_at')
if f[1] ~= 'running' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return false
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
if not f[5] and tonumber(f[2]) < tonumber(f[3] or '1') then
"""
    + _REQUEUE_LUA
    + """
  return {'requeued', epoch, f[4], '', f[6]}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'updated_at', tostring(now))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
return {'end', epoch, f[4], f[5] or '', f[6]}
"""
)
"""Fence a run whose lease lapsed (epoch + 1), then re-queue it or hold it to end it.

Nil when the lease did not lapse (renewed meanwhile) or the run is no
longer running; else ``{outcome, epoch, last_seq, cancel_reason,
created_at}``. A run is re-queued when it was started fewer times than its
``max_attempts`` and nobody asked to cancel it; else the reaper holds it
(a lease of its own, so a reaper lost in turn is reaped too) to write its
terminal event."""

_CANCEL_SCRIPT = """
-- KEYS[1]: the run's record; ARGV: reason, mode, the channel, the message
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'completed' or status == 'failed' or status == 'cancelled' then
  return 0
end
if ARGV[2] == 'after_turn' and redis.call('HGET', KEYS[1], 'cancel_mode') == 'immediate' then
  return 1  -- an immediate cancel is under way already
end
redis.call('HSET', KEYS[1], 'cancel_reason', ARGV[1], 'cancel_mode', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
"""Mark a run to cancel and publish it (an after-turn cancel leaves an immediate one as it is)."""


async def end_run(
    store: RedisRunStore,
    run_id: str,
    *,
    epoch: int,
    type: str,
    data: Mapping[str, Any],
) -> None:
    """Write the one terminal event of a run held under ``epoch`` by someone who does not run it.

    Appended at the run's ``last_seq + 1`` through the fenced append script,
    which sets the final status and the retention TTL; the run's lease is dropped.

    Raises:
        Fenced: someone claimed the run since.
        trio.BrokenResourceError: Redis failed.
        KeyError: no such run.
    """
    async with store.open_history(run_id, epoch=epoch) as history:
        event = FlowEvent.create(type, data, run_id=run_id)
        history.append(dataclasses.replace(event, seq=history.last_seq + 1))
    await store.client.zrem(store.keys.leases, [run_id])


async def reap(store: RedisRunStore, *, limit: int = 100, hold: float = 30.0) -> dict[str, str]:
    """End or re-queue the running runs whose lease lapsed: their worker was lost.

    Every worker runs it periodically (see :func:`~trioflow.redis.open_worker`);
    a serve node may too. For each such run, atomically: its epoch is bumped
    (the lost worker, should it come back, is fenced: it writes nothing
    more), then

    * if it was started fewer times than its ``max_attempts`` (see
      :func:`~trioflow.redis.submit`) and nobody asked to cancel it, it goes
      back on the queue (``pending``; its next start counts an attempt);
    * else it ends with exactly one terminal event at its ``last_seq + 1``:
      ``flow.failed`` with ``reason`` :data:`WORKER_LOST`, or
      ``flow.cancelled`` with the reason asked for when a cancel was
      pending; its status is set and its keys get the retention TTL, as
      any terminal event does.

    Several reapers at once are safe: a run is taken by one of them. A
    reaper lost between the two steps holds a lease of ``hold`` seconds on
    the run, after which another reaper ends it.

    Returns:
        What was done, by run id: ``"requeued"``, ``"failed"`` or ``"cancelled"``.

    Raises:
        ValueError: ``limit`` < 1 or ``hold`` not positive.
        coredis.exceptions.RedisError: Redis failed.
        trio.BrokenResourceError: writing a terminal event failed for good (Redis
            lost for longer than the history's retries); another reap retries
            that run once the reaper's hold lapses.
    """
    if limit < 1 or not hold > 0:
        raise ValueError(f"need limit >= 1 and hold > 0, not {limit} and {hold!r}")
    keys = store.keys
    client = store.client
    lapsed: object = await client.register_script(_SCAN_SCRIPT)([keys.leases], [limit])
    assert isinstance(lapsed, list)
    done: dict[str, str] = {}
    script = client.register_script(_REAP_SCRIPT)
    for raw in lapsed:
        run_id = raw.decode()
        reply: object = await script(
            [keys.run(run_id), keys.queue, keys.leases], [run_id, store.owner, hold]
        )
        if reply is None:
            continue
        assert isinstance(reply, list)
        outcome, epoch, last, reason, created = map(_text, reply)
        if outcome == "requeued":
            _log.warning("run %s: its worker was lost; re-queued", run_id)
            done[run_id] = "requeued"
            continue
        duration = max(0.0, time.time() - float(created))
        figures = {"duration": duration, "iterations": 0, "percent": 0.0}
        if reason:
            data: dict[str, Any] = {"reason": reason, **figures}
            kind = EventType.FLOW_CANCELLED
        else:
            error = {"type": "WorkerLost", "message": f"the worker of run {run_id} was lost"}
            data = {"error": error, "reason": WORKER_LOST, **figures}
            kind = EventType.FLOW_FAILED
        try:
            await end_run(store, run_id, epoch=int(epoch), type=kind, data=data)
        except (Fenced, KeyError) as exc:  # another reaper took it over, or it expired
            _log.warning("run %s: not ended here: %s", run_id, exc)
            continue
        _log.warning("run %s: its worker was lost (after seq %s); ended", run_id, last)
        done[run_id] = "cancelled" if reason else "failed"
    return done


async def request_cancel(
    store: RedisRunStore,
    run_id: str,
    reason: CancelReason | str = CancelReason.CLIENT,
    *,
    mode: CancelMode | str = CancelMode.IMMEDIATE,
) -> bool:
    """Ask, from any process, that a run be cancelled; it ends with ``flow.cancelled``.

    A durable marker on the run's record (its ``reason`` and ``mode``) and a
    message on the cancel channel, in one script. The worker running the run
    hears the message at once, or reads the marker at its next heartbeat if
    the message is lost, and cancels the run (:meth:`Run.cancel
    <trioflow.executor.Run.cancel>` with ``reason`` and ``mode``). A run
    still ``pending`` is cancelled by the worker that takes it; a run whose
    worker was lost ends ``flow.cancelled`` by the :func:`reap` er. An
    immediate cancel may follow an after-turn one, not the other way round.

    Returns:
        True if the run exists and had not finished.

    Raises:
        ValueError: ``mode`` is not a :class:`~trioflow.handle.CancelMode` value.
        coredis.exceptions.RedisError: Redis failed.
    """
    mode = CancelMode(mode)
    why = str(cancel_reason(reason))
    keys = store.keys
    message = json.dumps({"run_id": run_id, "reason": why, "mode": str(mode)})
    script = store.client.register_script(_CANCEL_SCRIPT)
    done: object = await script([keys.run(run_id)], [why, str(mode), keys.cancel_channel, message])
    return done == 1
