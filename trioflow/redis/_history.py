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
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import coredis.exceptions
import trio

from trioflow.events import TERMINAL_TYPES, EventType, FlowEvent
from trioflow.handle import RunStatus
from trioflow.history import Fenced, HistoryExpired
from trioflow.supervise import RetryPolicy

if TYPE_CHECKING:
    import coredis

    from trioflow.redis._keys import Keys

__all__ = ["APPEND_SCRIPT", "DEFAULT_RETRY", "RedisHistory", "RedisHistoryStatistics"]

_log = logging.getLogger("trioflow.redis")

APPEND_SCRIPT = """
-- KEYS[1]: the run's record (hash), KEYS[2]: its events (stream)
-- ARGV[1]: the writer's epoch, ARGV[2]: the batch's first seq, ARGV[3]: the capacity,
-- ARGV[4]: now, ARGV[5]: TTL in seconds (0: none), ARGV[6]: final status ('': none),
-- ARGV[7..]: the events' JSON, in seq order
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return redis.error_reply('NORUN') end
if epoch ~= ARGV[1] then return redis.error_reply('FENCED ' .. epoch) end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
local first = tonumber(ARGV[2])
if first ~= last + 1 then return redis.error_reply('SEQ ' .. last) end
if ARGV[3] ~= '0' then
  for i = 7, #ARGV do
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3],
               string.format('%d-0', first + i - 7), 'e', ARGV[i])
  end
end
last = first + #ARGV - 7
redis.call('HSET', KEYS[1], 'last_seq', last, 'updated_at', ARGV[4])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[6]) end
if ARGV[5] ~= '0' then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return last
"""
"""The script that writes one batch: the fence, the seq check, the ``XADD`` s, the TTL."""

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
    """Batches written (one script call each)."""
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
    the event goes to a buffer, and a flusher task writes the buffer behind
    as soon as ``batch_size`` events wait or ``flush_interval`` seconds after
    the first one, whichever comes first, each batch through one atomic
    script (:data:`APPEND_SCRIPT`). The batch holding the run's terminal
    event sets the run's status and puts the retention TTL on its keys.

    **When Redis fails** (an error, or no answer within ``write_timeout``
    seconds), a batch is retried with the store's
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
        flush_interval: float = 0.025,
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
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._failed = trio.Event()
        self._error: Callable[[], BaseException] | None = None
        self._flush_now = False
        self._writes = 0
        self._retries = 0
        self._script = client.register_script(APPEND_SCRIPT)

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
            self._wake.set()  # the first event starts the interval; a full batch goes now
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

        Asks the flusher to write at once rather than wait for a full batch
        or the interval. If cancelled, the events are still written behind.

        Raises:
            Fenced: the writer was fenced off (the run was claimed again).
            trio.BrokenResourceError: the history failed (Redis lost, see the class).
            trio.ClosedResourceError: the history was closed before all was written.
        """
        target = self._last_seq
        while self._written_seq < target:
            self._check()
            progress = self._progress
            self._flush_now = True
            self._wake.set()
            await progress.wait()
        await trio.lowlevel.checkpoint()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error()
        if self._state is not _State.OPEN:
            raise trio.ClosedResourceError(
                f"the history of run {self.run_id} is {self._state.value}"
            )

    def _fail(self, error: Callable[[], BaseException]) -> None:
        """Stop writing for good; the flusher raises ``error()``."""
        if self._state is _State.OPEN:
            self._state = _State.FAILED
            self._error = error
            self._failed.set()
            self._wake.set()
            self._advance()

    def _stopped(self) -> bool:
        """Whether the history failed (and writes nothing more)."""
        return self._error is not None

    def _advance(self) -> None:
        """Wake whoever waits for written progress (or for a failure)."""
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    async def _flusher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the buffer behind, batch by batch, until cancelled or failed.

        A batch goes as soon as ``batch_size`` events wait (or a :meth:`flush`
        asks); else when the oldest waiting event has waited
        ``flush_interval``: the interval starts at the first event appended
        to an empty buffer, or, for events appended during a write, when
        that write started.
        """
        task_status.started()
        pending = self._pending
        deadline = math.inf
        while True:
            if self._error is not None:
                raise self._error()
            if not pending:
                self._wake = trio.Event()
                await self._wake.wait()
                deadline = trio.current_time() + self._interval
                continue
            if len(pending) < self._batch and not self._flush_now:
                self._wake = trio.Event()
                with trio.move_on_at(deadline):
                    await self._wake.wait()
                if (
                    len(pending) < self._batch
                    and not self._flush_now
                    and trio.current_time() < deadline
                ):
                    continue
            started = trio.current_time()
            await self._write_next()
            deadline = started + self._interval

    async def _write_next(self) -> None:
        """Write the oldest waiting events (at most ``_MAX_CHUNK``) as one batch."""
        pending = self._pending
        batch = list(itertools.islice(pending, 0, _MAX_CHUNK))
        await self._write(batch)
        if self._stopped():  # failed meanwhile: the batch was not written
            return
        for _ in batch:
            pending.popleft()
        self._written_seq = batch[-1].seq
        self._writes += 1
        if not pending:
            self._flush_now = False
        self._advance()

    async def _write(self, batch: list[FlowEvent]) -> None:
        """Write ``batch`` with retries; on a refusal or an error not to retry, :meth:`_fail`."""
        final = ""
        for event in batch:
            status = _FINAL_STATUS.get(event.type)
            if status is not None:
                final = str(status)
        try:
            payloads = [event.to_json() for event in batch]
        except ValueError as exc:  # NaN or infinity in an event's data: JSON has no such number
            self._fail(functools.partial(_broken, self.run_id, exc, "an event cannot be encoded"))
            return
        args: list[str | int] = [
            str(self._epoch),
            batch[0].seq,
            self._capacity,
            repr(time.time()),
            self._ttl if final else 0,
            final,
            *payloads,
        ]
        keys = [self._run_key, self._events_key]
        retry = 0
        while True:
            try:
                # A Redis that stopped answering (paused, partitioned) is retried too.
                with trio.fail_after(self._write_timeout):
                    await self._script(keys, args)
                return
            except coredis.exceptions.ResponseError as exc:
                if self._refused(exc, batch):
                    return
                error: Exception = exc
            except Exception as exc:
                if not self._retry.should_retry(exc):
                    self._fail(functools.partial(_broken, self.run_id, exc, "writing failed"))
                    return
                error = exc
            retry += 1
            if retry >= self._retry.attempts:
                self._fail(functools.partial(_broken, self.run_id, error))
                return
            self._retries += 1
            delay = self._retry.next_delay(retry)
            _log.warning(
                "run %s: writing events %d-%d to Redis failed (%s); retry %d in %.2f s",
                self.run_id,
                batch[0].seq,
                batch[-1].seq,
                error,
                retry,
                delay,
            )
            with trio.move_on_after(delay):
                await self._failed.wait()
            if self._error is not None:
                return

    def _refused(self, exc: coredis.exceptions.ResponseError, batch: list[FlowEvent]) -> bool:
        """Handle an error reply: True if handled (written, or failed for good), False to retry."""
        if isinstance(exc, _TRANSIENT_ERRORS):
            return False
        code, _, value = str(exc).partition(" ")
        epoch = self._epoch
        assert epoch is not None
        if code == "FENCED":
            current = int(value)
            self._fail(lambda: Fenced(self.run_id, epoch, current))
            return True
        if code == "SEQ":
            stored = int(value)
            if stored >= batch[-1].seq:
                return True  # an earlier attempt was applied; its reply was lost
            self._fail(
                lambda: trio.BrokenResourceError(
                    f"run {self.run_id}: Redis holds events up to seq {stored}, but seq "
                    f"{self._written_seq} was written: events were lost (Redis restarted "
                    "without persistence?); the history stopped writing"
                )
            )
            return True
        if code == "NORUN":
            self._fail(
                lambda: trio.BrokenResourceError(
                    f"run {self.run_id}: its record is gone from Redis (expired, evicted or "
                    "flushed); the history stopped writing"
                )
            )
            return True
        if code in _TRANSIENT_CODES:
            return False
        self._fail(functools.partial(_broken, self.run_id, exc, "Redis refused the write"))
        return True

    async def _drain(self, within: float) -> bool:
        """Flush what is buffered within ``within`` seconds (shielded); True if all was written."""
        with trio.CancelScope(shield=True), trio.move_on_after(within):
            try:
                await self.flush()
            except trio.BrokenResourceError:
                return False
        return self._written_seq >= self._last_seq

    def _close(self) -> None:
        if self._state is _State.OPEN:
            self._state = _State.CLOSED
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
