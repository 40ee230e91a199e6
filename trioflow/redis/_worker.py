"""The executing side: :class:`Worker` and :func:`open_worker` take runs off the queue and run them."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import coredis.exceptions
import trio

from trioflow._util import collapse_single_group
from trioflow.executor import StreamingFlowExecutor, open_executor
from trioflow.handle import CancelReason, RunStatus
from trioflow.history import Fenced
from trioflow.models._base import Message
from trioflow.redis._approvals import apply_decision, apply_decision_markers
from trioflow.redis._client import open_redis
from trioflow.redis._queue import (
    _HANDBACK_SCRIPT,
    _HEARTBEAT_SCRIPT,
    _LEAVE_SCRIPT,
    _TAKE_SCRIPT,
    QUEUE_GROUP,
    _text,
    ensure_group,
    parse_request,
)
from trioflow.redis._reaper import end_run, reap
from trioflow.redis._store import RedisRunStore
from trioflow.redis._threads import RedisThreads
from trioflow.threads import ThreadBusy, ThreadFull, ThreadNotFound

if TYPE_CHECKING:
    from trioflow.agent import Agent
    from trioflow.bus import EventBus
    from trioflow.executor import Run
    from trioflow.redis._history import RedisHistory

__all__ = ["HANDED_BACK", "Worker", "WorkerStatistics", "open_worker"]

_log = logging.getLogger("trioflow.redis")

HANDED_BACK = "handed back"
"""The local cancel reason of a run a draining worker hands back (no event is written)."""

_REDIS_DOWN = (coredis.exceptions.ConnectionError, TimeoutError, OSError)
"""Errors of a Redis that is away for now: the worker's loops log them and go on."""


class _State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """A snapshot of a :class:`Worker`: what :meth:`Worker.statistics` returns."""

    name: str
    """The worker's consumer name and owner (``host:pid`` by default)."""
    state: str
    """``"starting"``, ``"running"``, ``"draining"`` or ``"stopped"``."""
    concurrency: int
    """The most runs executed at once."""
    running: int
    """Runs executing now."""
    taken: int
    """Runs taken off the queue (claimed) so far."""
    reclaimed: int
    """Queue entries read by a consumer that never took them, taken over by this worker."""
    completed: int
    failed: int
    cancelled: int
    handed_back: int
    """Runs handed back to the queue by a ``"handback"`` drain."""
    fenced: int
    """Runs this worker stopped because another process claimed them (it was presumed lost)."""
    reaped: int
    """Other workers' lost runs this worker's reaper ended or re-queued."""


@dataclasses.dataclass(eq=False, slots=True)
class _Active:
    """A run this worker holds: its epoch, and its handle and history once started."""

    run_id: str
    epoch: int
    run: Run | None = None
    history: RedisHistory | None = None
    fenced: bool = False
    handed_back: bool = False


AgentFactory = Callable[[Any], "Agent"]


