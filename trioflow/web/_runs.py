"""Runs as the web server sees them: requests, starting, watching, draining.

* :class:`RunRequest` is a validated request to start a run (the body of
  ``POST /runs``, or a ``start`` message on ``/ws``).
* :class:`RunHub` is the one object the endpoints share: it starts runs on
  the executor (in the server's own nursery), finds them, counts the
  connections that watch each run (to apply :class:`OnDisconnect` when the
  last one goes away) and drains everything on a graceful shutdown.

The hub knows nothing of HTTP framing: transports (``sse``, ``ws``) call it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from trioflow.agent import Agent
from trioflow.approvals import ApprovalError, PendingApproval
from trioflow.executor import Run, StreamingFlowExecutor
from trioflow.handle import CancelMode, CancelReason, OnDisconnect, RunHandle, RunStatus
from trioflow.models import ModelError
from trioflow.requests import (
    AgentFactory,
    ModelNotAllowed,
    RunRequest,
    default_agent,
    open_request_agent,
    request_agent,
    with_model,
)
from trioflow.threads import (
    Thread,
    ThreadBusy,
    ThreadFull,
    ThreadLimitReached,
    ThreadNotFound,
    Threads,
    ThreadStore,
)
from trioflow.tools import ToolInputError
from trioflow.web._config import WebConfig
from trioflow.web._errors import ApiError

if TYPE_CHECKING:
    from trioflow.models._base import Message
    from trioflow.recording import ReplayRun
    from trioflow.redis import NodeTail, RedisRunStore, RemoteRun, WatcherCounts
    from trioflow.web._fanout import EventFanout

_log = logging.getLogger("trioflow.web")

_REMOTE_CACHE = 4096
"""The most runs executed elsewhere a hub keeps handles of (least recently used out first)."""

_LIST_LIMIT = 1000
"""The most runs ``GET /runs`` lists from a store."""

F = TypeVar("F")
P = TypeVar("P")

__all__ = [
    "AgentFactory",
    "ModelNotAllowed",
    "OnDisconnect",
    "RunHub",
    "RunRequest",
    "Watch",
    "default_agent",
    "on_disconnect",
    "open_request_agent",
    "request_agent",
    "resume_point",
]


class Watch:
    """One connection watching one run, from :meth:`RunHub.attach` to :meth:`release`."""

    __slots__ = ("_hub", "_released", "run")

    def __init__(self, hub: RunHub, run: RunHandle) -> None:
        self._hub = hub
        self.run = run
        self._released = False

    def release(self, *, disconnected: bool) -> None:
        """Stop watching; idempotent.

        Args:
            disconnected: whether the client went away (rather than the
                server ending the stream). When the last watcher of an
                unfinished run disconnects and the run's ``on_disconnect`` is
                ``cancel``, the run is cancelled.
        """
        if self._released:
            return
        self._released = True
        self._hub._detach(self.run, disconnected=disconnected)


class RunHub:
    """What the endpoints share: the executor, the agent factory, the options and the counts.

    Made by :func:`~trioflow.web.create_app`, reachable as
    ``app.state.trioflow``. Its :meth:`lifespan` gives runs a nursery for the
    server's lifetime; :meth:`drain` is the graceful shutdown.

    Args:
        executor: the executor that runs and registers the runs.
        agent: an :class:`~trioflow.Agent` for every run, an
            :data:`AgentFactory`, or ``None`` for :func:`default_agent`.
        config: the server's options.
        store: runs kept in Redis (:class:`~trioflow.redis.RedisRunStore`):
            the hub then also serves runs this process does not execute
            (:meth:`resolve`, :meth:`list_runs`), through the node's tail
            (:class:`~trioflow.redis.NodeTail`, open while the lifespan
            runs), and honours cancel requests from other nodes for its own
            runs (:func:`~trioflow.redis.listen_for_cancels`).
        enqueue: with a store, put the runs it starts on the work queue
            (:func:`~trioflow.redis.submit`) for workers to execute
            (:func:`~trioflow.redis.open_worker`, ``trioflow worker``)
            instead of executing them here, and serve each as a
            :class:`~trioflow.redis.RemoteRun`. A thread's runs too: with
            a store, the threads are kept in Redis
            (:class:`~trioflow.redis.RedisThreads`), so any node serves them
            and the worker that takes a thread's run reads its messages.

    Raises:
        ValueError: a ``store`` with an executor that does not keep its runs
            there, or ``enqueue`` without a store.
    """

    def __init__(
        self,
        executor: StreamingFlowExecutor,
        agent: Agent | AgentFactory | None,
        config: WebConfig,
        *,
        store: RedisRunStore | None = None,
        enqueue: bool = False,
    ) -> None:
        if enqueue and store is None:
            raise ValueError("enqueue needs a store: runs are queued in Redis")
        if store is not None and executor.history_store is None:
            raise ValueError(
                "a server on Redis executes runs into Redis: StreamingFlowExecutor("
                "history_store=store.history_factory(), run_ids=new_run_id)"
            )
        self.executor = executor
        self.config = config
        self.store = store
        """The Redis store of runs, or ``None`` (this process's runs only)."""
        self.enqueue = enqueue
        """Whether the runs it starts are queued for workers rather than executed here."""
        self.tail: NodeTail | None = None
        """The node's live tail while the lifespan runs on a store, else ``None``."""
        self.watch_counts: WatcherCounts | None = None
        """This node's share of the runs' watchers in Redis (with a store, while the lifespan runs)."""
        self._remote: collections.OrderedDict[str, RemoteRun] = collections.OrderedDict()
        if agent is None:
            self._factory: AgentFactory = default_agent
        elif isinstance(agent, Agent):
            shared = agent
            self._factory = lambda request: shared
        else:
            self._factory = agent
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self._watchers: dict[str, int] = {}
        self._watchers_changed = trio.Event()
        self._connections: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._replays: dict[str, ReplayRun] = {}
        self._fanouts: dict[tuple[str, str], EventFanout[Any, Any]] = {}
        self.threads: ThreadStore
        """The server's conversations (:mod:`trioflow.threads`): in memory
        (:class:`~trioflow.threads.Threads`), or with a store in Redis
        (:class:`~trioflow.redis.RedisThreads`), bounded by
        :attr:`WebConfig.max_threads` and :attr:`WebConfig.max_thread_messages`."""
        if store is None:
            self.threads = Threads(
                max_threads=config.max_threads, max_messages=config.max_thread_messages
            )
        else:
            from trioflow.redis import RedisThreads

            self.threads = RedisThreads(
                store,
                max_threads=config.max_threads,
                max_messages=config.max_thread_messages,
                retention=config.thread_retention,
            )

    # -- lifecycle ---------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """Whether a shutdown has begun (no new runs are accepted)."""
        return self._closing.is_set()

    async def wait_closing(self) -> None:
        """Return once a shutdown has begun."""
        await self._closing.wait()

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """The ASGI lifespan: a nursery for runs while the server is up.

        On exit, runs still going are cancelled (each ends with
        ``flow.cancelled``) and waited for. With a store, the node's tail
        and the cancel listener run for as long; the streams of runs
        executed elsewhere end on exit (their clients resume on another node).
        """
        async with AsyncExitStack() as stack:
            listener = trio.CancelScope()
            if self.store is not None:
                from trioflow.redis import open_node_tail

                self.tail = await stack.enter_async_context(open_node_tail(self.store))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.store is not None:
                    from trioflow.redis import WatcherCounts

                    assert self.tail is not None
                    self.watch_counts = WatcherCounts(self.store, self.tail.node_id)
                    await nursery.start(self._listen_for_cancels, listener)
                    await nursery.start(self.watch_counts.run)
                try:
                    yield
                finally:
                    self._nursery = None
                    self._closing.set()
                    listener.cancel()
                    self.executor.cancel_all(CancelReason.SERVER_SHUTDOWN)
                    for replay in self._replays.values():
                        replay.cancel(CancelReason.SERVER_SHUTDOWN)
                    if self.tail is not None:
                        self.tail.close()
                    nursery.cancel_scope.cancel()  # the watcher counts' writer
            self.tail = None
            self.watch_counts = None

    async def _listen_for_cancels(
        self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]
    ) -> None:
        from trioflow.redis import listen_for_cancels

        assert self.store is not None
        with scope:
            await listen_for_cancels(self.store, self.executor, task_status=task_status)

    async def drain(self, grace: float) -> None:
        """Shut down gracefully: refuse new runs, cancel running ones, let streams finish.

        Every running run of the executor is cancelled, so each emits
        ``flow.cancelled``; event streams deliver it and end. Replays still
        going are stopped (their streams end without a terminal event: the
        recording did not hold one yet). Waits at most ``grace`` seconds,
        then cancels the connections still open.
        """
        self._closing.set()
        if self.tail is not None:
            self.tail.close()  # streams of runs executed elsewhere end: resumed on another node
        with trio.move_on_after(grace):
            self.executor.cancel_all(CancelReason.SERVER_SHUTDOWN)
            for replay in self._replays.values():
                replay.cancel(CancelReason.SERVER_SHUTDOWN)
            for run in list(self.executor.runs.values()):
                await run.wait()
            for replay in list(self._replays.values()):
                await replay.wait()
            while self._connections:
                await self._idle.wait()
        for scope in list(self._connections):
            scope.cancel()
        await trio.lowlevel.checkpoint()

    @contextmanager
    def connection(self, scope: trio.CancelScope | None = None) -> Iterator[trio.CancelScope]:
        """Track a streaming connection for :meth:`drain`, inside a cancel scope it may cancel.

        ``scope``: the connection's own scope to track (its nursery's, say)
        instead of a new one around the block.
        """
        if scope is not None:
            self._track(scope)
            try:
                yield scope
            finally:
                self._untrack(scope)
            return
        with trio.CancelScope() as scope:
            self._track(scope)
            try:
                yield scope
            finally:
                self._untrack(scope)

    def _track(self, scope: trio.CancelScope) -> None:
        if not self._connections:
            self._idle = trio.Event()
        self._connections.add(scope)

    def _untrack(self, scope: trio.CancelScope) -> None:
        self._connections.discard(scope)
        if not self._connections:
            self._idle.set()

    # -- runs --------------------------------------------------------------------

    def running(self) -> int:
        """How many runs of the executor are going now."""
        return sum(1 for run in self.executor.runs.values() if not run.done)

    async def start(
        self,
        request: RunRequest,
        *,
        source: str,
        thread: Thread | None = None,
        messages: Sequence[Message] = (),
    ) -> RunHandle:
        """Start a run for ``request`` and return it once it is running.

        Args:
            request: the validated request.
            source: where it came from (``"http"``, ``"ws"``), kept in the
                run's ``metadata``; the request's ``on_disconnect`` becomes
                the run's :attr:`~trioflow.handle.RunHandle.on_disconnect`.
            thread: the conversation the run continues (``request.task`` is
                its next message).
            messages: without a thread, the conversation the run continues
                as the client sends it (AG-UI's ``RunAgentInput``): the model
                sees them first; they travel with a queued run to its worker.

        Raises:
            ApiError: ``503`` while shutting down or before the server is up,
                ``429`` when :attr:`WebConfig.max_running` runs are going,
                ``400`` when the agent factory or the executor rejects the
                request, ``409`` ``thread_busy`` or ``thread_full``.
        """
        if self.closing:
            raise ApiError(503, "shutting_down", "the server is shutting down; no new runs")
        if self.running() >= self.config.max_running:
            raise ApiError(
                429,
                "too_many_runs",
                f"{self.config.max_running} runs are going already; try again when one ends",
                headers={"Retry-After": "1"},
            )
        try:
            agent = request_agent(self._factory, request, self.config.allowed_models)
        except ModelNotAllowed as exc:
            raise ApiError(
                400, "model_not_allowed", str(exc), allowed=list(self.config.allowed_models)
            ) from None
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        if thread is not None and messages:
            raise ApiError(400, "invalid_request", "a thread's run continues the thread's messages")
        return await self._launch(agent, request, source=source, thread=thread, messages=messages)

    async def _launch(
        self,
        agent: Agent,
        request: RunRequest,
        *,
        source: str,
        thread: Thread | None,
        messages: Sequence[Message] = (),
    ) -> RunHandle:
        """The one place a run is started: executed here, or queued for a worker.

        With a store, the executor writes the run's events to Redis, so
        every node serves it. A hub that enqueues (``trioflow serve --redis
        URL --workers N``) submits the request instead (a thread's runs
        and returns the run's :class:`~trioflow.redis.RemoteRun`: the worker
        builds its agent from the request by the same rule
        (:func:`open_request_agent`). A thread's run on a store begins the
        thread in Redis first (:meth:`_launch_on_thread`).
        """
        if thread is not None and self.store is not None:
            return await self._launch_on_thread(agent, request, source, thread.thread_id)
        if self.enqueue:
            return await self._submit(request, source, messages=messages)
        metadata = {**(request.metadata or {}), "source": source}
        try:
            if request.model is not None:
                return await self._start_with_model(
                    request, agent, metadata, thread, messages=messages
                )
            return await self._execute(
                agent, request, metadata, thread, self._nursery, messages=messages
            )
        except ThreadBusy as exc:
            raise ApiError(409, "thread_busy", str(exc), run_id=exc.run_id) from None
        except ThreadFull as exc:
            raise ApiError(409, "thread_full", str(exc), limit=exc.limit) from None
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        except RuntimeError as exc:
            raise ApiError(503, "not_ready", f"the server cannot start runs: {exc}") from None

    async def _launch_on_thread(
        self, agent: Agent, request: RunRequest, source: str, thread_id: str
    ) -> RunHandle:
        """Begin thread ``thread_id`` in Redis with a new run id, then queue or execute the run.

        Begun before the run exists, atomically (``409`` on any node while
        another run of the thread goes). A queued run's worker reads the
        thread's messages and ends it; a run executed here is ended by this
        node once it is over. If the run cannot be started, the thread is
        ended at once, its messages untouched.

        Raises:
            ApiError: ``404`` ``thread_not_found``, ``409`` ``thread_busy`` or
                ``thread_full``, ``503`` when Redis fails, and as :meth:`_launch`.
        """
        from trioflow.redis import new_run_id

        run_id = new_run_id()
        try:
            prior = await self.threads.begin(thread_id, run_id)
        except ThreadNotFound as exc:
            raise ApiError(404, "thread_not_found", str(exc)) from None
        except ThreadBusy as exc:
            raise ApiError(409, "thread_busy", str(exc), run_id=exc.run_id) from None
        except ThreadFull as exc:
            raise ApiError(409, "thread_full", str(exc), limit=exc.limit) from None
        except Exception as exc:
            raise store_unavailable(exc) from None
        started = False
        try:
            if self.enqueue:
                run = await self._submit(request, source, run_id=run_id, thread_id=thread_id)
            else:
                metadata = {**(request.metadata or {}), "source": source, "thread_id": thread_id}
                ender = self._thread_ender(thread_id)
                try:
                    if request.model is not None:
                        run = await self._start_with_model(
                            request,
                            agent,
                            metadata,
                            None,
                            run_id=run_id,
                            messages=prior,
                            on_end=ender,
                        )
                    else:
                        run = await self._execute(
                            agent,
                            request,
                            metadata,
                            None,
                            self._nursery,
                            run_id=run_id,
                            messages=prior,
                            on_end=ender,
                        )
                except ValueError as exc:
                    raise ApiError(400, "invalid_request", str(exc)) from None
                except RuntimeError as exc:
                    raise ApiError(
                        503, "not_ready", f"the server cannot start runs: {exc}"
                    ) from None
            started = True
            return run
        finally:
            if not started:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await self.threads.end(thread_id, run_id, None)
                    except Exception as exc:
                        _log.warning("thread %s: could not end run %s (%s)", thread_id, run_id, exc)

    def _thread_ender(self, thread_id: str) -> Callable[[Run], Awaitable[bool]]:
        """A run's ``on_end`` (executed here): end ``thread_id`` with its messages if it completed."""

        async def end(run: Run) -> bool:
            completed = run.result is not None and run.result.status is RunStatus.COMPLETED
            return await self.threads.end(
                thread_id, run.run_id, run.conversation if completed else None
            )

        return end

    async def _submit(
        self,
        request: RunRequest,
        source: str,
        *,
        run_id: str | None = None,
        thread_id: str | None = None,
        messages: Sequence[Message] = (),
    ) -> RunHandle:
        """Queue ``request`` (its ``source``, ``thread_id`` and ``messages`` kept) and return its :class:`~trioflow.redis.RemoteRun`.

        Raises:
            ApiError: ``503`` ``not_ready`` before the server is up, or
                ``store_unavailable`` when Redis fails.
        """
        from trioflow.redis import RemoteRun, submit

        assert self.store is not None
        if self.tail is None:
            raise ApiError(503, "not_ready", "the server is not up; try again")
        body = {**request.to_json(), "source": source}
        if thread_id is not None:
            body["thread_id"] = thread_id
        if messages:
            body["messages"] = [message.to_dict() for message in messages]
        try:
            run_id = await submit(self.store, body, run_id=run_id)
            remote = RemoteRun(self.store, self.tail, await self.store.get(run_id))
        except Exception as exc:
            raise store_unavailable(exc) from None
        self._cache(remote)
        return remote

    async def _execute(
        self,
        agent: Agent,
        request: RunRequest,
        metadata: dict[str, Any],
        thread: Thread | None,
        nursery: trio.Nursery | None,
        *,
        run_id: str | None = None,
        messages: Sequence[Message] = (),
        on_end: Callable[[Run], Awaitable[bool]] | None = None,
    ) -> RunHandle:
        """``request``'s run on the hub's executor, with ``agent`` (the request's limits and policy)."""
        return await self.executor.start(
            agent,
            request.task,
            timeout=request.timeout,
            max_iterations=request.max_iterations,
            metadata=metadata,
            on_disconnect=request.on_disconnect,
            nursery=nursery,
            thread=thread,
            run_id=run_id,
            messages=messages,
            on_end=on_end,
        )

    async def _start_with_model(
        self,
        request: RunRequest,
        agent: Agent,
        metadata: dict[str, Any],
        thread: Thread | None,
        *,
        run_id: str | None = None,
        messages: Sequence[Message] = (),
        on_end: Callable[[Run], Awaitable[bool]] | None = None,
    ) -> RunHandle:
        """Start ``request``'s run with the model it names, opened for the run and closed after it.

        Raises:
            ApiError: ``503`` ``model_unavailable`` when the model cannot be
                opened (no API key, its SDK not installed).
            ValueError, RuntimeError: as :meth:`StreamingFlowExecutor.start`.
        """
        if self._nursery is None:
            raise RuntimeError("the server's lifespan is not running")
        nursery = self._nursery

        async def own(*, task_status: trio.TaskStatus[RunHandle]) -> None:
            assert request.model is not None
            try:
                async with with_model(agent, request.model) as agent_with_model:
                    run = await self._execute(
                        agent_with_model,
                        request,
                        metadata,
                        thread,
                        nursery,
                        run_id=run_id,
                        messages=messages,
                        on_end=on_end,
                    )
                    task_status.started(run)
                    await run.wait()
            except (ModelError, ImportError) as exc:  # only opening the model raises these
                raise ApiError(
                    503, "model_unavailable", f"model {request.model!r} cannot be used: {exc}"
                ) from None

        run: RunHandle = await nursery.start(own)
        return run

    def add_replay(self, replay: ReplayRun) -> None:
        """Serve a started :class:`~trioflow.recording.ReplayRun` as a run (``trioflow serve --replay``).

        :meth:`get` finds it by its ``run_id`` (before the executor's runs),
        so ``GET /runs/{id}``, ``/runs/{id}/events`` and the WebSockets serve
        it like a live run; ``GET /runs`` lists it: a replay is a
        :class:`~trioflow.handle.RunHandle`, as a live run is. It is never
        forgotten, and is stopped on shutdown.

        Raises:
            ValueError: the replay has no run id (it has not started, or the
                recording is empty).
        """
        if not replay.run_id:
            raise ValueError(f"replay of {replay.path!r} has no run id (is the recording empty?)")
        self._replays[replay.run_id] = replay

    def replays(self) -> list[RunHandle]:
        """The replays served as runs (see :meth:`add_replay`), in the order they were added."""
        return list(self._replays.values())

    def runs(self) -> list[RunHandle]:
        """Every run served: the replays, then the executor's retained runs, oldest first."""
        return [*self._replays.values(), *self.executor.runs.values()]

    def get(self, run_id: str) -> RunHandle:
        """The run with that id: a replay, an executor's run, or one :meth:`resolve` found.

        A replay is one added with :meth:`add_replay`; a run executed by
        another process is found once :meth:`resolve` read it from the store.

        Raises:
            ApiError: ``404`` when there is no such run (or it was forgotten).
        """
        replay = self._replays.get(run_id)
        if replay is not None:
            return replay
        try:
            return self.executor.get_run(run_id)
        except KeyError:
            remote = self._remote.get(run_id)
            if remote is not None:
                return remote
            raise ApiError(404, "run_not_found", f"no run with id {run_id!r}") from None

    def _is_local(self, run_id: str) -> bool:
        return run_id in self._replays or run_id in self.executor.runs

    async def resolve(self, run_id: str) -> None:
        """Make :meth:`get` find ``run_id`` if it is a run of the store this process does not execute.

        Reads the run's record (one round trip): a handle is made, or the
        cached one refreshed. Nothing happens without a store, or for a run
        of this process. The routes about one run call it first.

        Raises:
            ApiError: ``503`` (``store_unavailable``) when Redis fails, or
                before the server is up.
        """
        if self.store is None or self._is_local(run_id):
            await trio.lowlevel.checkpoint()
            return
        remote = self._remote.get(run_id)
        try:
            if remote is not None:
                await remote.refresh()
                self._remote.move_to_end(run_id)
                return
            if self.tail is None:
                raise ApiError(503, "not_ready", "the server is not up; try again")
            from trioflow.redis import open_remote_run

            self._cache(await open_remote_run(self.store, self.tail, run_id))
        except KeyError:
            self._remote.pop(run_id, None)
        except ApiError:
            raise
        except Exception as exc:
            raise store_unavailable(exc) from None

    def _cache(self, remote: RemoteRun) -> None:
        self._remote[remote.run_id] = remote
        self._remote.move_to_end(remote.run_id)
        while len(self._remote) > _REMOTE_CACHE:
            self._remote.popitem(last=False)

    async def list_runs(self) -> list[RunHandle]:
        """What ``GET /runs`` lists: :meth:`runs`, or with a store, the store's runs, oldest first.

        From a store: the replays, then the newest runs of the store (this
        process's own as their live handles, the others as
        :class:`~trioflow.redis.RemoteRun`).

        Raises:
            ApiError: ``503`` (``store_unavailable``) when Redis fails.
        """
        if self.store is None or self.tail is None:
            await trio.lowlevel.checkpoint()
            return self.runs()
        from trioflow.redis import RemoteRun

        try:
            records = await self.store.list(limit=_LIST_LIMIT)
        except Exception as exc:
            raise store_unavailable(exc) from None
        listed: list[RunHandle] = list(self._replays.values())
        for record in reversed(records):
            local = self.executor.runs.get(record.run_id)
            if local is not None:
                listed.append(local)
                continue
            remote = self._remote.get(record.run_id)
            if remote is None:
                remote = RemoteRun(self.store, self.tail, record)
            else:
                remote.record = record
            listed.append(remote)
        return listed

    def cancel(
        self,
        run: RunHandle,
        reason: CancelReason | str = CancelReason.CLIENT,
        *,
        mode: CancelMode = CancelMode.IMMEDIATE,
    ) -> None:
        """Cancel ``run`` (at once, or after its current turn: ``mode``); it ends with ``flow.cancelled``. Cancelling twice is fine.

        Raises:
            ApiError: ``409`` when the run has finished already.
        """
        if run.done:
            raise ApiError(
                409,
                "run_finished",
                f"run {run.run_id} has finished already ({run.status})",
                status=str(run.status),
            )
        run.cancel(reason, mode=mode)

    async def decide(self, run: RunHandle, call_id: str, body: object) -> PendingApproval:
        """Take the decision in ``body`` (``{"decision", "reason"?, "input"?}``) on ``run``'s waiting call ``call_id``.

        The one reading of a decision for HTTP and the WebSocket protocol.
        A run executed by another process (with Redis) gets it through
        :meth:`RemoteRun.send_decision <trioflow.redis.RemoteRun.send_decision>`,
        an edit checked first against the tool's schema of the agent this
        server would build for the run's request.

        Raises:
            ApiError: ``400`` ``invalid_request`` (a body that is not that
                object, or a decision that does not fit, see
                :meth:`~trioflow.approvals.Approvals.decide`), ``400``
                ``invalid_input`` (an edit that does not match the tool's
                schema: the call still waits), ``404`` ``approval_not_found``
                (no such call waits), ``409`` ``approval_decided`` (decided
                already, or timed out).
        """
        if not isinstance(body, Mapping) or "decision" not in body or set(body) - _DECISION_KEYS:
            raise ApiError(
                400,
                "invalid_request",
                'send {"decision": "approve" | "deny" | "edit", "reason"?: string, "input"?: object}',
            )
        reason, edited = body.get("reason"), body.get("input")
        if reason is not None and not isinstance(reason, str):
            raise ApiError(400, "invalid_request", "'reason' must be a string")
        if edited is not None and not isinstance(edited, Mapping):
            raise ApiError(400, "invalid_request", "'input' must be an object")
        try:
            if self.store is not None and not self._is_local(run.run_id):
                return await self._decide_remote(run, call_id, body["decision"], reason, edited)
            if self.store is not None:
                return await self._decide_stored(run, call_id, body["decision"], reason, edited)
            await trio.lowlevel.checkpoint()
            return run.decide(call_id, body["decision"], reason=reason, input=edited)
        except ApprovalError as exc:
            if exc.decided:
                raise ApiError(409, "approval_decided", str(exc), call_id=call_id) from None
            raise ApiError(404, "approval_not_found", str(exc), call_id=call_id) from None
        except ToolInputError as exc:
            raise ApiError(400, "invalid_input", str(exc), call_id=call_id) from None
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None

    async def _decide_remote(
        self,
        run: RunHandle,
        call_id: str,
        decision: object,
        reason: str | None,
        edited: Mapping[str, Any] | None,
    ) -> PendingApproval:
        from trioflow.redis import RemoteRun
        from trioflow.redis._queue import parse_request

        assert isinstance(run, RemoteRun)
        try:
            await run.refresh()  # the calls asked since the handle was made
            if edited is not None:
                asked = run.record.approvals.get(call_id)
                if asked is not None:  # unknown calls are refused by send_decision
                    request, _ = parse_request(run.record.request)
                    agent = request_agent(self._factory, request, self.config.allowed_models)
                    for tool in agent.tools:
                        if tool.name == asked.get("tool"):
                            tool.validate(edited)
            return await run.send_decision(call_id, str(decision), reason=reason, input=edited)
        except KeyError:
            raise ApiError(404, "run_not_found", f"no run with id {run.run_id!r}") from None
        except (ApprovalError, ToolInputError, ValueError):
            raise
        except Exception as exc:
            raise store_unavailable(exc) from None

    async def _decide_stored(
        self,
        run: RunHandle,
        call_id: str,
        decision: object,
        reason: str | None,
        edited: Mapping[str, Any] | None,
    ) -> PendingApproval:
        """Decide a call of a run executed here, with a store: the durable marker first.

        The marker makes the decision once across nodes (a node deciding
        the same call through Redis at the same time gets ``409``); the call
        is then decided here (or already was, by this node's listener
        hearing the marker's message first: the same decision).
        """
        from trioflow.redis import request_decision

        assert self.store is not None
        pending = next((p for p in run.pending_approvals() if p.call_id == call_id), None)
        if pending is None:
            await trio.lowlevel.checkpoint()
            run.decide(call_id, str(decision), reason=reason, input=edited)  # raises, as it should
            raise ApprovalError(call_id, decided=True)  # pragma: no cover - decide raised
        if edited is not None and pending._tool is not None:
            pending._tool.validate(edited)  # refused before anything is written
        try:
            # The client may have seen the call's event here before the writer
            # sent it to Redis, where the decision script looks for it.
            bus = getattr(run, "bus", None)
            flush = getattr(getattr(bus, "history", None), "flush", None)
            if flush is not None:
                await flush()
            await request_decision(
                self.store, run.run_id, call_id, str(decision), reason=reason, input=edited
            )
        except (ApprovalError, ValueError):
            raise
        except KeyError:
            raise ApiError(404, "run_not_found", f"no run with id {run.run_id!r}") from None
        except Exception as exc:
            raise store_unavailable(exc) from None
        try:
            return run.decide(call_id, str(decision), reason=reason, input=edited)
        except ApprovalError:
            return pending  # this node's listener took the marker's decision first

    async def thread(self, thread_id: str) -> Thread:
        """The conversation ``thread_id`` (with a store, as Redis holds it now).

        Raises:
            ApiError: ``404`` ``thread_not_found``, ``503`` ``store_unavailable``.
        """
        try:
            return await self.threads.get_thread(thread_id)
        except ThreadNotFound as exc:
            raise ApiError(404, "thread_not_found", str(exc)) from None
        except Exception as exc:
            raise store_unavailable(exc) from None

    async def create_thread(self, metadata: Mapping[str, Any] | None) -> Thread:
        """A new conversation (``POST /threads``).

        Raises:
            ApiError: ``429`` ``too_many_threads`` when every retained thread
                has a run going, ``503`` ``store_unavailable``.
        """
        try:
            return await self.threads.create_thread(metadata)
        except ThreadLimitReached as exc:
            raise ApiError(
                429, "too_many_threads", str(exc), headers={"Retry-After": "1"}
            ) from None
        except Exception as exc:
            raise store_unavailable(exc) from None

    async def list_threads(self) -> list[Thread]:
        """The retained conversations, oldest first (``GET /threads``).

        Raises:
            ApiError: ``503`` ``store_unavailable``.
        """
        try:
            return await self.threads.list_threads()
        except Exception as exc:
            raise store_unavailable(exc) from None

    async def fanout(
        self,
        run: RunHandle,
        factory: Callable[[RunHandle, WebConfig], EventFanout[F, P]],
        *,
        key: str = "sse",
    ) -> EventFanout[F, P] | None:
        """The run's :class:`~trioflow.web._fanout.EventFanout` for ``key``, claimed, started with ``factory`` if none runs.

        A run has one fan-out per encoding (``key``, the
        :attr:`~trioflow.web._streams.Encoding.name`): its event streams
        share one, its WebSockets another.

        The caller holds a :meth:`~trioflow.web._fanout.EventFanout.claim` on
        it and must :meth:`~trioflow.web._fanout.EventFanout.release` it
        (after joining, or when giving up). The fan-out runs in the server's
        nursery until the run ends, or its last connection leaves with no
        claim left; the hub forgets it then. One started by another
        connection may not be :attr:`~trioflow.web._fanout.EventFanout.ready`
        yet. Returns ``None`` when there is no nursery to run one in (the
        application's lifespan is not running) or the run has ended: the
        connection streams on its own then.
        """
        slot = (run.run_id, key)
        existing: EventFanout[F, P] | None = self._fanouts.get(slot)
        if existing is not None and existing.open:
            existing.claim()
            return existing
        if self._nursery is None or run.done:
            return None
        fanout = factory(run, self.config)

        def forget(done: EventFanout[F, P]) -> None:
            if self._fanouts.get(slot) is done:
                del self._fanouts[slot]

        fanout.on_close = forget
        fanout.on_change = self._changed
        self._fanouts[slot] = fanout
        fanout.claim()
        try:
            await self._nursery.start(fanout.run_until_done)
        except BaseException:
            fanout.release()
            raise
        return fanout

    def running_fanout(self, run_id: str, key: str = "sse") -> EventFanout[Any, Any] | None:
        """The run's fan-out for ``key`` if one is open and ready to be joined now, else ``None``.

        No claim is taken: a caller joins it (``add``) before its next
        checkpoint, or not at all.
        """
        fanout = self._fanouts.get((run_id, key))
        if fanout is None or not fanout.open or not fanout.ready:
            return None
        return fanout

    def fanouts(self) -> list[EventFanout[Any, Any]]:
        """The fan-outs running now, one per run and encoding with clients."""
        return list(self._fanouts.values())

    async def wait_joined(
        self, run_id: str, targets: int, key: str = "sse"
    ) -> EventFanout[Any, Any]:
        """The run's fan-out for ``key`` once at least ``targets`` connections have joined it.

        Woken by every connection joining or leaving a fan-out (and by
        :meth:`attach` and :meth:`Watch.release`); no polling. Wrap it in a
        timeout: it waits for as long as that takes.
        """
        while True:
            fanout = self._fanouts.get((run_id, key))
            if fanout is not None and fanout.statistics().targets >= targets:
                await trio.lowlevel.checkpoint()
                return fanout
            await self._watchers_changed.wait()

    # -- watchers ------------------------------------------------------------------

    def attach(self, run: RunHandle) -> Watch:
        """Count one more connection watching ``run``; release the returned :class:`Watch`."""
        count = self._watchers[run.run_id] = self._watchers.get(run.run_id, 0) + 1
        self._changed()
        if self.watch_counts is not None:
            self.watch_counts.set(run.run_id, count)
        return Watch(self, run)

    def watchers(self, run_id: str) -> int:
        """How many connections watch the run now."""
        return self._watchers.get(run_id, 0)

    async def wait_watchers(self, run_id: str, count: int) -> None:
        """Return once exactly ``count`` connections watch the run (at once if they do now).

        Woken by every :meth:`attach` and :meth:`Watch.release`; no polling.
        """
        while self.watchers(run_id) != count:
            await self._watchers_changed.wait()
        await trio.lowlevel.checkpoint()

    def _changed(self) -> None:
        self._watchers_changed.set()
        self._watchers_changed = trio.Event()

    def _detach(self, run: RunHandle, *, disconnected: bool) -> None:
        left = self._watchers.get(run.run_id, 1) - 1
        self._changed()
        if self.watch_counts is not None:
            self.watch_counts.set(run.run_id, max(left, 0))
        if left > 0:
            self._watchers[run.run_id] = left
            return
        self._watchers.pop(run.run_id, None)
        if not (disconnected and not run.done and run.on_disconnect is OnDisconnect.CANCEL):
            return
        if self.watch_counts is None or self._nursery is None:
            run.cancel(CancelReason.CLIENT_DISCONNECTED)
        else:  # other nodes' clients may watch it still: count them all first
            self._nursery.start_soon(self._cancel_if_unwatched, run)

    async def _cancel_if_unwatched(self, run: RunHandle) -> None:
        """Cancel ``run`` (``client disconnected``) if no node's connection watches it any more."""
        assert self.watch_counts is not None
        try:
            total = await self.watch_counts.total(run.run_id)
        except Exception as exc:  # Redis failed: the run goes on (as on_disconnect: continue)
            _log.warning("cannot count the watchers of %s (%s); not cancelling it", run.run_id, exc)
            return
        if total == 0 and not self._watchers.get(run.run_id) and not run.done:
            run.cancel(CancelReason.CLIENT_DISCONNECTED)


