"""A node's live tail: one blocking ``XREAD`` for every run watched in this process.

:class:`NodeTail` is what lets a serve node follow runs that another
process executes: for each run with local watchers it keeps one *feed*, an
:class:`~trioflow.EventBus` of the node whose history is the run's Redis
stream; one task reads the streams of all fed runs with a single blocking
``XREAD`` and hands each feed its new events; a feed's own task emits them,
in seq order, to the run's local subscribers (replay from the stream, then
live: :meth:`trioflow.EventBus.subscribe`'s semantics, overflow policies
included). However many clients watch a run, the node reads its stream
once per batch; however many runs it watches, it holds one blocking
connection.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import coredis.exceptions
import trio

from trioflow._event_bus import EventBus, open_event_bus
from trioflow._util import collapse_single_group
from trioflow.events import FlowEvent
from trioflow.handle import RunStatus
from trioflow.redis._history import _FINAL_STATUS, RedisHistory
from trioflow.supervise import RetryPolicy

if TYPE_CHECKING:
    from trioflow.redis._store import RedisRunStore, RunRecord

__all__ = ["DEFAULT_RECONNECT", "NodeTail", "RunFeed", "TailStatistics", "open_node_tail"]

_log = logging.getLogger("trioflow.redis")

_REDIS_DOWN = (coredis.exceptions.ConnectionError, TimeoutError, OSError)

DEFAULT_RECONNECT = RetryPolicy(attempts=1_000_000, base_delay=0.05, max_delay=2.0, jitter=0.1)
"""How the tail reconnects after Redis went away: 50 ms doubling to 2 s, without end."""


@dataclasses.dataclass(frozen=True, slots=True)
class TailStatistics:
    """A snapshot of a node's tail."""

    runs: int
    """Runs fed now (runs with local watchers)."""
    live: int
    """Of those, runs still going (in the blocking read)."""
    reads: int
    """Blocking ``XREAD`` commands that returned (with events or at their timeout)."""
    reissues: int
    """Blocking reads woken (through the node's wake stream) because the set of runs changed."""
    events: int
    """Events the tail read."""
    refills: int
    """Ranges a feed read from the stream itself (its buffer was full, or it started behind)."""
    reconnects: int
    """Times the tail waited for Redis after a failed read."""


class _MirrorHistory:
    """The history of a feed's bus: the run's stream, as far as the tail has read it."""

    __slots__ = ("_stream",)

    def __init__(self, stream: RedisHistory) -> None:
        self._stream = stream

    @property
    def capacity(self) -> int:
        return self._stream.capacity

    @property
    def first_seq(self) -> int:
        return self._stream.first_seq

    @property
    def last_seq(self) -> int:
        return self._stream.last_seq

    def __len__(self) -> int:
        return len(self._stream)

    def append(self, event: FlowEvent) -> None:
        self._stream._follow(event.seq)  # written already: by the run's executor

    async def read(self, after: int, until: int | None = None) -> Sequence[FlowEvent]:
        return await self._stream.read(after, until)