class Worker:
    """Takes runs off the work queue and executes them: claim, heartbeat, cancel, drain.

    Made and run by :func:`open_worker` (or run with ``await
    nursery.start(worker.serve)``). While serving, the worker:

    * reads the queue (:func:`~trioflow.redis.submit`) as a consumer of its
      group, one blocking read at a time and only while fewer than
      ``concurrency`` runs execute; takes over entries another consumer read
      and never took for ``lease`` seconds (``XAUTOCLAIM``);
    * claims each run (a new epoch: any earlier writer is fenced) and runs
      it on a :class:`~trioflow.StreamingFlowExecutor` whose history is the
      run's Redis stream, with the agent built from its
      :class:`~trioflow.web.RunRequest` as the web server builds it
      (:func:`~trioflow.web.open_request_agent`: ``agent_factory(request)``,
      the request's ``system`` and model options, and the model it names
      if ``allowed_models`` holds it, opened for the run); the run's
      metadata is the request's ``metadata``, its ``source``, and
      ``worker`` and ``attempt``. A request that cannot be run (invalid,
      a model not allowed or unavailable) ends ``flow.failed``;
    * renews the lease of each of its runs every ``heartbeat`` seconds (one
      script for all), carrying the epoch: a run whose epoch moved (another
      process presumed this worker lost) is *fenced*: cancelled locally,
      nothing more written;
    * cancels a run asked to (:func:`~trioflow.redis.request_cancel`) when
      the message arrives on its one pub/sub subscription, or at the next
      heartbeat, which reads the durable marker, if the message was lost;
    * every ``reap_interval`` seconds, :func:`~trioflow.redis.reap` s the
      runs of workers whose lease lapsed.

    :meth:`stop` (or leaving :func:`open_worker`'s block) stops reading the
    queue and drains: with ``drain="finish"`` the runs go on to their end,
    for at most ``drain_timeout`` seconds, after which they are cancelled
    (``flow.cancelled``, reason ``"shutdown"``); with ``"handback"`` each run
    is handed back at once: its events so far flushed, the run fenced and
    re-queued in one script (its next start counts an attempt), cancelled
    locally without a terminal event.

    Args:
        store: where runs are kept.
        agent_factory: makes the agent of a run from its request; the web
            server's default (the demo agent) if ``None``.
        allowed_models: the models a request may name (``"model"``), as
            :attr:`WebConfig.allowed_models <trioflow.web.WebConfig.allowed_models>`
            of the serve nodes that queue the runs.
        concurrency: the most runs executed at once.
        lease: seconds a run's lease lasts from each heartbeat: a worker
            silent for that long is presumed lost.
        heartbeat: seconds between heartbeats (well below ``lease``).
        drain: ``"finish"`` or ``"handback"``, see above.
        drain_timeout: the most seconds a ``"finish"`` drain waits.
        reap_interval: seconds between two reaps (``None``: this worker does not reap).
        run_timeout: the time limit of a run whose request sets none (``None``: none).
        name: the worker's consumer name and owner (the store's ``owner`` by default).
        bus: a shared bus every event of the worker's runs is also emitted
            on (see :class:`~trioflow.StreamingFlowExecutor`): the one a
            :class:`~trioflow.telemetry.Telemetry` listens to, so that its
            metrics count these runs too (``trioflow serve --workers N
            --metrics``). None by default.

    Raises:
        ValueError: ``concurrency`` < 1, ``heartbeat`` not below ``lease``, a
            non-positive time, or an unknown ``drain``.
    """

    def __init__(
        self,
        store: RedisRunStore,
        *,
        agent_factory: AgentFactory | None = None,
        allowed_models: Sequence[str] = (),
        concurrency: int = 4,
        lease: float = 5.0,
        heartbeat: float = 1.0,
        drain: Literal["finish", "handback"] = "finish",
        drain_timeout: float = 30.0,
        reap_interval: float | None = 1.0,
        run_timeout: float | None = None,
        name: str | None = None,
        bus: EventBus | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        if not 0 < heartbeat < lease:
            raise ValueError(f"need 0 < heartbeat < lease, not {heartbeat!r} and {lease!r}")
        if not drain_timeout > 0 or (reap_interval is not None and not reap_interval > 0):
            raise ValueError("drain_timeout and reap_interval must be > 0 seconds")
        if drain not in ("finish", "handback"):
            raise ValueError(f"drain is 'finish' or 'handback', not {drain!r}")
        self.store = store
        self.agent_factory = agent_factory
        self.allowed_models = tuple(allowed_models)
        self.concurrency = concurrency
        self.lease = lease
        self.heartbeat = heartbeat
        self.drain = drain
        self.drain_timeout = drain_timeout
        self.reap_interval = reap_interval
        self.run_timeout = run_timeout
        self.name = name or store.owner
        self.bus = bus
        self._state = _State.STARTING
        self._active: dict[str, _Active] = {}
        self._slots = trio.Semaphore(concurrency)
        self._stop = trio.Event()
        self._drain_started = self._drain_expired = False
        self._changed = trio.Event()
        self._counts = dict.fromkeys(
            ("taken", "reclaimed", "completed", "failed", "cancelled", "handed_back", "fenced"), 0
        )
        self._reaped = 0
        client = store.client
        self._take = client.register_script(_TAKE_SCRIPT)
        self._beat = client.register_script(_HEARTBEAT_SCRIPT)
        self._handback = client.register_script(_HANDBACK_SCRIPT)
        self.threads = RedisThreads(store)
        """The threads a run may continue (``thread_id`` in its request)."""

    def __repr__(self) -> str:
        return f"<Worker {self.name} {self._state.value} running={len(self._active)}>"

    def statistics(self) -> WorkerStatistics:
        """A snapshot of the worker's figures."""
        return WorkerStatistics(
            name=self.name,
            state=self._state.value,
            concurrency=self.concurrency,
            running=len(self._active),
            reaped=self._reaped,
            **self._counts,
        )

    def stop(self) -> None:
        """Stop taking runs and drain (see the class); :meth:`serve` returns once drained."""
        self._stop.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`, then drain and return; ``task_status.started()`` when ready.

        Ready means: the queue's consumer group exists, the cancel channel is
        subscribed, and the worker reads the queue.

        Raises:
            coredis.exceptions.RedisError: Redis could not be reached at start-up.
        """
        await ensure_group(self.store)
        with collapse_single_group():
            async with (
                open_executor(
                    bus=self.bus, history_store=self._open_history, retention=0
                ) as executor,
                trio.open_nursery() as services,
            ):
                await services.start(self._listen_cancels)
                services.start_soon(self._heartbeats, name=f"trioflow heartbeats {self.name}")
                if self.reap_interval is not None:
                    services.start_soon(self._reaper, name=f"trioflow reaper {self.name}")
                async with trio.open_nursery() as runs:
                    claiming = trio.CancelScope()
                    runs.start_soon(self._claim_loop, executor, runs, claiming)
                    self._state = _State.RUNNING
                    _log.info("worker %s ready (concurrency %d)", self.name, self.concurrency)
                    task_status.started()
                    await self._stop.wait()
                    claiming.cancel()
                    self._state = _State.DRAINING
                    await self._drain()
                services.cancel_scope.cancel()
        await self._leave()
        self._state = _State.STOPPED

    async def _leave(self) -> None:
        """Forget this worker's consumer in the queue's group (names are per process)."""
        queue = self.store.keys.queue
        with trio.move_on_after(self.heartbeat):
            try:
                await self.store.client.register_script(_LEAVE_SCRIPT)(
                    [queue], [QUEUE_GROUP, self.name]
                )
            except (*_REDIS_DOWN, coredis.exceptions.RedisError) as exc:
                _log.debug("worker %s: could not leave the group: %s", self.name, exc)

    # -- draining ----------------------------------------------------------------------

    async def _drain(self) -> None:
        self._drain_started = True
        if self.drain == "handback":
            for active in list(self._active.values()):
                await self._hand_back(active)
            return
        with trio.move_on_after(self.drain_timeout):
            while self._active:
                await self._changed.wait()
        self._drain_expired = True
        for active in list(self._active.values()):
            if active.run is not None:
                active.run.cancel(CancelReason.SHUTDOWN)

    async def _hand_back(self, active: _Active) -> None:
        """Flush the run's events, fence and re-queue it in one script, cancel it locally."""
        history = active.history
        if history is not None:
            with trio.move_on_after(self.lease):
                try:
                    await history.flush()
                except trio.BrokenResourceError:
                    pass  # fenced or Redis lost: what was written stays
        keys = self.store.keys
        run_id, epoch = active.run_id, active.epoch
        handed: object = 0
        try:
            with trio.move_on_after(self.lease):
                handed = await self._handback(
                    [keys.run(run_id), keys.queue, keys.leases], [run_id, epoch]
                )
        except (*_REDIS_DOWN, coredis.exceptions.RedisError) as exc:
            _log.warning("run %s: could not hand it back (%s)", run_id, exc)
        if handed != 1:
            _log.warning("run %s: not handed back; the reaper will end or re-queue it", run_id)
        active.handed_back = handed == 1
        self._fence(active, epoch + 1)

    def _fence(self, active: _Active, current: int) -> None:
        """Stop the run locally and write nothing more of it."""
        active.fenced = True
        if active.history is not None:
            active.history._fail(lambda: Fenced(active.run_id, active.epoch, current))
        if active.run is not None:
            active.run.cancel(HANDED_BACK if active.handed_back else "fenced")

    # -- taking and running runs --------------------------------------------------------

    async def _claim_loop(
        self, executor: StreamingFlowExecutor, runs: trio.Nursery, claiming: trio.CancelScope
    ) -> None:
        with claiming:
            while True:
                await self._slots.acquire()
                try:
                    entry_id, run_id = await self._next_entry()
                except BaseException:
                    self._slots.release()
                    raise
                runs.start_soon(self._take_and_run, executor, entry_id, run_id, name=run_id)

    async def _next_entry(self) -> tuple[str, str]:
        """The next queue entry for this worker: one idle too long elsewhere, or a new one."""
        client = self.store.client
        queue = self.store.keys.queue
        block = max(1, int(self.lease * 1000))
        next_reclaim = trio.current_time()
        failures = 0
        while True:
            try:
                if trio.current_time() >= next_reclaim:
                    next_reclaim = trio.current_time() + self.lease
                    reclaimed = await client.xautoclaim(
                        queue, QUEUE_GROUP, self.name, block, "0-0", count=1
                    )
                    if reclaimed[1]:
                        entry = reclaimed[1][0]
                        assert not isinstance(entry, bytes)
                        self._counts["reclaimed"] += 1
                        _log.warning("queue entry %r: never taken; reclaimed", entry.identifier)
                        return _text(entry.identifier), _text(entry.field_values[b"run"])
                read = await client.xreadgroup(
                    QUEUE_GROUP, self.name, {queue: ">"}, count=1, block=block
                )
                failures = 0
            except coredis.exceptions.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                await ensure_group(self.store)  # the queue was deleted (FLUSHALL?)
                continue
            except _REDIS_DOWN as exc:
                failures += 1
                delay = min(2.0, 0.05 * 2**failures)
                _log.warning(
                    "worker %s: reading the queue failed (%s); again in %.2f s",
                    self.name,
                    exc,
                    delay,
                )
                await trio.sleep(delay)
                continue
            if read:
                [entry] = read[queue.encode()]
                return _text(entry.identifier), _text(entry.field_values[b"run"])

    async def _take_and_run(
        self, executor: StreamingFlowExecutor, entry_id: str, run_id: str
    ) -> None:
        try:
            keys = self.store.keys
            try:
                reply: object = await self._take(
                    [keys.run(run_id), keys.queue, keys.leases],
                    [run_id, QUEUE_GROUP, entry_id, self.name, self.lease],
                )
            except (*_REDIS_DOWN, coredis.exceptions.RedisError) as exc:
                _log.warning("run %s: could not take it (%s); it will be reclaimed", run_id, exc)
                return
            if reply is None:
                return  # taken already, finished or gone
            assert isinstance(reply, list)
            epoch, attempt, reason, mode = map(_text, reply)
            active = _Active(run_id, int(epoch))
            self._counts["taken"] += 1
            self._active[run_id] = active
            try:
                await self._run(executor, active, int(attempt), reason, mode)
            finally:
                del self._active[run_id]
                self._changed.set()
                self._changed = trio.Event()
        finally:
            self._slots.release()

    async def _run(
        self, executor: StreamingFlowExecutor, active: _Active, attempt: int, reason: str, mode: str
    ) -> None:
        from trioflow.models import ModelError
        from trioflow.requests import default_agent, open_request_agent

        run_id = active.run_id
        try:
            record = await self.store.get(run_id)
            request, _ = parse_request(record.request)
        except (KeyError, ValueError, TypeError) as exc:
            await self._refuse(active, exc)
            return
        metadata = {
            **(request.metadata or {}),
            "source": record.request.get("source", "queue"),
            "worker": self.name,
            "attempt": attempt,
        }
        thread_id = record.request.get("thread_id") or None
        prior: tuple[Message, ...] = ()
        if thread_id is not None:  # begun by its submitter: read the conversation it continues
            metadata["thread_id"] = thread_id
            try:
                prior = await self.threads.begin(thread_id, run_id)
            except (ThreadNotFound, ThreadBusy, ThreadFull) as exc:
                await self._refuse(active, exc)
                return
            except (*_REDIS_DOWN, coredis.exceptions.RedisError) as exc:
                await self._refuse(active, exc)
                return
        elif record.request.get("messages"):  # the conversation its client sent (AG-UI)
            try:
                prior = tuple(Message.from_dict(m) for m in record.request["messages"])
            except (ValueError, TypeError, KeyError) as exc:
                await self._refuse(active, exc)
                return
        factory = self.agent_factory or default_agent
        try:
            async with (
                open_request_agent(factory, request, self.allowed_models) as agent,
                trio.open_nursery() as nursery,
            ):
                run = await executor.start(
                    agent,
                    request.task,
                    timeout=request.timeout or self.run_timeout,
                    max_iterations=request.max_iterations,
                    run_id=run_id,
                    metadata=metadata,
                    on_disconnect=request.on_disconnect,
                    nursery=nursery,
                    messages=prior,
                    on_end=None if thread_id is None else self._thread_ender(active, thread_id),
                )
                active.run = run
                if active.fenced:
                    run.cancel("fenced")
                elif reason:
                    self._cancel(active, reason, mode)
                if self._drain_started:  # taken as the drain began: drain it too
                    if self.drain == "handback":
                        await self._hand_back(active)
                    elif self._drain_expired:
                        run.cancel(CancelReason.SHUTDOWN)
        except Fenced:
            active.fenced = True
        except (ValueError, ModelError, ImportError) as exc:
            if active.run is not None:
                raise
            await self._refuse(active, exc)  # no agent for it: a model not allowed or unavailable
            return
        except Exception as exc:
            _log.exception("run %s: the worker could not run it", run_id)
            if active.run is None:  # never started: nothing of it was written, end it here
                await self._refuse(active, exc)
                return
        self._count(active)

    def _thread_ender(self, active: _Active, thread_id: str) -> Callable[[Run], Awaitable[bool]]:
        """The run's ``on_end``: end its thread under the run's epoch, before its terminal event.

        The messages are added only if the run completed and this worker
        still holds its epoch (the script checks the run's record): a
        fenced or handed-back run leaves the thread to the run's next holder
        or to the reaper's terminal event (after which the thread is free).
        """

        async def end(run: Run) -> bool:
            if active.fenced or active.handed_back:
                return False
            completed = run.result is not None and run.result.status is RunStatus.COMPLETED
            return await self.threads.end(
                thread_id,
                active.run_id,
                run.conversation if completed else None,
                epoch=active.epoch,
            )

        return end

    async def _refuse(self, active: _Active, error: Exception) -> None:
        """End a run that cannot be started (a bad request, no agent) with ``flow.failed``."""
        _log.warning("run %s: cannot start it: %s", active.run_id, error)
        data = {
            "error": {"type": type(error).__name__, "message": str(error)},
            "duration": 0.0,
            "iterations": 0,
            "percent": 0.0,
        }
        try:
            await end_run(
                self.store, active.run_id, epoch=active.epoch, type="flow.failed", data=data
            )
        except (KeyError, trio.BrokenResourceError, coredis.exceptions.RedisError) as exc:
            _log.warning("run %s: could not end it (%s)", active.run_id, exc)
        self._counts["failed"] += 1

    def _count(self, active: _Active) -> None:
        history = active.history
        if active.handed_back:
            self._counts["handed_back"] += 1
        elif active.fenced or (
            history is not None
            and history._error is not None
            and isinstance(history._error(), Fenced)
        ):
            self._counts["fenced"] += 1
        elif active.run is not None and active.run.result is not None:
            status = active.run.result.status
            key = {RunStatus.COMPLETED: "completed", RunStatus.FAILED: "failed"}.get(
                status, "cancelled"
            )
            self._counts[key] += 1

    @asynccontextmanager
    async def _open_history(self, run: Run, capacity: int) -> AsyncIterator[RedisHistory]:
        """The executor's history factory: the run's stream, under the epoch this worker claimed."""
        active = self._active[run.run_id]
        async with self.store.open_history(run.run_id, epoch=active.epoch) as history:
            active.history = history
            yield history

    # -- heartbeats, cancels, reaping ---------------------------------------------------

    async def _heartbeats(self) -> None:
        keys = self.store.keys
        while True:
            await trio.sleep(self.heartbeat)
            actives = list(self._active.values())
            if not actives:
                continue
            args: list[str | int | float] = [self.lease]
            for active in actives:
                args += [active.run_id, active.epoch]
            replies: object = None
            try:
                with trio.move_on_after(self.heartbeat):
                    replies = await self._beat(
                        [keys.leases, *(keys.run(a.run_id) for a in actives)], args
                    )
            except (*_REDIS_DOWN, coredis.exceptions.RedisError) as exc:
                _log.warning("worker %s: heartbeat failed (%s)", self.name, exc)
                continue
            if replies is None:
                _log.warning(
                    "worker %s: no heartbeat answer within %g s", self.name, self.heartbeat
                )
                continue
            assert isinstance(replies, list)
            for active, (held, value, mode) in zip(actives, replies, strict=True):
                text = _text(value)
                if not held:
                    if not active.fenced:
                        _log.warning(
                            "run %s: claimed by another process (epoch %s); stopped here",
                            active.run_id,
                            text,
                        )
                        self._fence(active, int(text))
                elif text:
                    self._cancel(active, text, _text(mode))
            for active in actives:  # decisions whose message was lost (rare: waiting calls only)
                if active.run is not None and not active.fenced:
                    try:
                        await apply_decision_markers(self.store, active.run)
                    except (*_REDIS_DOWN, coredis.exceptions.RedisError) as exc:
                        _log.warning("worker %s: reading decisions failed (%s)", self.name, exc)
                        break

    def _cancel(self, active: _Active, reason: str, mode: str) -> None:
        if active.run is None:
            return
        try:
            active.run.cancel(reason, mode=mode)
        except ValueError:
            active.run.cancel(reason)

    async def _listen_cancels(self, *, task_status: trio.TaskStatus[None]) -> None:
        keys = self.store.keys
        started = False
        while True:
            try:
                async with self.store.client.pubsub(
                    channels=[keys.cancel_channel, keys.decision_channel],
                    ignore_subscribe_messages=True,
                ) as messages:
                    if not started:
                        started = True
                        task_status.started()
                    async for message in messages:
                        if _text(message.get("channel")) == keys.decision_channel:
                            self._on_decision_message(message.get("data"))
                        else:
                            self._on_cancel_message(message.get("data"))
            except _REDIS_DOWN as exc:
                if not started:
                    raise
                _log.warning("worker %s: cancel channel lost (%s); resubscribing", self.name, exc)
                await trio.sleep(self.heartbeat)

    def _on_cancel_message(self, data: object) -> None:
        try:
            message = json.loads(data)  # type: ignore[arg-type]
            active = self._active.get(message["run_id"])
            if active is not None:
                self._cancel(active, str(message["reason"]), str(message["mode"]))
        except (TypeError, ValueError, KeyError):
            _log.warning("worker %s: a malformed cancel message: %r", self.name, data)

    def _on_decision_message(self, data: object) -> None:
        try:
            message = json.loads(data)  # type: ignore[arg-type]
            active = self._active.get(message["run_id"])
        except (TypeError, ValueError, KeyError):
            _log.warning("worker %s: a malformed decision message: %r", self.name, data)
            return
        if active is not None and active.run is not None and not active.fenced:
            apply_decision(active.run, message)

    async def _reaper(self) -> None:
        assert self.reap_interval is not None
        while True:
            await trio.sleep(self.reap_interval)
            try:
                self._reaped += len(await reap(self.store, hold=max(30.0, self.lease)))
            except (*_REDIS_DOWN, coredis.exceptions.RedisError, trio.BrokenResourceError) as exc:
                _log.warning("worker %s: reaping failed (%s)", self.name, exc)


@asynccontextmanager
async def open_worker(
    store_or_url: RedisRunStore | str,
    *,
    agent_factory: AgentFactory | None = None,
    allowed_models: Sequence[str] = (),
    concurrency: int = 4,
    lease: float = 5.0,
    heartbeat: float = 1.0,
    drain: Literal["finish", "handback"] = "finish",
    drain_timeout: float = 30.0,
    reap_interval: float | None = 1.0,
    run_timeout: float | None = None,
    name: str | None = None,
    bus: EventBus | None = None,
) -> AsyncIterator[Worker]:
    """A :class:`Worker` serving in the background for the ``async with`` block.

    ::

        async with open_worker("redis://localhost:6379/0", concurrency=8) as worker:
            await trio.sleep_forever()  # until cancelled; or worker.stop() and leave

    The worker is ready (see :meth:`Worker.serve`) when the block starts. On
    leaving the block it stops taking runs and drains as ``drain`` says
    (leaving by an exception drains as well; a cancellation of the block cancels the runs, each
    ending with ``flow.cancelled``). ``store_or_url`` is a :class:`RedisRunStore`, or a
    Redis URL for which a client (:func:`~trioflow.redis.open_redis`) and a
    store with the default prefix are opened for the block. The other
    arguments are those of :class:`Worker`.

    Raises:
        ValueError: as :class:`Worker`, or a malformed URL.
        coredis.exceptions.RedisError: Redis could not be reached at start-up.
    """

    def make(store: RedisRunStore) -> Worker:
        return Worker(
            store,
            agent_factory=agent_factory,
            allowed_models=allowed_models,
            concurrency=concurrency,
            lease=lease,
            heartbeat=heartbeat,
            drain=drain,
            drain_timeout=drain_timeout,
            reap_interval=reap_interval,
            run_timeout=run_timeout,
            name=name,
            bus=bus,
        )

    async with AsyncExitStack() as stack:
        if isinstance(store_or_url, str):
            store = RedisRunStore(await stack.enter_async_context(open_redis(store_or_url)))
        else:
            store = store_or_url
        worker = make(store)
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.serve)
                try:
                    yield worker
                finally:
                    worker.stop()
