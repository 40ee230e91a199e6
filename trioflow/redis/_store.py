"""Runs kept in Redis: :class:`RedisRunStore`, :class:`RunRecord`, :func:`new_run_id`."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import coredis.exceptions
import trio

from trioflow._frozen import freeze_data
from trioflow._util import collapse_single_group
from trioflow.approvals import PendingApproval
from trioflow.handle import RunStatus
from trioflow.history import Fenced
from trioflow.redis._history import DEFAULT_FLUSH_INTERVAL, DEFAULT_RETRY, RedisHistory
from trioflow.redis._keys import Keys
from trioflow.supervise import RetryPolicy

if TYPE_CHECKING:
    import coredis

    from trioflow.executor import HistoryFactory, Run

__all__ = ["RedisRunStore", "RunRecord", "new_run_id"]

_CREATE_SCRIPT = """
-- KEYS[1]: the run's record, KEYS[2]: the index; ARGV: run id, now, capacity, request
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.error_reply('EXISTS') end
redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'status', 'pending', 'owner', '',
           'epoch', 0, 'last_seq', 0, 'capacity', ARGV[3], 'attempt', 0,
           'request', ARGV[4], 'created_at', ARGV[2], 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

FORGET_APPROVALS_LUA = """
-- A new attempt: the calls of the ones before it wait no more (their ids may come again).
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  local head = string.sub(name, 1, 9)
  if head == 'approval:' or head == 'decision:' then redis.call('HDEL', KEYS[1], name) end
end
"""
"""Lua: drop the run's approvals index (KEYS[1]: its record) when an attempt begins."""

_CLAIM_SCRIPT = (
    """
-- KEYS[1]: the run's record; ARGV: owner, now
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('NORUN') end
if status == 'completed' or status == 'failed' or status == 'cancelled' then
  return redis.error_reply('FINISHED ' .. status)
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
"""
    + FORGET_APPROVALS_LUA
    + """
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'status', 'running', 'updated_at', ARGV[2])
return epoch
"""
)


def new_run_id() -> str:
    """A new run id, unique across processes and machines: ``run_<time>_<random>``.

    ``run_`` and 12 hex digits of the creation time in milliseconds (so ids
    sort by creation), ``_`` and 16 hex digits (64 bits) from
    :mod:`secrets`: ``run_0193a4c1d2e3_9f2c4b7a1e0d5c38``. Two ids collide
    only if made in the same millisecond with the same 64 random bits. The
    in-memory executor's default ids (``run_0001_ab12cd34``, a per-process
    counter) repeat after every restart; pass this function as
    ``StreamingFlowExecutor(run_ids=new_run_id)`` when runs outlive the process.
    """
    return f"run_{time.time_ns() // 1_000_000:012x}_{secrets.token_hex(8)}"