def store_unavailable(exc: Exception) -> ApiError:
    """``503 store_unavailable``: the run store (Redis) failed with ``exc``."""
    return ApiError(
        503,
        "store_unavailable",
        f"the run store (Redis) failed: {type(exc).__name__}: {exc}",
        headers={"Retry-After": "1"},
    )


_DECISION_KEYS = frozenset({"decision", "reason", "input"})


def cancel_mode(value: object) -> CancelMode:
    """``value`` as a :class:`~trioflow.handle.CancelMode` (the ``mode`` of a cancel request).

    Raises:
        ApiError: ``400`` ``invalid_request`` when it is not one.
    """
    if isinstance(value, str) and value in CancelMode.__members__.values():
        return CancelMode(value)
    raise ApiError(
        400, "invalid_request", f"'mode' must be 'immediate' or 'after_turn', not {value!r}"
    )


def resume_point(value: object, run: RunHandle) -> int:
    """Validate ``value`` as a resume point of ``run``: a seq from ``0`` to the run's newest.

    Accepts an int, or a string of digits (from a header or a query string).

    Raises:
        ApiError: ``400`` (``invalid_after``) for anything else, or a seq the
            run has not reached.
    """
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(
            400,
            "invalid_after",
            f"the resume point must be the seq of an event (an integer >= 0), not {value!r}",
        )
    if value > run.last_seq:
        raise ApiError(
            400,
            "invalid_after",
            f"run {run.run_id} has no event {value} (its newest is {run.last_seq})",
        )
    return value


def on_disconnect(run: RunHandle) -> OnDisconnect:
    """The run's :class:`OnDisconnect` policy: :attr:`~trioflow.handle.RunHandle.on_disconnect`."""
    return run.on_disconnect
