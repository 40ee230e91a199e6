"""A run's event history on a Redis Stream: :class:`RedisHistory`.

Appends are synchronous and O(1) (the bus calls them on every emit): they
go to a bounded in-memory buffer that a flusher task writes behind, in
batches, through one Lua script per batch (:data:`APPEND_SCRIPT`). The
script is the fence: it refuses a writer whose epoch is not the run's
current one and a batch whose first seq does not follow the stored last
seq, then ``XADD`` s every event with the explicit stream id ``N-0`` (``N``
its seq), so that a ``Last-Event-ID`` maps exactly onto a stream id.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import itertools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

import coredis.exceptions
import coredis.parser
import trio

from trioflow.events import TERMINAL_TYPES, EventType, FlowEvent
from trioflow.handle import RunStatus
from trioflow.history import Fenced, HistoryExpired
from trioflow.supervise import RetryPolicy

if TYPE_CHECKING:
    import coredis

    from trioflow.redis._keys import Keys

__all__ = [
    "APPEND_RUNS_SCRIPT",
    "APPEND_SCRIPT",
    "DEFAULT_RETRY",
    "RedisHistory",
    "RedisHistoryStatistics",
]

_log = logging.getLogger("trioflow.redis")

_APPEND_RUN = """
-- Append one run's batch: the fence, the seq check, the XADDs, the approvals index, the TTL.
-- Returns the new last seq, or a refusal: 'NORUN', 'FENCED <epoch>', 'SEQ <last seq>'.
local function append_run(run, events, epoch, first, capacity, now, ttl, final, argv, from, to)
  local current = redis.call('HGET', run, 'epoch')
  if not current then return 'NORUN' end
  if current ~= epoch then return 'FENCED ' .. current end
  local last = tonumber(redis.call('HGET', run, 'last_seq') or '0')
  if first ~= last + 1 then return 'SEQ ' .. last end
  for i = from, to do
    local e = argv[i]
    if capacity ~= '0' then
      redis.call('XADD', events, 'MAXLEN', '~', capacity,
                 string.format('%d-0', first + i - from), 'e', e)
    end
    -- The approvals index in the record: the first "type" key is the event's own
    -- (before it come only the numeric id and the escaped run id).
    local at = string.find(e, '"type":"tool.', 1, true)
    if at and at == string.find(e, '"type":"', 1, true) then
      local kind = string.sub(e, at + 13, at + 31)
      local asked = string.sub(kind, 1, 18) == 'approval_required"'
      if asked or string.sub(kind, 1, 9) == 'approved"' or string.sub(kind, 1, 7) == 'denied"' then
        local ok, event = pcall(cjson.decode, e)
        local call = ok and type(event.data) == 'table' and event.data.call_id
        if type(call) == 'string' then
          if asked then
            redis.call('HSET', run, 'approval:' .. call, e)
          else
            redis.call('HSETNX', run, 'decision:' .. call, e)
          end
        end
      end
    end
  end
  last = first + to - from
  redis.call('HSET', run, 'last_seq', last, 'updated_at', now)
  if final ~= '' then redis.call('HSET', run, 'status', final) end
  if ttl ~= '0' then
    redis.call('EXPIRE', run, ttl)
    redis.call('EXPIRE', events, ttl)
  end
  return last
end
"""

APPEND_SCRIPT = (
    _APPEND_RUN
    + """
-- KEYS[1]: the run's record (hash), KEYS[2]: its events (stream)
-- ARGV[1]: the writer's epoch, ARGV[2]: the batch's first seq, ARGV[3]: the capacity,
-- ARGV[4]: now, ARGV[5]: TTL in seconds (0: none), ARGV[6]: final status ('': none),
-- ARGV[7..]: the events' JSON, in seq order
local reply = append_run(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4],
                         ARGV[5], ARGV[6], ARGV, 7, #ARGV)
if type(reply) == 'string' then return redis.error_reply(reply) end
return reply
"""
)
"""The script that writes one run's batch: the fence, the seq check, the ``XADD`` s, the TTL.