class RunFeed:
    """One run as this node follows it: a bus emitting the run's events, fed by the tail.

    Made by :meth:`NodeTail.watch`. Subscribe to :attr:`bus`
    (``bus.subscribe(after=...)``: the events after ``after`` replayed from
    the stream, then live ones; iteration ends after the terminal event).
    """

    def __init__(self, tail: NodeTail, record: RunRecord) -> None:
        self.run_id = record.run_id
        self.record = record
        self._tail = tail
        self._stream = RedisHistory(
            tail.store.client,
            tail.store.keys,
            record.run_id,
            capacity=record.capacity,
            last_seq=record.last_seq,
            epoch=None,
            retention=tail.store.retention,
        )
        self.history = _MirrorHistory(self._stream)
        self.bus: EventBus | None = None
        self.terminal: FlowEvent | None = None
        self.known_seq = record.last_seq  # the newest seq the tail (or a refill) has seen
        self.live = not record.status.finished
        self._pending: collections.deque[FlowEvent] = collections.deque()
        self._wake = trio.Event()
        self._progress = trio.Event()
        self.finished = trio.Event()
        self._ready = trio.Event()
        self._refs = 0
        self._scope = trio.CancelScope()
        if not self.live:
            self.finished.set()

    def __repr__(self) -> str:
        return f"<RunFeed {self.run_id} seq={self.last_seq} refs={self._refs} live={self.live}>"

    @property
    def last_seq(self) -> int:
        """The seq of the newest event emitted to this node's subscribers."""
        return self.record.last_seq if self.bus is None else self.bus.last_seq

    @property
    def status(self) -> RunStatus:
        """The status of the terminal event emitted, else the record's status when fed."""
        if self.terminal is not None:
            return _FINAL_STATUS[self.terminal.type]
        return self.record.status

    async def reached(self, seq: int) -> None:
        """Return once events up to ``seq`` were emitted, or the run ended."""
        while self.last_seq < seq and not self.finished.is_set():
            await self._progress.wait()
        await trio.lowlevel.checkpoint()

    def _offer(self, events: list[FlowEvent]) -> int:
        """The tail's hand-over: emit what follows now, buffer the rest (bounded) for the feed's task.

        The common case, events that follow the bus's last seq with room in
        every subscriber, is emitted here, synchronously (one step for the
        tail's whole read, no task switch per run); a gap, a full
        :attr:`~trioflow.bus.Overflow.BLOCK` subscriber or events already
        waiting go to the feed's task, in order. Returns how many were dropped.
        """
        self.known_seq = max(self.known_seq, events[-1].seq)
        bus = self.bus
        if bus is not None and self.live and not self._pending and not bus.closed:
            events = events[self._emit_now(bus, events) :]
            if not events:
                return 0
        if len(self._pending) + len(events) > self._tail.max_pending:
            dropped = len(events)  # the feed reads them back from the stream
        else:
            self._pending.extend(events)
            dropped = 0
        self._wake.set()
        return dropped

    def _emit_now(self, bus: EventBus, events: list[FlowEvent]) -> int:
        """Emit the prefix of ``events`` that follows ``bus.last_seq`` and fits now; its length."""
        taken = 0
        for event in events:
            if event.seq <= bus.last_seq:  # had already (a refill overtook the read)
                taken += 1
                continue
            if event.seq != bus.last_seq + 1:
                break
            try:
                bus.emit_nowait(event)
            except trio.WouldBlock:
                break
            except trio.ClosedResourceError:  # the feed ended meanwhile: nobody to tell
                return len(events)
            taken += 1
            if event.is_terminal():
                self.terminal = event
                self._end(bus)
                self._wake.set()  # the feed's task leaves its loop
                taken = len(events)
                break
        if taken:
            self._progress.set()
            self._progress = trio.Event()
        return taken

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the bus; emit events ``last_seq + 1 ..`` in order until the terminal one."""
        with self._scope, collapse_single_group():
            async with open_event_bus(history=self.history, name=f"feed {self.run_id}") as bus:
                self.bus = bus
                if not self.live:
                    bus.close()
                self._ready.set()
                task_status.started()
                try:
                    while self.live:
                        await self._wake.wait()
                        self._wake = trio.Event()
                        await self._catch_up(bus)
                except trio.ClosedResourceError:
                    pass  # the tail closed (the node shuts down)
                except Exception:  # the stream expired or broke: end this run's watchers
                    _log.exception("run %s: following its stream failed", self.run_id)
                    self._end(bus)
                await trio.sleep_forever()  # until the last watcher leaves

    def _end(self, bus: EventBus) -> None:
        self.live = False
        self._tail._changed()
        bus.close()
        self.finished.set()
        self._progress.set()

    async def _catch_up(self, bus: EventBus) -> None:
        pending = self._pending
        while self.live and bus.last_seq < self.known_seq:
            while pending and pending[0].seq <= bus.last_seq:
                pending.popleft()
            nxt = bus.last_seq + 1
            if pending and pending[0].seq == nxt:
                batch = []
                while pending and pending[0].seq == nxt:
                    batch.append(pending.popleft())
                    nxt += 1
            else:
                until = pending[0].seq - 1 if pending else self.known_seq
                batch = list(await self._tail._refill(self._stream, bus.last_seq, until))
            for event in batch:
                await bus.emit(event)
                if event.is_terminal():
                    self.terminal = event
                    self._end(bus)
                    break
            self._progress.set()
            self._progress = trio.Event()


class NodeTail:
    """The live tail of one process: one task, one blocking ``XREAD``, a feed per watched run.

    Open it with :func:`open_node_tail`. :meth:`watch` gives the
    :class:`RunFeed` of a run (made on the first watcher, dropped after the
    last). The tail's task reads the streams of every unfinished fed run
    with one ``XREAD BLOCK``, which also reads the node's own wake stream;
    when the set of runs changes, an entry on the wake stream ends that read
    at once and the task issues the next one over the new set (one ``XADD``
    per change, not per client; cancelling the read instead would keep its
    pooled connection taken until Redis answers it). A feed
    buffers at most ``max_pending`` events handed over by the tail; past
    that (its subscribers are slow) the tail drops what it read for that
    run and the feed reads the range back from the stream itself, so
    nothing is lost and the tail never waits for one run. After a failed
    read (Redis restarting) the tail waits ``reconnect``'s backoff and reads
    again from the last id seen of each run: no gap, no duplicate.

    Args:
        store: the runs' store.
        block: seconds one blocking read waits before it is issued again.
        count: the most entries one read returns per run.
        max_pending: the most events a feed buffers from the tail.
        max_runs: the most runs fed at once.
        reconnect: the backoff after a failed read.

    Raises:
        ValueError: a parameter out of range.
    """

    def __init__(
        self,
        store: RedisRunStore,
        *,
        block: float = 5.0,
        count: int = 512,
        max_pending: int = 4096,
        max_runs: int = 10_000,
        reconnect: RetryPolicy = DEFAULT_RECONNECT,
    ) -> None:
        if not 0 < block <= 3600:
            raise ValueError(f"block must be in (0, 3600] seconds, not {block!r}")
        if count < 1 or max_pending < count or max_runs < 1:
            raise ValueError(
                f"need count >= 1, max_pending >= count and max_runs >= 1, not "
                f"{count}, {max_pending} and {max_runs}"
            )
        self.store = store
        self.block = block
        self.count = count
        self.max_pending = max_pending
        self.max_runs = max_runs
        self.reconnect = reconnect
        self._feeds: dict[str, RunFeed] = {}
        self._nursery: trio.Nursery | None = None
        self._changed_event = trio.Event()
        self.node_id = secrets.token_hex(8)
        """This tail's id: its wake stream is :meth:`Keys.node_wake(node_id) <trioflow.redis.Keys.node_wake>`."""
        self._wake_key = store.keys.node_wake(self.node_id)
        self._wake_cursor = "0-0"
        self._reading = False  # a blocking read is outstanding
        self._wake_sent = False  # ... and a wake was sent to end it
        self._reads = self._reissues = self._events = self._refills = self._reconnects = 0

    def __repr__(self) -> str:
        return f"<NodeTail runs={len(self._feeds)} reads={self._reads}>"

    def statistics(self) -> TailStatistics:
        """A snapshot of the tail's figures."""
        return TailStatistics(
            runs=len(self._feeds),
            live=sum(1 for feed in self._feeds.values() if feed.live),
            reads=self._reads,
            reissues=self._reissues,
            events=self._events,
            refills=self._refills,
            reconnects=self._reconnects,
        )

    def close(self) -> None:
        """End every feed now: subscribers read what is buffered, then their iteration ends.

        For a node shutting down: its clients resume on another node
        (``Last-Event-ID``). Feeds made afterwards work as before.
        """
        for feed in list(self._feeds.values()):
            if feed.bus is not None and not feed.bus.closed:
                feed._end(feed.bus)

    def feed(self, run_id: str) -> RunFeed | None:
        """The run's feed if it is watched on this node now."""
        return self._feeds.get(run_id)

    def spawn(self, job: Coroutine[Any, Any, object], name: str) -> None:
        """Run ``job`` in the tail's nursery (errors are logged, not raised).

        Raises:
            RuntimeError: the tail is not open.
        """
        if self._nursery is None:
            job.close()
            raise RuntimeError("the node's tail is not open")

        async def guarded() -> None:
            try:
                await job
            except Exception:
                _log.exception("%s failed", name)

        self._nursery.start_soon(guarded, name=name)

    @asynccontextmanager
    async def watch(self, run_id: str) -> AsyncIterator[RunFeed]:
        """The run's :class:`RunFeed` for the ``async with`` block.

        Raises:
            KeyError: no such run (or its keys expired).
            RuntimeError: the tail is not open, or feeds ``max_runs`` runs already.
            coredis.exceptions.RedisError: Redis failed.
        """
        feed = self._feeds.get(run_id)
        if feed is None:
            if self._nursery is None:
                raise RuntimeError("the node's tail is not open")
            record = await self.store.get(run_id)
            feed = self._feeds.get(run_id)  # another watcher made it meanwhile
            if feed is None:
                if len(self._feeds) >= self.max_runs:
                    raise RuntimeError(f"this node follows {self.max_runs} runs already")
                feed = RunFeed(self, record)
                self._feeds[run_id] = feed
                feed._refs += 1
                try:
                    await self._nursery.start(feed._run, name=f"trioflow feed {run_id}")
                except BaseException:
                    feed._ready.set()
                    self._release(feed)
                    raise
                self._changed()
            else:
                feed._refs += 1
        else:
            feed._refs += 1
        try:
            await feed._ready.wait()  # made by a watcher still in nursery.start
            if feed.bus is None:
                raise RuntimeError(f"following run {run_id} failed to start")
            yield feed
        finally:
            self._release(feed)

    def _release(self, feed: RunFeed) -> None:
        feed._refs -= 1
        if feed._refs <= 0 and self._feeds.get(feed.run_id) is feed:
            del self._feeds[feed.run_id]
            feed.live = False  # a read already out may still bring its events: dropped
            feed._scope.cancel()
            self._changed()

    def _changed(self) -> None:
        """The set of live runs changed: wake the reader (idle, or in its blocking read)."""
        self._changed_event.set()
        if self._reading and not self._wake_sent and self._nursery is not None:
            self._wake_sent = True
            self._nursery.start_soon(self._wake, name="trioflow node tail wake")

    async def _wake(self) -> None:
        """End the blocking read: an entry on the node's wake stream, which the read includes.

        Not a cancel: cancelling a blocking ``XREAD`` drops its connection
        but keeps its place in coredis's pool (until Redis answers the
        abandoned read), so 64 changes within one ``block`` would exhaust
        the pool. The read fails on its own if Redis is away.
        """
        client = self.store.client
        try:
            await client.xadd(
                self._wake_key,
                {"w": "1"},
                trim_strategy=coredis.PureToken.MAXLEN,
                trim_operator=coredis.PureToken.APPROXIMATELY,
                threshold=16,
            )
            await client.expire(self._wake_key, 3600)
        except _REDIS_DOWN as exc:
            _log.debug("waking the node's tail failed (%s)", exc)

    async def _refill(self, stream: RedisHistory, after: int, until: int) -> Sequence[FlowEvent]:
        """Read ``after < seq <= until`` back from the stream, retrying while Redis is away."""
        stream._follow(until)
        self._refills += 1
        attempt = 0
        while True:
            try:
                return await stream.read(after, until)
            except _REDIS_DOWN as exc:
                attempt += 1
                delay = self.reconnect.next_delay(attempt)
                _log.warning(
                    "run %s: reading the stream failed (%s); again in %.2f s",
                    stream.run_id,
                    exc,
                    delay,
                )
                await trio.sleep(delay)

    async def _read_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The tail: one blocking ``XREAD`` at a time over every live fed run."""
        task_status.started()
        keys = self.store.keys
        client = self.store.client
        wake = self._wake_key.encode()
        failures = 0
        while True:
            feeds = {keys.events(f.run_id).encode(): f for f in self._feeds.values() if f.live}
            self._changed_event = trio.Event()
            if not feeds:
                await self._changed_event.wait()
                continue
            streams = {key: f"{feed.known_seq}-0" for key, feed in feeds.items()}
            streams[wake] = self._wake_cursor
            self._reading, self._wake_sent = True, False
            try:
                reply: Any = await client.xread(
                    streams, count=self.count, block=max(1, int(self.block * 1000))
                )
            except _REDIS_DOWN as exc:
                failures += 1
                self._reconnects += 1
                delay = self.reconnect.next_delay(failures)
                _log.warning("the node's tail lost Redis (%s); reading again in %.2f s", exc, delay)
                await trio.sleep(delay)
                continue
            finally:
                self._reading = False
            woken = (reply or {}).pop(wake, None)
            if woken:
                self._wake_cursor = woken[-1].identifier.decode()
                self._reissues += 1
            failures = 0
            self._reads += 1
            for key, entries in (reply or {}).items():
                feed = feeds.get(key)
                if feed is None or not entries or not feed.live:
                    continue  # not followed (any more): the last watcher left during the read
                if self._feeds.get(feed.run_id) is not feed:
                    continue
                events = [FlowEvent.from_json(entry.field_values[b"e"]) for entry in entries]
                events = [e for e in events if e.seq > feed.known_seq]
                if events:
                    self._events += len(events)
                    feed._offer(events)


@asynccontextmanager
async def open_node_tail(store: RedisRunStore, **options: Any) -> AsyncIterator[NodeTail]:
    """A running :class:`NodeTail` of ``store`` for the ``async with`` block (``options``: its arguments).

    The block owns the tail's task and every feed's task (started with
    ``nursery.start``); they are cancelled on exit, ending the feeds'
    subscriptions.

    Raises:
        ValueError: an option out of range.
    """
    tail = NodeTail(store, **options)
    with collapse_single_group():
        async with trio.open_nursery() as nursery:
            tail._nursery = nursery
            await nursery.start(tail._read_loop, name="trioflow node tail")
            try:
                yield tail
            finally:
                tail._nursery = None
                nursery.cancel_scope.cancel()
