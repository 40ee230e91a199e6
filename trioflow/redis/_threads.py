"""Threads (conversations) kept in Redis: :class:`RedisThreads`.

The key layout is that of :class:`~trioflow.redis.Keys`: per thread a hash
(its record, with ``running``: the run going on it), a list of its messages
(JSON, oldest first) and a list of its run ids; a sorted set of every
thread by creation time bounds how many are retained. Beginning and ending
a run on a thread are one script each, so two nodes cannot start two runs
of one conversation, and only the run's current holder (its fencing epoch)
can add its messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import coredis.exceptions

from trioflow.models._base import Message
from trioflow.threads import (
    Thread,
    ThreadBusy,
    ThreadFull,
    ThreadLimitReached,
    ThreadNotFound,
    _new_id,
)

if TYPE_CHECKING:
    from trioflow.redis._store import RedisRunStore

__all__ = ["STARTING_GRACE", "RedisThreads"]

STARTING_GRACE = 30.0
"""Seconds a thread's running run may have no record yet (it is being
submitted or created) and still count as going. A running run whose record
is terminal, or gone past this grace (expired, or its starter died before
recording it), no longer blocks the thread."""

_TERMINAL_LUA = """
local function going(run_prefix, running, since, now, grace)
  if not running or running == '' then return false end
  local status = redis.call('HGET', run_prefix .. '{' .. running .. '}', 'status')
  if not status then return now - tonumber(since or '0') < grace end
  return not (status == 'completed' or status == 'failed' or status == 'cancelled')
end
local function touch(keys, retention)
  if retention ~= '' then
    for _, key in ipairs(keys) do redis.call('EXPIRE', key, retention) end
  end
end
"""
"""Lua: ``going(...)``, whether a thread's running run still holds it; ``touch``: the idle TTL."""

_CREATE_SCRIPT = (
    _TERMINAL_LUA
    + """
-- KEYS[1]: the thread's record, KEYS[2]: the threads index
-- ARGV: id, now, metadata, max_messages, max_threads, run prefix, thread prefix, grace, retention,
-- '1' to make it only if absent (returns 0 when it exists)
if ARGV[10] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local now, grace = tonumber(ARGV[2]), tonumber(ARGV[8])
local count = redis.call('ZCARD', KEYS[2])
if count >= tonumber(ARGV[5]) then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local base = ARGV[7] .. '{' .. id .. '}'
    local f = redis.call('HMGET', base, 'running', 'running_since')
    if redis.call('EXISTS', base) == 0 then
      redis.call('ZREM', KEYS[2], id)  -- expired
      redis.call('DEL', base .. ':messages', base .. ':runs')
      count = count - 1
    elseif not going(ARGV[6], f[1], f[2], now, grace) then
      redis.call('DEL', base, base .. ':messages', base .. ':runs')
      redis.call('ZREM', KEYS[2], id)
      count = count - 1
    end
    if count < tonumber(ARGV[5]) then break end
  end
  if count >= tonumber(ARGV[5]) then return redis.error_reply('TFLIMIT') end
end
redis.call('HSET', KEYS[1], 'thread_id', ARGV[1], 'created_at', ARGV[2], 'updated_at', ARGV[2],
           'metadata', ARGV[3], 'max_messages', ARGV[4], 'running', '', 'running_since', '0',
           'retention', ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
touch({KEYS[1]}, ARGV[9])
return 1
"""
)
"""Make a thread; with ``max_threads`` of them, forget the oldest idle (or expired) ones first."""