It also keeps the run's approvals index in its record: a
``tool.approval_required`` event is stored in field ``approval:<call_id>``
and a ``tool.approved``/``tool.denied`` one closes it in ``decision:<call_id>``
(unless a decision is there already), in the same step as the event
becomes visible, so anyone who saw the event finds the call in the record.

A refusal is an error reply: ``NORUN``, ``FENCED <epoch>`` (the run's
current epoch), ``SEQ <last seq>`` (the batch does not follow it)."""

APPEND_RUNS_SCRIPT = (
    _APPEND_RUN
    + """
-- KEYS: each run's record and events, in pairs. ARGV[1]: now; then for each run:
-- its writer's epoch, the batch's first seq, the capacity, the TTL (0: none),
-- the final status ('': none), the batch's length n, then its n events' JSON.
local replies = {}
local at = 2
for k = 1, #KEYS, 2 do
  local from = at + 6
  local to = from + tonumber(ARGV[at + 5]) - 1
  local ok, reply = pcall(append_run, KEYS[k], KEYS[k + 1], ARGV[at], tonumber(ARGV[at + 1]),
                          ARGV[at + 2], ARGV[1], ARGV[at + 3], ARGV[at + 4], ARGV, from, to)
  if not ok then
    if type(reply) == 'table' then reply = reply.err end
    reply = tostring(reply)
  end
  replies[#replies + 1] = reply
  at = to + 1
end
return replies
"""
)
"""The script that writes several runs' batches in one call (what the shared writer sends).

Each run is fenced and seq-checked on its own, exactly as by
:data:`APPEND_SCRIPT`: one reply per run, in order, its new last seq or its
refusal as a string (``NORUN``, ``FENCED <epoch>``, ``SEQ <last seq>``, or
the error Redis raised while writing that run, such as ``WRONGTYPE ...``),
so that a refused run neither writes anything nor stops the others."""

DEFAULT_RETRY = RetryPolicy(
    attempts=20,
    base_delay=0.05,
    max_delay=2.0,
    jitter=0.2,
    retry_on=(coredis.exceptions.ConnectionError, TimeoutError, OSError),
)
"""How a flush is retried while Redis is unreachable: 20 attempts, 0.05 s doubling to 2 s
(about 30 s in all); ``BusyLoadingError`` (a restarting Redis) is a ``ConnectionError``."""

_FINAL_STATUS: dict[str, RunStatus] = {
    EventType.FLOW_COMPLETED: RunStatus.COMPLETED,
    EventType.FLOW_FAILED: RunStatus.FAILED,
    EventType.FLOW_CANCELLED: RunStatus.CANCELLED,
}
assert set(_FINAL_STATUS) == TERMINAL_TYPES

_TRANSIENT_CODES = frozenset({"OOM", "BUSY", "MISCONF"})
"""Error replies worth retrying (Redis full, busy with a script, unable to persist)."""

_TRANSIENT_ERRORS = (
    coredis.exceptions.ReadOnlyError,
    coredis.exceptions.TryAgainError,
    coredis.exceptions.NoScriptError,
)
"""Error replies coredis parses into classes (their code stripped) worth retrying.
(``LOADING`` is a ``BusyLoadingError``, a ``ConnectionError``: retried by the policy.)"""

_PAGE = 512
"""Events per ``XRANGE`` page."""

_MAX_CHUNK = 1024
"""The most events one script call writes (a script blocks Redis while it runs)."""

_MAX_IN_FLIGHT = 4
"""The most script calls a writer has out at once (a history has at most one batch out)."""

DEFAULT_FLUSH_INTERVAL = 0.002
"""The default ``flush_interval``: 2 ms (see :class:`RedisHistory` and :doc:`/concepts/redis`)."""


class _State(enum.Enum):
    READ_ONLY = "read-only"
    OPEN = "open"
    FAILED = "failed"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True)
class RedisHistoryStatistics:
    """A snapshot of a :class:`RedisHistory`: what :meth:`RedisHistory.statistics` returns."""

    buffered: int
    """Events appended and not yet confirmed written to Redis."""
    max_buffer: int
    """The bound of the buffer (see :class:`RedisHistory`)."""
    written_seq: int
    """The newest seq Redis has confirmed."""
    writes: int
    """Batches written: the writer's calls that wrote some of this history's events
    (one call carries the batches of every history of the client)."""
    retries: int
    """Failed write attempts that were retried."""
    state: str
    """``"open"``, ``"read-only"``, ``"failed"`` (fenced, or Redis lost) or ``"closed"``."""


class RedisHistory:
    """An :class:`~trioflow.EventHistory` on a Redis Stream, written behind in batches.

    Made by :class:`~trioflow.redis.RedisRunStore`: a writer with
    :meth:`~trioflow.redis.RedisRunStore.open_history` (under a claimed
    epoch), a read-only history with
    :meth:`~trioflow.redis.RedisRunStore.history`.

    **Appending** (:meth:`append`, :meth:`extend`) is synchronous and O(1):
    the event goes to a buffer, which the process's writer writes behind.
    There is one writer per client, shared by every history written through
    it: one task at a time (the task of one of the histories'
    ``open_history`` blocks, handed over to another when that block ends)
    sends, in **one** script call (:data:`APPEND_RUNS_SCRIPT`), the waiting
    batch of every history, each batch fenced and seq-checked on its own.
    A call goes once some history's batch is due: ``batch_size`` events
    wait, a :meth:`flush` asks, or its oldest waiting event has waited
    ``flush_interval`` seconds (2 ms by default). Up to 4 calls are out at
    once, but a history has at most one batch out, so its events land in
    order and, under load, the events appended during one call go together
    in its next. The batch holding the run's terminal event sets the run's
    status and puts the retention TTL on its keys.

    **When Redis fails** (an error, or no answer within ``write_timeout``
    seconds; for a call carrying several histories' batches, the shortest
    of their timeouts, and every batch in it counts as failed), a batch is
    retried with the store's
    :class:`~trioflow.RetryPolicy` (by default :data:`DEFAULT_RETRY`: backoff
    from 0.05 to 2 s, about 30 s in all); events appended meanwhile wait in
    the buffer, and reads serve them from there. The buffer is bounded by
    ``max_buffer``: the history *fails* when the retries are exhausted or
    the buffer would grow past its bound. A failed history writes nothing
    more, drops further appends (so the run's own cleanup can still emit
    its terminal event locally), and its flusher raises
    :exc:`trio.BrokenResourceError` out of ``open_history``'s block, which
    it cancels. The same happens with :exc:`~trioflow.history.Fenced` when
    the script refuses the writer's epoch (the run was claimed again), and
    with :exc:`trio.BrokenResourceError` when an event cannot be encoded
    (NaN in its data: JSON has no such number) or Redis answers with an
    error that is not worth retrying.

    **Trimming** follows :attr:`capacity` as :class:`~trioflow.MemoryHistory`
    does: the history holds the newest ``capacity`` events, so
    :meth:`read` raises :exc:`~trioflow.HistoryExpired` exactly when a
    memory history of that capacity would, with the same
    ``first_available``. The stream itself is trimmed with ``MAXLEN ~``
    (cheap, never below ``capacity``), so older entries may linger a while
    but are never served.

    Events read back are plain :class:`~trioflow.FlowEvent` s decoded by
    :meth:`FlowEvent.from_json <trioflow.FlowEvent.from_json>` from their
    :meth:`~trioflow.FlowEvent.to_json`.

    Raises:
        ValueError: ``capacity`` < 0, ``batch_size`` < 1, ``max_buffer`` <
            ``batch_size``, or ``flush_interval`` or ``write_timeout`` not positive.
    """

    def __init__(
        self,
        client: coredis.Redis[bytes],
        keys: Keys,
        run_id: str,
        *,
        capacity: int,
        last_seq: int,
        epoch: int | None,
        retention: float | None = 3600.0,
        batch_size: int = 64,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_buffer: int = 65536,
        retry: RetryPolicy = DEFAULT_RETRY,
        write_timeout: float = 10.0,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"history capacity must be >= 0, not {capacity}")
        if batch_size < 1 or max_buffer < batch_size:
            raise ValueError(
                f"need 1 <= batch_size <= max_buffer, not {batch_size} and {max_buffer}"
            )
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be > 0 seconds, not {flush_interval!r}")
        if not write_timeout > 0:
            raise ValueError(f"write_timeout must be > 0 seconds, not {write_timeout!r}")
        self._client = client
        self._run_key = keys.run(run_id)
        self._events_key = keys.events(run_id)
        self.run_id = run_id
        self._capacity = capacity
        self._last_seq = self._written_seq = last_seq
        self._epoch = epoch
        self._ttl = 0 if retention is None else max(1, math.ceil(retention))
        self._batch = batch_size
        self._interval = flush_interval
        self._max_buffer = max_buffer
        self._retry = retry
        self._write_timeout = write_timeout
        self._state = _State.READ_ONLY if epoch is None else _State.OPEN
        self._pending: collections.deque[FlowEvent] = collections.deque()
        self._since = 0.0  # when the oldest waiting event started to wait (Trio time)
        self._retry_at = -math.inf  # no write before then (Trio time): a retry's backoff
        self._attempt = 0  # failed attempts at the oldest waiting events
        self._progress = trio.Event()
        self._error: Callable[[], BaseException] | None = None
        self._flush_now = False
        self._in_flight = False  # a call carrying a batch of this history is out
        self._writes = 0
        self._retries = 0
        self._writer = _Writer.of(client) if epoch is not None else None

    def __repr__(self) -> str:
        return (
            f"<RedisHistory {self.run_id} {self._state.value} last={self._last_seq} "
            f"written={self._written_seq}>"
        )

    # -- the EventHistory protocol -------------------------------------------------

    @property
    def capacity(self) -> int:
        """The most events retained."""
        return self._capacity

    @property
    def first_seq(self) -> int:
        """The oldest retained seq, or ``last_seq + 1`` when nothing is retained."""
        if not self._capacity:
            return self._last_seq + 1
        return max(1, self._last_seq - self._capacity + 1)

    @property
    def last_seq(self) -> int:
        """The newest appended seq (written or still buffered); ``0`` before the first."""
        return self._last_seq

    @property
    def epoch(self) -> int | None:
        """The writer's epoch; ``None`` for a read-only history."""
        return self._epoch

    def __len__(self) -> int:
        return self._last_seq - self.first_seq + 1

    def append(self, event: FlowEvent) -> None:
        """Buffer ``event`` (its seq must be ``last_seq + 1``) for the flusher to write.

        O(1), never blocks, never does I/O. Once the history has failed
        (fenced, or Redis lost: see the class), the event is dropped.

        Raises:
            trio.ClosedResourceError: the history is read-only or closed.
        """
        if self._state is not _State.OPEN:
            if self._state is _State.FAILED:
                self._last_seq = event.seq
                return
            raise trio.ClosedResourceError(
                f"the history of run {self.run_id} is {self._state.value}"
            )
        pending = self._pending
        pending.append(event)
        self._last_seq = event.seq
        n = len(pending)
        if n == 1 or n == self._batch:
            if n == 1:
                self._since = trio.current_time()  # the first event starts the interval
            self._wake()  # ... and a full batch goes now
        elif n > self._max_buffer:
            self._fail(
                lambda: trio.BrokenResourceError(
                    f"run {self.run_id}: more than {self._max_buffer} events wait to be written "
                    "to Redis; the history stopped writing"
                )
            )

    def extend(self, events: Iterable[FlowEvent]) -> None:
        """:meth:`append` each of ``events`` in order.

        Raises:
            trio.ClosedResourceError: the history is read-only or closed.
        """
        for event in events:
            self.append(event)

    async def read(self, after: int, until: int | None = None) -> Sequence[FlowEvent]:
        """The retained events with ``after < seq <= until`` (``until`` defaults to the newest).

        Events still buffered come from the buffer, the others from the
        stream (``XRANGE`` from id ``after+1-0``, in pages).

        Raises:
            HistoryExpired: some event after ``after`` is no longer retained
                (beyond :attr:`capacity`, or the run's keys expired).
            Fenced, trio.BrokenResourceError: the history failed, and the
                range holds events appended since (dropped: see the class).
            ValueError: ``after`` is negative.
            coredis.exceptions.RedisError: Redis failed (as raised by coredis;
                reads are not retried beyond coredis's own policy).

        Cancellation: nothing changes; the events are simply not returned.
        """
        if after < 0:
            raise ValueError(f"'after' must be >= 0, not {after}")
        newest = self._last_seq
        last = newest if until is None else min(until, newest)
        if after >= last:
            await trio.lowlevel.checkpoint()
            return []
        first = self.first_seq
        if after + 1 < first:
            raise HistoryExpired(after, first)
        written = self._written_seq
        local: list[FlowEvent] = []
        if last > written + len(self._pending):
            self._check()  # failed: the events appended since were dropped
        if last > written:
            # Buffered: pending[i] has seq written + 1 + i (copied now, before any await).
            pending = self._pending
            start = max(after, written) - written
            local = [pending[i] for i in range(start, last - written)]
        if after >= written:
            await trio.lowlevel.checkpoint()
            return local
        return [*await self._xrange(after, min(last, written)), *local]

    async def _xrange(self, after: int, last: int) -> list[FlowEvent]:
        events: list[FlowEvent] = []
        start = after + 1
        while start <= last:
            entries = await self._client.xrange(
                self._events_key, f"{start}-0", f"{last}-0", count=_PAGE
            )
            if not entries:
                break
            events.extend(FlowEvent.from_json(entry.field_values[b"e"]) for entry in entries)
            start = events[-1].seq + 1
        if len(events) != last - after or (events and events[0].seq != after + 1):
            # The stream lost what the record says it holds: the keys expired.
            raise HistoryExpired(after, events[0].seq if events else self._last_seq + 1)
        return events

    def _follow(self, seq: int) -> None:
        """A read-only history of a run written elsewhere: the stream now holds events up to ``seq``."""
        if self._state is not _State.READ_ONLY:
            raise trio.ClosedResourceError(
                f"the history of run {self.run_id} is {self._state.value}"
            )
        if seq > self._last_seq:
            self._last_seq = self._written_seq = seq

    # -- writing behind --------------------------------------------------------------

    def statistics(self) -> RedisHistoryStatistics:
        """A snapshot of the writer's figures."""
        return RedisHistoryStatistics(
            buffered=len(self._pending),
            max_buffer=self._max_buffer,
            written_seq=self._written_seq,
            writes=self._writes,
            retries=self._retries,
            state=self._state.value,
        )

    async def flush(self) -> None:
        """Wait until every event appended so far is written to Redis.

        Asks the writer to write at once rather than wait for a full batch
        or the interval (not before a retry's backoff has passed). While no
        task runs the client's writer (see the class), the caller runs it
        until its events are written. If cancelled, the events are still
        written behind.

        Raises:
            Fenced: the writer was fenced off (the run was claimed again).
            trio.BrokenResourceError: the history failed (Redis lost, see the class).
            trio.ClosedResourceError: the history was closed before all was written.
        """
        target = self._last_seq
        while self._written_seq < target:
            self._check()
            self._flush_now = True
            writer = self._writer
            if writer is not None and writer._leader is None and self in writer._histories:
                await writer._lead(self, until=target)  # no task runs the writer: this one does
                continue
            progress = self._progress
            self._wake()
            await progress.wait()
        await trio.lowlevel.checkpoint()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error()
        if self._state is not _State.OPEN:
            raise trio.ClosedResourceError(
                f"the history of run {self.run_id} is {self._state.value}"
            )

    def _wake(self, *, state: bool = False) -> None:
        """Tell the writer that events wait (or a flush asks).

        ``state``: the history failed or closed (its task is woken too).
        """
        if self._writer is not None:
            self._writer.wake(state=state)

    def _fail(self, error: Callable[[], BaseException]) -> None:
        """Stop writing for good; the history's task (:meth:`_flusher`) raises ``error()``."""
        if self._state is _State.OPEN:
            self._state = _State.FAILED
            self._error = error
            self._wake(state=True)
            self._advance()

    def _advance(self) -> None:
        """Wake whoever waits for written progress (or for a failure)."""
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    async def _flusher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The task of the history's ``open_history`` block, started with ``nursery.start``.

        While it runs, the history is one of its writer's (the client's); it
        raises the history's error when the history fails (which cancels
        the block), and returns once the history is closed. Whenever no
        other history's task does, it runs the writer for all of them (see
        the class).

        Raises:
            Fenced, trio.BrokenResourceError: the history failed.
        """
        if self._writer is None:
            raise trio.ClosedResourceError(f"the history of run {self.run_id} is read-only")
        await self._writer.serve(self, task_status=task_status)

    def _due(self, now: float) -> float:
        """When the writer should write this history's waiting events (``inf``: nothing waits)."""
        if not self._pending or self._error is not None or self._in_flight:
            return math.inf
        if self._flush_now or len(self._pending) >= self._batch:
            return max(now, self._retry_at)
        return max(self._since + self._interval, self._retry_at)

    def _take(self, room: int) -> tuple[list[FlowEvent], list[str | int]] | None:
        """The oldest waiting events (at most ``room``) and their script arguments.

        ``None`` if one of them cannot be encoded: the history then fails,
        and none of them is written.
        """
        batch = list(itertools.islice(self._pending, 0, room))
        final = ""
        for event in batch:
            status = _FINAL_STATUS.get(event.type)
            if status is not None:
                final = str(status)
        try:
            payloads = [event.to_json() for event in batch]
        except ValueError as exc:  # NaN or infinity in an event's data: JSON has no such number
            self._fail(functools.partial(_broken, self.run_id, exc, "an event cannot be encoded"))
            return None
        header: list[str | int] = [
            str(self._epoch),
            batch[0].seq,
            self._capacity,
            self._ttl if final else 0,
            final,
            len(batch),
        ]
        return batch, [*header, *payloads]

    def _written(self, seq: int, started: float) -> None:
        """Redis has confirmed the events up to ``seq``: drop them from the buffer."""
        pending = self._pending
        while pending and pending[0].seq <= seq:
            pending.popleft()
        self._written_seq = seq
        self._writes += 1
        self._attempt = 0
        self._retry_at = -math.inf
        if pending:
            self._since = started  # appended during the call: they waited since it started
        else:
            self._flush_now = False
        self._advance()

    def _answered(self, batch: list[FlowEvent], reply: object, started: float) -> None:
        """Handle this history's reply to a call that carried ``batch``."""
        if self._error is not None:
            return  # failed meanwhile: it writes nothing more
        if isinstance(reply, int):
            self._written(reply, started)
            return
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        code, _, value = text.partition(" ")
        epoch = self._epoch
        assert epoch is not None
        if code == "FENCED":
            current = int(value)
            self._fail(lambda: Fenced(self.run_id, epoch, current))
        elif code == "SEQ":
            stored = int(value)
            if batch[0].seq <= stored <= self._last_seq:
                # An earlier attempt (whose reply was lost) wrote up to there: the epoch
                # matched, so only this writer can have written those seqs.
                self._written(stored, started)
                return
            self._fail(
                lambda: trio.BrokenResourceError(
                    f"run {self.run_id}: Redis holds events up to seq {stored}, but seq "
                    f"{self._written_seq} was written: events were lost (Redis restarted "
                    "without persistence?); the history stopped writing"
                )
            )
        elif code == "NORUN":
            self._fail(
                lambda: trio.BrokenResourceError(
                    f"run {self.run_id}: its record is gone from Redis (expired, evicted or "
                    "flushed); the history stopped writing"
                )
            )
        else:  # an error Redis raised while writing this run's batch
            self._failed_with(_response_error(text), batch)

    def _failed_with(self, error: Exception, batch: list[FlowEvent]) -> None:
        """A call carrying ``batch`` failed with ``error``: retry after a backoff, or fail."""
        if self._error is not None:
            return
        if isinstance(error, coredis.exceptions.ResponseError):
            if not _transient(error):
                self._fail(
                    functools.partial(_broken, self.run_id, error, "Redis refused the write")
                )
                return
        elif not self._retry.should_retry(error):
            self._fail(functools.partial(_broken, self.run_id, error, "writing failed"))
            return
        self._attempt += 1
        if self._attempt >= self._retry.attempts:
            self._fail(functools.partial(_broken, self.run_id, error))
            return
        self._retries += 1
        delay = self._retry.next_delay(self._attempt)
        self._retry_at = trio.current_time() + delay
        _log.warning(
            "run %s: writing events %d-%d to Redis failed (%s); retry %d in %.2f s",
            self.run_id,
            batch[0].seq,
            batch[-1].seq,
            error,
            self._attempt,
            delay,
        )

    async def _drain(self, within: float) -> bool:
        """Flush what is buffered within ``within`` seconds (shielded); True if all was written.

        If no task runs the writer (this block's task was cancelled, and no
        other history's task leads), :meth:`flush` runs it meanwhile.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(within):
            try:
                await self.flush()
            except trio.BrokenResourceError:
                return False
        return self._written_seq >= self._last_seq

    def _close(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
        if self._writer is not None:
            self._writer.leave(self)
        self._wake(state=True)  # its task leaves the writer
        self._advance()


def _broken(
    run_id: str, error: BaseException, what: str = "Redis kept failing"
) -> trio.BrokenResourceError:
    """The error a failed history raises, caused by ``error``."""
    broken = trio.BrokenResourceError(
        f"run {run_id}: {what} ({type(error).__name__}: {error}); the history stopped writing"
    )
    broken.__cause__ = error
    return broken


def _response_error(text: str) -> coredis.exceptions.ResponseError:
    """The exception coredis would raise for the error reply ``text`` (``WRONGTYPE ...``)."""
    code = text.partition(" ")[0]
    cls = coredis.parser.Parser.EXCEPTION_CLASSES.get(code)
    if isinstance(cls, type) and issubclass(cls, coredis.exceptions.ResponseError):
        return cls(text)
    return coredis.exceptions.ResponseError(text)


def _transient(error: coredis.exceptions.ResponseError) -> bool:
    """Whether an error reply is worth retrying (Redis full, busy, read-only, ...)."""
    if isinstance(error, _TRANSIENT_ERRORS):
        return True
    return str(error).partition(" ")[0] in _TRANSIENT_CODES


class _Writer:
    """What writes behind every :class:`RedisHistory` of one client: few calls, each for many runs.

    Histories join with :meth:`serve` (their ``open_history`` block's
    task) and leave when it ends. The writer has no task of its own: one
    of the serving tasks at a time *leads* (runs :meth:`_lead`, the write
    loop for every history), the others wait; when the leader's history
    closes or fails, it finishes the calls out and another serving
    task takes over. A leader cancelled mid-call (its block was cancelled)
    leaves the batches of that call in their buffers: the next leader sends
    them again, and the script's ``SEQ`` answer recognises what the
    abandoned call wrote.
    """

    _by_client: ClassVar[weakref.WeakKeyDictionary[coredis.Redis[bytes], _Writer]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, client: coredis.Redis[bytes]) -> None:
        self._script = client.register_script(APPEND_RUNS_SCRIPT)
        self._histories: dict[RedisHistory, None] = {}  # an ordered set
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._leader: RedisHistory | None = None
        self._in_flight = 0  # calls out
        self.calls = 0
        """Script calls sent (round trips), failed ones included."""

    @classmethod
    def of(cls, client: coredis.Redis[bytes]) -> _Writer:
        """The writer of ``client``'s histories (made on first use)."""
        writer = cls._by_client.get(client)
        if writer is None:
            writer = cls._by_client[client] = cls(client)
        return writer

    def wake(self, *, state: bool = False) -> None:
        """Events wait: the leader looks again.

        ``state``: a history failed or closed, or the leader left: every
        serving task looks too (rare: not on every append).
        """
        self._wake.set()
        if state:
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    async def serve(
        self,
        history: RedisHistory,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """``history``'s task: see :meth:`RedisHistory._flusher`."""
        self._histories[history] = None  # until it closes (its block may drain it later)
        task_status.started()
        while True:
            if history._error is not None:
                raise history._error()
            if history._state is not _State.OPEN:
                return
            if self._leader is None:
                await self._lead(history)
            else:
                await self._changed.wait()

    def leave(self, history: RedisHistory) -> None:
        """``history`` closed: the writer forgets it."""
        self._histories.pop(history, None)

    async def _lead(self, own: RedisHistory, *, until: float = math.inf) -> None:
        """Write every history's waiting events, call after call, while ``own`` is open.

        Up to :data:`_MAX_IN_FLIGHT` calls are out at once, each carrying
        the batches of histories that have none out (a history's batches
        go one at a time, in order). A draining history leads only until it
        has written seq ``until``; the calls out then end first.
        """
        self._leader = own
        try:
            async with trio.open_nursery() as calls:
                while own._state is _State.OPEN and own._written_seq < until:
                    now = trio.current_time()
                    due = math.inf
                    if self._in_flight < _MAX_IN_FLIGHT:
                        due = min((h._due(now) for h in self._histories), default=math.inf)
                    if due > now:
                        self._wake = trio.Event()
                        with trio.move_on_at(due):
                            await self._wake.wait()
                        continue
                    taken = self._gather(now)
                    if taken is not None:
                        self._in_flight += 1
                        calls.start_soon(self._call, now, *taken)
        finally:
            self._leader = None
            self.wake(state=True)  # another history's task takes over
            for history in self._histories:
                history._advance()  # ... or a flush() waiting for progress

    def _gather(
        self, started: float
    ) -> (
        tuple[list[str], list[str | int], list[tuple[RedisHistory, list[FlowEvent]]], float] | None
    ):
        """The next call: the waiting batch of every history with none out (oldest first).

        One call carries at most ``_MAX_CHUNK`` events (a history's rest
        goes in a later call, once its batch is answered). The histories
        taken are marked as out.
        """
        ready = [
            history
            for history in self._histories
            if history._pending
            and history._error is None
            and not history._in_flight
            and history._retry_at <= started
        ]
        ready.sort(key=lambda history: history._since)
        room = _MAX_CHUNK
        keys: list[str] = []
        args: list[str | int] = [repr(time.time())]
        sent: list[tuple[RedisHistory, list[FlowEvent]]] = []
        timeout = math.inf
        for history in ready:
            if not room:
                break
            taken = history._take(room)
            if taken is None:
                continue
            batch, arguments = taken
            keys += (history._run_key, history._events_key)
            args += arguments
            sent.append((history, batch))
            history._in_flight = True
            room -= len(batch)
            timeout = min(timeout, history._write_timeout)
        if not sent:
            return None
        return keys, args, sent, timeout

    async def _call(
        self,
        started: float,
        keys: list[str],
        args: list[str | int],
        sent: list[tuple[RedisHistory, list[FlowEvent]]],
        limit: float,
    ) -> None:
        """One script call carrying the batches ``sent`` (made by :meth:`_gather`), within ``limit`` s."""
        self.calls += 1
        try:
            try:
                # A Redis that stopped answering (paused, partitioned) is retried too.
                with trio.fail_after(limit):
                    replies: object = await self._script(keys, args)
            except Exception as exc:  # the call failed: every batch in it did
                for history, batch in sent:
                    history._in_flight = False
                    history._failed_with(exc, batch)
                return
            try:
                if not isinstance(replies, list) or len(replies) != len(sent):
                    raise coredis.exceptions.ResponseError(f"unexpected reply {replies!r:.200}")
                for (history, batch), reply in zip(sent, replies, strict=True):
                    history._in_flight = False
                    history._answered(batch, reply, started)
            except Exception as exc:  # a reply not understood: the batches failed, not the writer
                for history, batch in sent:
                    history._in_flight = False
                    history._failed_with(exc, batch)
        finally:
            for history, _ in sent:
                history._in_flight = False
            self._in_flight -= 1
            self._wake.set()  # the leader looks again: a call may go
