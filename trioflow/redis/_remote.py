"""A run kept in Redis, watched from any process: :class:`RemoteRun`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from trioflow.approvals import ApprovalDecision, ApprovalError, PendingApproval, check_decision
from trioflow.bus import EventFilter, Overflow, Subscription
from trioflow.events import FlowEvent
from trioflow.figures import COUNT_KEYS
from trioflow.handle import CancelMode, CancelReason, OnDisconnect, RunHandle, RunStatus
from trioflow.redis._approvals import request_decision
from trioflow.redis._history import _FINAL_STATUS
from trioflow.redis._reaper import request_cancel

if TYPE_CHECKING:
    from trioflow.redis._store import RedisRunStore, RunRecord
    from trioflow.redis._tail import NodeTail, RunFeed

__all__ = ["RemoteRun", "open_remote_run"]

_log = logging.getLogger("trioflow.redis")


class RemoteRun:
    """A run whose events are in Redis, executed by whichever process: a :class:`~trioflow.handle.RunHandle`.

    Made by :func:`open_remote_run` (or a web server on Redis, for a run it
    does not execute). :attr:`status`, :attr:`last_seq` and :meth:`to_dict`
    come from the run's record as last read (:meth:`refresh`), overtaken by
    what this node's tail has seen since; :meth:`subscribe` replays the
    stream from ``after`` then follows it live through the node's
    :class:`~trioflow.redis.NodeTail` (one read per batch for all the local
    watchers), ending after the terminal event. :meth:`cancel` goes through
    :func:`~trioflow.redis.request_cancel`; approvals through the record's
    index and :func:`~trioflow.redis.request_decision`
    (:meth:`pending_approvals`, :meth:`send_decision`).
    """

    def __init__(self, store: RedisRunStore, tail: NodeTail, record: RunRecord) -> None:
        self.store = store
        self.tail = tail
        self.record = record
        self._terminal: FlowEvent | None = None  # the terminal event a feed of this node saw
        self._seen_seq = record.last_seq

    def __repr__(self) -> str:
        return f"<RemoteRun {self.run_id} {self.status.value} seq={self.last_seq}>"

    async def refresh(self) -> None:
        """Read the run's record again.

        Raises:
            KeyError: the run's keys are gone (expired).
            coredis.exceptions.RedisError: Redis failed.
        """
        self.record = await self.store.get(self.run_id)
        self._seen_seq = max(self._seen_seq, self.record.last_seq)

    def _note(self, feed: RunFeed) -> None:
        """Keep what ``feed`` saw, for when this node no longer follows the run."""
        self._seen_seq = max(self._seen_seq, feed.known_seq)
        if feed.terminal is not None:
            self._terminal = feed.terminal

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.record.run_id

    @property
    def status(self) -> RunStatus:
        """The status of the terminal event this node saw, else the record's."""
        feed = self.tail.feed(self.run_id)
        if feed is not None:
            self._note(feed)
        if self._terminal is not None:
            return _FINAL_STATUS[self._terminal.type]
        return self.record.status

    @property
    def done(self) -> bool:
        """Whether the run has ended, as far as this node knows."""
        return self.status.finished

    @property
    def last_seq(self) -> int:
        """The newest seq this node knows of: the record's, or the tail's if newer."""
        feed = self.tail.feed(self.run_id)
        if feed is not None:
            self._note(feed)
        return self._seen_seq

    @property
    def on_disconnect(self) -> OnDisconnect:
        """The run's request's ``on_disconnect`` (watchers counted across nodes: :class:`~trioflow.redis.WatcherCounts`)."""
        try:
            return OnDisconnect(self.record.request.get("on_disconnect", OnDisconnect.CONTINUE))
        except ValueError:
            return OnDisconnect.CONTINUE

    @asynccontextmanager
    async def subscribe(
        self,
        *,
        after: int | None = 0,
        types: EventFilter = None,
        buffer: int = 256,
        overflow: Overflow = Overflow.BLOCK,
        name: str | None = None,
    ) -> AsyncIterator[Subscription]:
        """Watch the run: the events after ``after`` from its stream, then live ones, to the end.

        The semantics of :meth:`trioflow.EventBus.subscribe` (a bounded
        :class:`~trioflow.bus.Subscription` with its ``overflow`` policy;
        ``after=None``: live events only). When ``after`` is newer than
        what this node has read of the run, the subscription starts once
        the tail has caught up to it, so no event comes twice.

        Raises:
            HistoryExpired: the stream no longer holds the events after ``after``.
            KeyError: the run's keys are gone (expired).
            ValueError: ``buffer`` < 1, ``after`` < 0, or an unknown type in ``types``.
            RuntimeError: the node's tail is not open (or follows too many runs).
            coredis.exceptions.RedisError: Redis failed.
        """
        async with self.tail.watch(self.run_id) as feed:
            try:
                if after is not None:
                    await feed.reached(after)
                assert feed.bus is not None
                async with feed.bus.subscribe(
                    after=after, types=types, buffer=buffer, overflow=overflow, name=name
                ) as sub:
                    yield sub
            finally:
                self._note(feed)

    def cancel(
        self,
        reason: CancelReason | str = CancelReason.CANCELLED,
        *,
        mode: CancelMode | str = CancelMode.IMMEDIATE,
    ) -> bool:
        """Ask the executing process to cancel the run (:func:`~trioflow.redis.request_cancel`).

        The request is written in the background (in the tail's nursery);
        the run then ends with ``flow.cancelled``, which watchers see.

        Returns:
            False if the run has ended (as far as this node knows), else True.

        Raises:
            ValueError: ``mode`` is not a :class:`~trioflow.handle.CancelMode` value.
            RuntimeError: the node's tail is not open.
        """
        mode = CancelMode(mode)
        if self.done:
            return False
        self.tail.spawn(
            request_cancel(self.store, self.run_id, reason, mode=mode), name=f"cancel {self.run_id}"
        )
        return True

    def pending_approvals(self) -> list[PendingApproval]:
        """The run's calls waiting for a decision, from its record as last read (:meth:`refresh`)."""
        if self.done:
            return []
        return self.record.pending_approvals()

    def _check_decision(
        self,
        call_id: str,
        decision: ApprovalDecision | str,
        input: Mapping[str, Any] | None,
        reason: str | None,
    ) -> PendingApproval:
        for pending in self.pending_approvals():
            if pending.call_id == call_id:
                break
        else:
            raise ApprovalError(call_id, decided=call_id in self.record.decided or self.done)
        pending.decision = check_decision(decision, reason=reason, input=input)
        pending.reason = reason
        if input is not None:
            pending.input = dict(input)
        return pending

    def decide(
        self,
        call_id: str,
        decision: ApprovalDecision | str,
        *,
        reason: str | None = None,
        input: Mapping[str, Any] | None = None,
    ) -> PendingApproval:
        """Send a decision on a waiting call to the process executing the run, in the background.

        Checked against the record as last read; the decision is then
        written in the tail's nursery (:func:`~trioflow.redis.request_decision`),
        and a conflicting decision taken meanwhile on another node wins
        (logged). :meth:`send_decision` waits for that answer instead. The
        edit's ``input`` is checked against the tool's schema where the call runs.

        Raises:
            ~trioflow.approvals.ApprovalError: no call ``call_id`` waits, as far as the record says.
            ValueError: as :func:`~trioflow.redis.request_decision`.
            RuntimeError: the node's tail is not open.
        """
        pending = self._check_decision(call_id, decision, input, reason)
        self.tail.spawn(
            _send_logged(self.store, self.run_id, call_id, decision, reason, input),
            name=f"decide {self.run_id} {call_id}",
        )
        return pending

    async def send_decision(
        self,
        call_id: str,
        decision: ApprovalDecision | str,
        *,
        reason: str | None = None,
        input: Mapping[str, Any] | None = None,
    ) -> PendingApproval:
        """Take a decision on a waiting call, wherever the run executes; return the call, decided.

        One script checks and writes it (:func:`~trioflow.redis.request_decision`):
        of two nodes deciding at once exactly one succeeds. The edit's
        ``input`` should be checked against the tool's schema first (the web
        server does); it is checked again where the call runs.

        Raises:
            ~trioflow.approvals.ApprovalError: no call ``call_id`` waits
                (``decided``: it was decided, timed out, or the run ended).
            ValueError: as :func:`~trioflow.redis.request_decision`.
            KeyError: the run's keys are gone (expired).
            coredis.exceptions.RedisError: Redis failed.
        """
        pending = self._check_decision(call_id, decision, input, reason)
        await request_decision(
            self.store, self.run_id, call_id, decision, reason=reason, input=input
        )
        return pending

    async def wait(self) -> None:
        """Wait until the run has ended (its terminal event reached this node).

        Raises:
            KeyError: the run's keys are gone (expired).
            RuntimeError: the node's tail is not open.
        """
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        async with self.tail.watch(self.run_id) as feed:
            await feed.finished.wait()
            self._note(feed)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible view with the keys of :meth:`trioflow.Run.to_dict`, from the record.

        ``progress``, ``counts`` and ``output`` are not kept in the record:
        empty (zero counts) for a run executed elsewhere; ``result`` is the
        data of the terminal event when this node saw it; ``metadata`` is
        the run's (with its ``thread_id`` if it continues a thread), plus
        ``node: "remote"`` and the ``owner`` executing it.
        """
        record = self.record
        request = record.request
        status = self.status  # notes what a feed saw
        terminal = self._terminal
        metadata = dict(request.get("metadata") or {})
        if request.get("thread_id"):  # a queued run of a thread
            metadata["thread_id"] = request["thread_id"]
        metadata.update(node="remote", owner=record.owner, attempt=record.attempt)
        return {
            "run_id": record.run_id,
            "status": str(status),
            "task": request.get("task", ""),
            "model": request.get("model", ""),
            "created_at": record.created_at,
            "finished_at": record.updated_at if record.status.finished else None,
            "last_seq": self.last_seq,
            "progress": {},
            "counts": dict.fromkeys(COUNT_KEYS, 0),
            "output": "",
            "result": None if terminal is None else dict(terminal.data),
            "on_disconnect": str(self.on_disconnect),
            "approvals": [p.to_dict() for p in self.pending_approvals()],
            "metadata": metadata,
        }


async def _send_logged(
    store: RedisRunStore,
    run_id: str,
    call_id: str,
    decision: ApprovalDecision | str,
    reason: str | None,
    input: Mapping[str, Any] | None,
) -> None:
    try:
        await request_decision(store, run_id, call_id, decision, reason=reason, input=input)
    except (ApprovalError, KeyError) as exc:
        _log.warning("run %s: decision on %s not taken: %s", run_id, call_id, exc)


if TYPE_CHECKING:
    _REMOTE_IS_A_HANDLE: type[RunHandle] = RemoteRun  # mypy checks that it implements the protocol


async def open_remote_run(store: RedisRunStore, tail: NodeTail, run_id: str) -> RemoteRun:
    """The :class:`RemoteRun` of ``run_id``, its record read now.

    Raises:
        KeyError: no such run (or its keys expired).
        coredis.exceptions.RedisError: Redis failed.
    """
    return RemoteRun(store, tail, await store.get(run_id))