@dataclasses.dataclass(frozen=True, slots=True)
class RunRecord:
    """What Redis holds about a run: a snapshot of its record (a hash, see :doc:`/concepts/redis`)."""

    run_id: str
    status: RunStatus
    """``pending`` until claimed, ``running`` once claimed, then the status of its terminal event."""
    owner: str | None
    """Who claimed the run last (``host:pid`` by default), ``None`` before."""
    epoch: int
    """The fencing epoch: 0 until claimed, bumped by every claim."""
    last_seq: int
    """The seq of the newest event written."""
    capacity: int
    """The most events its history retains."""
    attempt: int
    """How many times the run was claimed."""
    request: Mapping[str, Any]
    """What the run was started with (read-only): task, model, metadata, ..."""
    created_at: float
    updated_at: float
    cancel: Mapping[str, Any] | None = None
    """The cancel request on the run (:func:`~trioflow.redis.request_cancel`):
    ``reason`` and ``mode``; ``None`` while nobody asked."""
    approvals: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """The data of every ``tool.approval_required`` event of the run, by call id."""
    decided: frozenset[str] = frozenset()
    """The call ids decided (by a person on any node, by the run, or by a timeout)."""

    def pending_approvals(self) -> list[PendingApproval]:
        """The calls waiting for a decision: asked, not decided, the run not finished."""
        if self.status.finished:
            return []
        return [
            PendingApproval(
                call_id,
                str(data.get("tool", "")),
                dict(data.get("input") or {}),
                int(data.get("iteration", 0)),
                data.get("timeout"),
            )
            for call_id, data in self.approvals.items()
            if call_id not in self.decided
        ]

    @classmethod
    def _from_hash(cls, fields: Mapping[bytes, bytes]) -> RunRecord:
        def text(name: str) -> str:
            return fields[name.encode()].decode()

        return cls(
            run_id=text("run_id"),
            status=RunStatus(text("status")),
            owner=text("owner") or None,
            epoch=int(text("epoch")),
            last_seq=int(text("last_seq")),
            capacity=int(text("capacity")),
            attempt=int(text("attempt")),
            request=freeze_data(json.loads(text("request"))),
            created_at=float(text("created_at")),
            updated_at=float(text("updated_at")),
            cancel=_cancel_marker(fields.get(b"cancel_reason"), fields.get(b"cancel_mode")),
            approvals={
                name[9:].decode("utf-8", "surrogateescape"): freeze_data(
                    json.loads(value.decode("utf-8", "surrogateescape")).get("data") or {}
                )
                for name, value in fields.items()
                if name.startswith(b"approval:")
            },
            decided=frozenset(
                name[9:].decode("utf-8", "surrogateescape")
                for name in fields
                if name.startswith(b"decision:")
            ),
        )


def _cancel_marker(reason: bytes | None, mode: bytes | None) -> Mapping[str, Any] | None:
    """The cancel marker of a record (its ``cancel_reason`` and ``cancel_mode`` fields), or ``None``."""
    if reason is None:
        return None
    return freeze_data({"reason": reason.decode(), "mode": (mode or b"immediate").decode()})


