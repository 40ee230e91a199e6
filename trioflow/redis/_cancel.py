"""Honouring cancel requests and approval decisions where a serve node executes its runs: :func:`listen_for_cancels`.

A cancel request (:func:`~trioflow.redis.request_cancel`) is two writes: a
durable marker, the ``cancel_reason`` and ``cancel_mode`` fields of the
run's record, and a message on the :attr:`~trioflow.redis.Keys.cancel_channel`
pub/sub channel. The message is the fast path; the marker is what a process
that missed the message (it was reconnecting, or started later) finds when
it checks its runs. A worker reads the markers with its heartbeat
(:mod:`trioflow.redis._worker`); a serve node executing runs itself uses
:func:`listen_for_cancels`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import coredis.exceptions
import trio

from trioflow.handle import CancelMode, CancelReason
from trioflow.redis._approvals import apply_decision, apply_decision_markers

if TYPE_CHECKING:
    from trioflow.executor import StreamingFlowExecutor
    from trioflow.redis._store import RedisRunStore

__all__ = ["listen_for_cancels"]

_log = logging.getLogger("trioflow.redis")


def _apply(executor: StreamingFlowExecutor, message: Mapping[str, Any]) -> bool:
    """Cancel the executor's run named by ``message``; True if it is one of ours and was cancelled."""
    run = executor.runs.get(str(message.get("run_id", "")))
    if run is None or run.done:
        return False
    if "call_id" in message:  # a decision (trioflow.redis._approvals)
        return apply_decision(run, message)
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
    """Honour :func:`request_cancel` and :func:`request_decision` for ``executor``'s runs, until cancelled.

    The minimal listener of a process that executes runs (``trioflow serve
    --redis`` runs one beside its executor): it subscribes to
    :attr:`~trioflow.redis.Keys.cancel_channel` and cancels the executor's
    run a message names; every ``check_interval`` seconds it also reads the
    ``cancel`` marker of each of the executor's unfinished runs (one
    pipelined round trip), which catches a message lost while the
    subscription was reconnecting. Approval decisions come the same two
    ways: on :attr:`~trioflow.redis.Keys.decision_channel`, and as the
    ``decision:<call_id>`` markers of the calls waiting here. Messages for runs of other processes
    are ignored. Start it with ``nursery.start``: it reports started once
    subscribed. Redis errors are logged and retried (coredis reconnects
    the subscription with backoff).

    Raises:
        ValueError: ``check_interval`` is not positive.
    """
    if not check_interval > 0:
        raise ValueError(f"check_interval must be > 0 seconds, not {check_interval!r}")
    channels = [store.keys.cancel_channel, store.keys.decision_channel]
    async with (
        store.client.pubsub(channels=channels, ignore_subscribe_messages=True) as pubsub,
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
        runs = [run for run in executor.runs.values() if not run.done]
        if not runs:
            continue
        ids = [run.run_id for run in runs]
        try:
            async with store.client.pipeline(transaction=False) as pipe:
                requests = [
                    pipe.hmget(store.keys.run(rid), ["cancel_reason", "cancel_mode"]) for rid in ids
                ]
            markers = [await request for request in requests]
        except (coredis.exceptions.RedisError, OSError) as exc:
            _log.warning("reading cancel markers failed (%s); retrying", exc)
            continue
        for rid, (reason, mode) in zip(ids, markers, strict=True):
            if reason is not None:
                _apply(
                    executor,
                    {
                        "run_id": rid,
                        "reason": reason.decode(),
                        "mode": (mode or b"immediate").decode(),
                    },
                )
        try:  # the decisions of calls waiting here (one read per run with a call waiting)
            for run in runs:
                await apply_decision_markers(store, run)
        except (coredis.exceptions.RedisError, OSError) as exc:
            _log.warning("reading decision markers failed (%s); retrying", exc)