_BEGIN_SCRIPT = (
    _TERMINAL_LUA
    + """
-- KEYS[1]: the thread's record, KEYS[2]: its messages, KEYS[3]: its runs
-- ARGV: run id, run prefix, now, grace, retention
local f = redis.call('HMGET', KEYS[1], 'running', 'running_since', 'max_messages')
if not f[3] then return redis.error_reply('TFNOTHREAD') end
local now = tonumber(ARGV[3])
if f[1] ~= ARGV[1] then  -- the same run beginning again (re-queued) continues as it was
  if going(ARGV[2], f[1], f[2], now, tonumber(ARGV[4])) then
    return redis.error_reply('TFBUSY ' .. f[1])
  end
  if redis.call('LLEN', KEYS[2]) + 1 > tonumber(f[3]) then
    return redis.error_reply('TFFULL ' .. f[3])
  end
  redis.call('HSET', KEYS[1], 'running', ARGV[1], 'running_since', ARGV[3], 'updated_at', ARGV[3])
  redis.call('RPUSH', KEYS[3], ARGV[1])
end
-- No idle TTL while a run goes (a run may outlast it); its end puts the TTL back.
local retention = ARGV[5]
if retention == '' then retention = redis.call('HGET', KEYS[1], 'retention') or '' end
if retention ~= '' then
  for _, key in ipairs(KEYS) do redis.call('PERSIST', key) end
end
return redis.call('LRANGE', KEYS[2], 0, -1)
"""
)
"""Begin a run on a thread: ThreadBusy, ThreadFull, or the thread's messages (it is now running)."""

_END_SCRIPT = """
-- KEYS[1]: the thread's record, KEYS[2]: its messages, KEYS[3]: its runs, KEYS[4]: the run's record
-- ARGV: run id, epoch ('' for none), messages it began with, now, retention, then new messages
if redis.call('HGET', KEYS[1], 'running') ~= ARGV[1] then return 0 end
local append = #ARGV > 5
if ARGV[2] ~= '' then
  local r = redis.call('HMGET', KEYS[4], 'epoch', 'status')
  if r[1] ~= ARGV[2] then return -1 end  -- fenced: someone else holds the run now
  if r[2] ~= 'running' then append = false end  -- ended meanwhile (by a reaper)
end
if append and redis.call('LLEN', KEYS[2]) == tonumber(ARGV[3]) then
  for i = 6, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
end
redis.call('HSET', KEYS[1], 'running', '', 'running_since', '0', 'updated_at', ARGV[4])
local retention = ARGV[5]  -- the caller's, else the one the thread was made with
if retention == '' then retention = redis.call('HGET', KEYS[1], 'retention') or '' end
if retention ~= '' then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], retention) end
end
return 1
"""
"""End a run on a thread: clear ``running``, adding the run's new messages when it completed.

``0`` when the run is not the thread's running run, ``-1`` when the caller
does not hold the run's epoch (it was fenced): nothing is changed then."""


def _json(message: Message) -> str:
    return json.dumps(message.to_dict(), separators=(",", ":"), default=str)