class RedisRunStore:
    """Runs' records and histories in Redis, reachable from any process.

    Each run has a record (a hash: status, owner, epoch, last seq, capacity,
    request, attempt, timestamps), a history (a stream, see
    :class:`RedisHistory`) and an entry in an index sorted by creation time;
    the key layout is that of :doc:`/concepts/redis` (``prefix`` first).

    The life of a run: :meth:`create` (``pending``, epoch 0), :meth:`claim`
    (``running``, a new epoch: the claimer is now the run's only writer and
    any earlier writer is fenced off), events written through
    :meth:`open_history` under that epoch, the terminal event setting the
    final status and the ``retention`` TTL on the run's keys. Any process
    reads it back with :meth:`get`, :meth:`list` and :meth:`history`.

    Args:
        client: a connected client (:func:`~trioflow.redis.open_redis`).
        prefix: the first part of every key.
        retention: seconds a finished run's keys are kept after its terminal
            event (``None``: kept until deleted).
        owner: who this process is, recorded by :meth:`claim`
            (``host:pid`` by default).

    Raises:
        ValueError: ``retention`` is not positive.
    """

    def __init__(
        self,
        client: coredis.Redis[bytes],
        *,
        prefix: str = "trioflow",
        retention: float | None = 3600.0,
        owner: str | None = None,
    ) -> None:
        if retention is not None and not retention > 0:
            raise ValueError(f"retention must be > 0 seconds or None, not {retention!r}")
        self.client = client
        self.keys = Keys(prefix)
        self.retention = retention
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._create = client.register_script(_CREATE_SCRIPT)
        self._claim = client.register_script(_CLAIM_SCRIPT)

    def __repr__(self) -> str:
        return f"<RedisRunStore prefix={self.keys.prefix!r} owner={self.owner!r}>"

    async def create(
        self,
        run_id: str | None = None,
        *,
        request: Mapping[str, Any] | None = None,
        capacity: int = 4096,
    ) -> RunRecord:
        """Record a new run, ``pending``, epoch 0, and index it.

        Args:
            run_id: the run's id; a new one (:func:`new_run_id`) by default.
            request: what the run is started with, JSON-compatible (values
                JSON cannot encode are stored as their ``str``).
            capacity: the most events its history will retain.

        Raises:
            ValueError: a run with that id exists already, or ``capacity`` < 0.
            coredis.exceptions.RedisError: Redis failed.
        """
        if capacity < 0:
            raise ValueError(f"history capacity must be >= 0, not {capacity}")
        rid = run_id or new_run_id()
        now = repr(time.time())
        body = json.dumps(dict(request or {}), default=str, separators=(",", ":"))
        try:
            await self._create([self.keys.run(rid), self.keys.index], [rid, now, capacity, body])
        except coredis.exceptions.ResponseError as exc:
            if str(exc).startswith("EXISTS"):
                raise ValueError(f"a run with id {rid!r} exists already") from None
            raise
        return await self.get(rid)

    async def claim(self, run_id: str, *, owner: str | None = None) -> int:
        """Make the caller the run's only writer: bump its epoch, atomically.

        The run becomes ``running``, owned by ``owner`` (this store's
        :attr:`owner` by default), its ``attempt`` counted. A writer holding
        an older epoch is refused from its next write on
        (:exc:`~trioflow.history.Fenced`).

        Returns:
            The new epoch, for :meth:`open_history`.

        Raises:
            KeyError: no such run (or its keys expired).
            ValueError: the run has finished.
            coredis.exceptions.RedisError: Redis failed.
        """
        try:
            epoch: object = await self._claim(
                [self.keys.run(run_id)], [owner or self.owner, repr(time.time())]
            )
        except coredis.exceptions.ResponseError as exc:
            code, _, status = str(exc).partition(" ")
            if code == "NORUN":
                raise KeyError(f"no run with id {run_id!r}") from None
            if code == "FINISHED":
                raise ValueError(f"run {run_id!r} has finished ({status})") from None
            raise
        assert isinstance(epoch, int)
        return epoch

    async def get(self, run_id: str) -> RunRecord:
        """The run's record now.

        Raises:
            KeyError: no such run (or its keys expired).
            coredis.exceptions.RedisError: Redis failed.
        """
        fields = await self.client.hgetall(self.keys.run(run_id))
        if not fields:
            raise KeyError(f"no run with id {run_id!r}")
        return RunRecord._from_hash(fields)

    async def list(self, *, limit: int = 100) -> list[RunRecord]:
        """The newest ``limit`` runs' records, newest first.

        Runs whose keys expired are dropped from the index on the way.

        Raises:
            ValueError: ``limit`` < 1.
            coredis.exceptions.RedisError: Redis failed.
        """
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        index = self.keys.index
        ids = [rid.decode() for rid in await self.client.zrange(index, 0, limit - 1, rev=True)]
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            requests = [pipe.hgetall(self.keys.run(rid)) for rid in ids]
        records: list[RunRecord] = []
        gone: list[str] = []
        for rid, request in zip(ids, requests, strict=True):
            fields = await request
            if fields:
                records.append(RunRecord._from_hash(fields))
            else:
                gone.append(rid)
        if gone:
            await self.client.zrem(index, gone)
        return records

    async def history(self, run_id: str) -> RedisHistory:
        """A read-only :class:`RedisHistory` of the run, as far as it is written now.

        Its :attr:`~RedisHistory.last_seq` is the record's; serve it with
        ``open_event_bus(history=...)`` and a closed bus to replay the run
        (``Last-Event-ID`` is ``after``), or call :meth:`RedisHistory.read`.

        Raises:
            KeyError: no such run (or its keys expired).
            coredis.exceptions.RedisError: Redis failed.
        """
        record = await self.get(run_id)
        return RedisHistory(
            self.client,
            self.keys,
            run_id,
            capacity=record.capacity,
            last_seq=record.last_seq,
            epoch=None,
            retention=self.retention,
        )

    @asynccontextmanager
    async def open_history(
        self,
        run_id: str,
        *,
        epoch: int,
        batch_size: int = 64,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_buffer: int = 65536,
        retry: RetryPolicy = DEFAULT_RETRY,
        write_timeout: float = 10.0,
        close_timeout: float = 5.0,
    ) -> AsyncIterator[RedisHistory]:
        """The run's history to write, under ``epoch``, for the ``async with`` block.

        The block owns the history's task (started with ``nursery.start``),
        which makes the history one of the client's shared writer's and, while
        no other block's task does, runs that writer for every history of the
        client (see :class:`RedisHistory`). On exit, what is still buffered is
        written (shielded, within ``close_timeout`` seconds) and the history
        closes; if the task is writing other runs' batches then, it finishes
        that call (within ``close_timeout`` again) and hands the writer over.
        If the history fails (fenced, or Redis lost: see
        :class:`RedisHistory`), the block is cancelled and the error raised
        out of it.

        Args:
            run_id: a claimed run.
            epoch: the epoch :meth:`claim` returned.
            batch_size: write as soon as this many events wait.
            flush_interval: write at the latest this many seconds after an
                event was appended (2 ms by default: see :doc:`/concepts/redis`).
            max_buffer: the most events that may wait to be written (while
                Redis is slow or away); past it the history fails.
            retry: how a failed write is retried.
            write_timeout: how long one write may wait for Redis's answer
                before it counts as failed (and is retried: a write that was
                applied after all is recognised, not written twice).
            close_timeout: how long the final flush may take.

        Raises:
            KeyError: no such run.
            Fenced: ``epoch`` is not the run's current epoch (at once, or
                from a later write).
            trio.BrokenResourceError: Redis failed for longer than ``retry``
                allows, the buffer overflowed, or the run's record vanished.
            ValueError: bad ``batch_size``, ``max_buffer`` or ``flush_interval``.
        """
        record = await self.get(run_id)
        if record.epoch != epoch:
            raise Fenced(run_id, epoch, record.epoch)
        history = RedisHistory(
            self.client,
            self.keys,
            run_id,
            capacity=record.capacity,
            last_seq=record.last_seq,
            epoch=epoch,
            retention=self.retention,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_buffer=max_buffer,
            retry=retry,
            write_timeout=write_timeout,
        )
        closing_failed = False
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                await nursery.start(history._flusher)
                try:
                    yield history
                finally:
                    if not await history._drain(close_timeout) and history._error is None:
                        closing_failed = True
                        lost = history.last_seq - history.statistics().written_seq
                        history._fail(
                            lambda: trio.BrokenResourceError(
                                f"run {run_id}: {lost} events could not be written to Redis "
                                f"within {close_timeout} s"
                            )
                        )
                    history._close()
                    if closing_failed:
                        nursery.cancel_scope.cancel()  # the task may wait on Redis still
                    elif history._error is None:
                        # The task leaves once the call it may have in flight for other
                        # runs returns (bounded: a call abandoned is sent again by the next).
                        nursery.cancel_scope.deadline = trio.current_time() + close_timeout
        if closing_failed and history._error is not None:
            raise history._error()

    def history_factory(self, **options: Any) -> HistoryFactory:
        """A history factory for :class:`~trioflow.StreamingFlowExecutor` (``history_store=``).

        For each run the executor starts, the factory :meth:`create` s its
        record (its request: task, model, agent, limits, metadata), :meth:`claim` s
        it and opens its history (:meth:`open_history` with ``options``), with
        the executor's ``history`` as capacity.
        """

        @asynccontextmanager
        async def open_run_history(run: Run, capacity: int) -> AsyncIterator[RedisHistory]:
            request = {
                "task": run.task,
                "model": run.agent.model.name,
                "agent": run.agent.name,
                "timeout": run.timeout,
                "max_iterations": run.max_iterations,
                "on_disconnect": str(run.on_disconnect),
                "metadata": run.metadata,
            }
            await self.create(run.run_id, request=request, capacity=capacity)
            epoch = await self.claim(run.run_id)
            async with self.open_history(run.run_id, epoch=epoch, **options) as history:
                yield history

        return open_run_history
