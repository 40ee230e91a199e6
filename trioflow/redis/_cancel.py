"""Cancelling a run from any process: :func:`request_cancel`, and the executing side's :func:`listen_for_cancels`.

A cancel request is two writes: a durable marker, the ``cancel`` field of
the run's record (JSON ``{"reason", "mode", "at"}``), and a message on the
:attr:`~trioflow.redis.Keys.cancel_channel` pub/sub channel. The message
is the fast path; the marker is what a process that missed the message (it
was reconnecting, or started later) finds when it checks its runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import coredis.exceptions
import trio

from trioflow.handle import CancelMode, CancelReason

if TYPE_CHECKING:
    from trioflow.executor import StreamingFlowExecutor
    from trioflow.redis._store import RedisRunStore

__all__ = ["listen_for_cancels", "request_cancel"]

_log = logging.getLogger("trioflow.redis")

_CANCEL_SCRIPT = """
-- KEYS[1]: the run's record; ARGV: the marker (JSON), the channel, the message (JSON)
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('NORUN') end
if status == 'completed' or status == 'failed' or status == 'cancelled' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'cancel') == 0 then
  redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


async def request_cancel(
    store: RedisRunStore,
    run_id: str,
    reason: CancelReason | str = CancelReason.CANCELLED,
    mode: CancelMode | str = CancelMode.IMMEDIATE,
) -> bool:
    """Ask whichever process executes ``run_id`` to cancel it: a durable marker, then a message.

    One atomic script: unless the run has finished, the marker is written to
    the run's record (the first request's marker stays; later requests are
    published again, so an ``immediate`` after an ``after_turn`` still
    reaches the executor) and ``{"run_id", "reason", "mode"}`` is published
    on :attr:`~trioflow.redis.Keys.cancel_channel`. The executing process
    (:func:`listen_for_cancels`) cancels its run, which then ends with
    ``flow.cancelled`` like a local cancel.

    Returns:
        True if the request was recorded, False if the run had finished.

    Raises:
        KeyError: no such run (or its keys expired).
        ValueError: ``mode`` is not a :class:`~trioflow.handle.CancelMode` value.
        coredis.exceptions.RedisError: Redis failed.
    """
    mode = CancelMode(mode)
    message = {"run_id": run_id, "reason": str(reason), "mode": str(mode)}
    marker = json.dumps({**message, "at": time.time()}, separators=(",", ":"))
    script = store.client.register_script(_CANCEL_SCRIPT)
    try:
        done: object = await script(
            [store.keys.run(run_id)],
            [marker, store.keys.cancel_channel, json.dumps(message, separators=(",", ":"))],
        )
    except coredis.exceptions.ResponseError as exc:
        if str(exc).startswith("NORUN"):
            raise KeyError(f"no run with id {run_id!r}") from None
        raise
    return bool(done)


def _apply(executor: StreamingFlowExecutor, message: Mapping[str, Any]) -> bool:
    """Cancel the executor's run named by ``message``; True if it is one of ours and was cancelled."""
    run = executor.runs.get(str(message.get("run_id", "")))
    if run is None or run.done:
        return False
    try:
        mode = CancelMode(message.get("mode", CancelMode.IMMEDIATE))
    except ValueError:
        mode = CancelMode.IMMEDIATE
    return run.cancel(str(message.get("reason") or CancelReason.CANCELLED), mode=mode)


async def listen_for_cancels(
    store: RedisRunStore,
    executor: StreamingFlowExecutor,
    *,
    check_interval: float = 1.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Honour :func:`request_cancel` for ``executor``'s runs, until cancelled.

    The minimal listener of a process that executes runs (``trioflow serve
    --redis`` runs one beside its executor): it subscribes to
    :attr:`~trioflow.redis.Keys.cancel_channel` and cancels the executor's
    run a message names; every ``check_interval`` seconds it also reads the
    ``cancel`` marker of each of the executor's unfinished runs (one
    pipelined round trip), which catches a message lost while the
    subscription was reconnecting. Messages for runs of other processes
    are ignored. Start it with ``nursery.start``: it reports started once
    subscribed. Redis errors are logged and retried (coredis reconnects
    the subscription with backoff).

    Raises:
        ValueError: ``check_interval`` is not positive.
    """
    if not check_interval > 0:
        raise ValueError(f"check_interval must be > 0 seconds, not {check_interval!r}")
    channel = store.keys.cancel_channel
    async with (
        store.client.pubsub(channels=[channel], ignore_subscribe_messages=True) as pubsub,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_check_markers, store, executor, check_interval)
        task_status.started()
        async for message in pubsub:
            if message["type"] != "message":
                continue
            data = message["data"]
            if not isinstance(data, (str, bytes)):
                continue
            try:
                body = json.loads(data)
            except ValueError:
                _log.warning("ignoring a malformed cancel message: %r", message["data"])
                continue
            if isinstance(body, dict):
                _apply(executor, body)
        nursery.cancel_scope.cancel()


async def _check_markers(
    store: RedisRunStore, executor: StreamingFlowExecutor, interval: float
) -> None:
    """Every ``interval`` s, the ``cancel`` markers of the executor's unfinished runs."""
    while True:
        await trio.sleep(interval)
        ids = [rid for rid, run in executor.runs.items() if not run.done]
        if not ids:
            continue
        try:
            async with store.client.pipeline(transaction=False) as pipe:
                requests = [pipe.hget(store.keys.run(rid), "cancel") for rid in ids]
            markers = [await request for request in requests]
        except (coredis.exceptions.RedisError, OSError) as exc:
            _log.warning("reading cancel markers failed (%s); retrying", exc)
            continue
        for raw in markers:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(body, dict):
                    _apply(executor, body)