def _messages(raw: Sequence[object]) -> tuple[Message, ...]:
    return tuple(Message.from_dict(json.loads(_text(m))) for m in raw)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisThreads:
    """Threads kept in Redis: a :class:`~trioflow.threads.ThreadStore` every process shares.

    What :class:`~trioflow.threads.Threads` does in memory, with the same
    errors, for every serve node and worker on one Redis:

    * :meth:`begin` is atomic: a thread's running run blocks a second one
      (:exc:`~trioflow.threads.ThreadBusy`) until it has ended, on any node;
      a running run whose record in the run store is terminal (ended by the
      reaper after its worker was lost, say), or has had no record for
      :data:`STARTING_GRACE` seconds, no longer blocks it;
    * :meth:`end` adds a run's messages only if the run completed and, with
      ``epoch``, only if the caller still holds the run's fencing epoch: a
      fenced worker adds nothing;
    * at most ``max_threads`` threads are retained (making one more forgets
      the oldest with no run going; :exc:`~trioflow.threads.ThreadLimitReached`
      when every one has), each of at most ``max_messages`` messages (fixed
      when the thread is made: a worker needs no configuration for it).

    Args:
        store: the run store (its client and key prefix; the records of the
            threads' runs are read there).
        max_threads: the most threads retained.
        max_messages: the most messages a new thread holds.
        retention: seconds an idle thread's keys are kept after its last
            activity (made, a run begun or ended); ``None`` (the default):
            kept until forgotten to make room.

    Raises:
        ValueError: a limit below 1, or ``retention`` not positive.
    """

    def __init__(
        self,
        store: RedisRunStore,
        *,
        max_threads: int = 1000,
        max_messages: int = 1000,
        retention: float | None = None,
    ) -> None:
        for name, value in (("max_threads", max_threads), ("max_messages", max_messages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        if retention is not None and not retention > 0:
            raise ValueError(f"retention must be > 0 seconds or None, not {retention!r}")
        self.store = store
        self.keys = store.keys
        self.max_threads = max_threads
        self.max_messages = max_messages
        self.retention = retention
        client = store.client
        self._create = client.register_script(_CREATE_SCRIPT)
        self._begin = client.register_script(_BEGIN_SCRIPT)
        self._end = client.register_script(_END_SCRIPT)

    def __repr__(self) -> str:
        return f"<RedisThreads prefix={self.keys.prefix!r} max_threads={self.max_threads}>"

    @property
    def _run_prefix(self) -> str:
        return f"{self.keys.prefix}:run:"

    @property
    def _ttl(self) -> str | int:
        return "" if self.retention is None else max(1, round(self.retention))

    async def create_thread(
        self, metadata: Mapping[str, Any] | None = None, *, thread_id: str | None = None
    ) -> Thread:
        """A new, empty thread (the oldest idle one is forgotten when ``max_threads`` are retained).

        With ``thread_id``: that thread, made only if Redis holds no thread
        of that id (one script: racing nodes get the same thread).

        Raises:
            ThreadLimitReached: every retained thread has a run going.
            coredis.exceptions.RedisError: Redis failed.
        """
        only_if_absent = thread_id is not None
        thread_id = thread_id or _new_id()
        now = time.time()
        body = json.dumps(dict(metadata or {}), separators=(",", ":"), default=str)
        try:
            made: object = await self._create(
                [self.keys.thread(thread_id), self.keys.threads],
                [
                    thread_id,
                    repr(now),
                    body,
                    self.max_messages,
                    self.max_threads,
                    self._run_prefix,
                    f"{self.keys.prefix}:thread:",
                    STARTING_GRACE,
                    self._ttl,
                    "1" if only_if_absent else "0",
                ],
            )
        except coredis.exceptions.ResponseError as exc:
            if str(exc).startswith("TFLIMIT"):
                raise ThreadLimitReached(self.max_threads) from None
            raise
        if made == 0:
            return await self.get_thread(thread_id)
        return Thread.snapshot(
            thread_id,
            created_at=now,
            max_messages=self.max_messages,
            metadata=json.loads(body),
            messages=(),
            runs=(),
            running=None,
        )

    async def get_thread(self, thread_id: str) -> Thread:
        """The thread ``thread_id`` as Redis holds it now (a snapshot).

        Its ``running`` is ``None`` when its running run no longer holds it
        (see the class).

        Raises:
            ThreadNotFound: no retained thread has that id.
            coredis.exceptions.RedisError: Redis failed.
        """
        threads = await self._read([thread_id], messages=True)
        if not threads:
            raise ThreadNotFound(thread_id)
        return threads[0]

    async def list_threads(self) -> list[Thread]:
        """The retained threads, oldest first (their messages counted, not read).

        Threads whose keys expired are dropped from the index on the way.

        Raises:
            coredis.exceptions.RedisError: Redis failed.
        """
        ids = [_text(i) for i in await self.store.client.zrange(self.keys.threads, 0, -1)]
        return await self._read(ids, messages=False)

    async def _read(self, ids: Sequence[str], *, messages: bool) -> list[Thread]:
        if not ids:
            return []
        client = self.store.client
        async with client.pipeline(transaction=False) as pipe:
            replies = [
                (
                    pipe.hgetall(self.keys.thread(tid)),
                    pipe.lrange(self.keys.thread_messages(tid), 0, -1)
                    if messages
                    else pipe.llen(self.keys.thread_messages(tid)),
                    pipe.lrange(self.keys.thread_runs(tid), 0, -1),
                )
                for tid in ids
            ]
        threads: list[Thread] = []
        gone: list[str] = []
        for tid, (record, held, runs) in zip(ids, replies, strict=True):
            fields = {_text(k): _text(v) for k, v in (await record).items()}
            held_value, run_ids = await held, [_text(r) for r in await runs]
            if not fields:
                gone.append(tid)
                continue
            running = fields.get("running") or None
            if running is not None and not await self._going(
                running, float(fields.get("running_since", "0"))
            ):
                running = None
            stored: tuple[Message, ...] = ()
            count: int | None = None
            if isinstance(held_value, int):
                count = held_value
            else:
                stored = _messages(held_value)
            threads.append(
                Thread.snapshot(
                    tid,
                    created_at=float(fields["created_at"]),
                    max_messages=int(fields["max_messages"]),
                    metadata=json.loads(fields.get("metadata", "{}")),
                    messages=stored,
                    runs=run_ids,
                    running=running,
                    message_count=count,
                )
            )
        if gone and not messages:
            await client.zrem(self.keys.threads, gone)
        return threads

    async def _going(self, run_id: str, since: float) -> bool:
        """Whether running run ``run_id`` still holds its thread (as the scripts' ``going``)."""
        status = await self.store.client.hget(self.keys.run(run_id), "status")
        if status is None:
            return time.time() - since < STARTING_GRACE
        return _text(status) not in ("completed", "failed", "cancelled")

    async def begin(self, thread_id: str, run_id: str) -> tuple[Message, ...]:
        """Make ``run_id`` the thread's running run, atomically; the conversation it continues.

        Beginning again with the thread's running run (a run re-queued after
        its worker was lost) returns the messages and changes nothing.

        Raises:
            ThreadNotFound: no retained thread has that id.
            ThreadBusy: another run of the thread is going.
            ThreadFull: one more message would pass the thread's limit.
            coredis.exceptions.RedisError: Redis failed.
        """
        keys = self.keys
        try:
            reply: object = await self._begin(
                [
                    keys.thread(thread_id),
                    keys.thread_messages(thread_id),
                    keys.thread_runs(thread_id),
                ],
                [run_id, self._run_prefix, repr(time.time()), STARTING_GRACE, self._ttl],
            )
        except coredis.exceptions.ResponseError as exc:
            code, _, value = str(exc).partition(" ")
            if code == "TFNOTHREAD":
                raise ThreadNotFound(thread_id) from None
            if code == "TFBUSY":
                raise ThreadBusy(thread_id, value) from None
            if code == "TFFULL":
                raise ThreadFull(thread_id, int(value)) from None
            raise
        assert isinstance(reply, list)
        return _messages(reply)

    async def end(
        self,
        thread_id: str,
        run_id: str,
        messages: Sequence[Message] | None,
        *,
        epoch: int | None = None,
    ) -> bool:
        """Record the end of run ``run_id``, atomically: ``messages``, the whole conversation it completed, or ``None``.

        Nothing happens unless ``run_id`` is the thread's running run. With
        ``epoch`` (a worker ending the run it claimed, before writing its
        terminal event), nothing happens either unless the run's record
        still has that epoch (a fenced worker adds nothing), and the
        messages are added only if the record is still ``running`` (not
        ended by a reaper meanwhile). The messages added are those past the ones the
        thread held (the conversation's new turns), and only if the thread
        still holds as many as before.

        Returns:
            Whether the thread was ended by this call.

        Raises:
            coredis.exceptions.RedisError: Redis failed.
        """
        keys = self.keys
        before = await self.store.client.llen(keys.thread_messages(thread_id))
        new = [] if messages is None else [_json(m) for m in list(messages)[before:]]
        args: list[str | int | float] = [
            run_id,
            "" if epoch is None else epoch,
            before,
            repr(time.time()),
            self._ttl,
            *new,
        ]
        reply: object = await self._end(
            [
                keys.thread(thread_id),
                keys.thread_messages(thread_id),
                keys.thread_runs(thread_id),
                keys.run(run_id),
            ],
            args,
        )
        return reply == 1
