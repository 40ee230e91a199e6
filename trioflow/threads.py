"""Threads: conversations whose runs see the turns before them.

A :class:`Thread` holds a conversation's messages (the user's, the
assistant's with its tool calls, the tool results) and the ids of its runs.
Start a run on it (:meth:`StreamingFlowExecutor.start(agent, message,
thread=thread) <trioflow.StreamingFlowExecutor.start>`, or ``POST
/threads/{id}/runs`` over HTTP) and the model sees the whole conversation
so far, then the new message:

* one run at a time per thread: starting a second while one is going is
  :exc:`ThreadBusy` (the order of a conversation is its meaning);
* a run that **completes** adds its messages to the thread (the user's
  message, every assistant turn and tool result, the answer); a run that
  fails or is cancelled leaves the messages as they were (it is still
  listed among the thread's runs, with its status);
* bounded: a thread holds at most ``max_messages`` messages (a run that
  would start past it is :exc:`ThreadFull`), and :class:`Threads` retains
  at most ``max_threads`` threads, forgetting the oldest idle one to make
  room (:exc:`ThreadLimitReached` when every one is running).

:class:`Threads` keeps them in memory; :class:`~trioflow.redis.RedisThreads`
keeps them in Redis, where every serve node and worker shares them. Both are
a :class:`ThreadStore`, the one seam the web server uses: in memory by
default, in Redis when the server runs on the Redis backend.
"""

from __future__ import annotations

import builtins
import collections
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import trio

from trioflow.models._base import Message

__all__ = [
    "Thread",
    "ThreadBusy",
    "ThreadFull",
    "ThreadLimitReached",
    "ThreadNotFound",
    "ThreadStore",
    "Threads",
]


class ThreadNotFound(LookupError):
    """No retained thread has this id.

    Attributes:
        thread_id: the id asked for.
    """

    def __init__(self, thread_id: str) -> None:
        super().__init__(f"no thread with id {thread_id!r}")
        self.thread_id = thread_id


class ThreadBusy(RuntimeError):
    """A run of the thread is going: its next run starts once that one has ended.

    Attributes:
        thread_id: the thread.
        run_id: the run going on it.
    """

    def __init__(self, thread_id: str, run_id: str) -> None:
        super().__init__(
            f"thread {thread_id!r} has a run going ({run_id}); start the next one when it ends"
        )
        self.thread_id = thread_id
        self.run_id = run_id


class ThreadFull(ValueError):
    """The thread holds its limit of messages: start a new thread.

    Attributes:
        thread_id: the thread.
        limit: its most messages.
    """

    def __init__(self, thread_id: str, limit: int) -> None:
        super().__init__(
            f"thread {thread_id!r} holds its limit of {limit} messages; start a new thread"
        )
        self.thread_id = thread_id
        self.limit = limit


class ThreadLimitReached(RuntimeError):
    """Every retained thread has a run going: no room for a new thread.

    Attributes:
        limit: the most threads retained.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"all {limit} threads have a run going; try again when one ends")
        self.limit = limit


class Thread:
    """One conversation: its messages, its runs, its metadata.

    Made by :meth:`Threads.create`. Read it freely; its messages change only
    when one of its runs completes. A thread of a
    :class:`~trioflow.redis.RedisThreads` is a snapshot read from Redis
    (:meth:`ThreadStore.get_thread`): it does not change.
    """

    __slots__ = (
        "_count",
        "_messages",
        "_running",
        "_runs",
        "created_at",
        "max_messages",
        "metadata",
        "thread_id",
    )

    def __init__(
        self, thread_id: str, *, max_messages: int, metadata: Mapping[str, Any] | None = None
    ) -> None:
        self.thread_id = thread_id
        """The thread's id (``thread_`` and 16 hex digits, unique across processes)."""
        self.created_at = time.time()
        """When it was made (Unix time)."""
        self.max_messages = max_messages
        """The most messages it holds."""
        self.metadata: dict[str, Any] = dict(metadata or {})
        """What its creator attached to it."""
        self._messages: list[Message] = []
        self._runs: list[str] = []
        self._running: str | None = None
        self._count: int | None = None

    @classmethod
    def snapshot(
        cls,
        thread_id: str,
        *,
        created_at: float,
        max_messages: int,
        metadata: Mapping[str, Any],
        messages: Sequence[Message],
        runs: Sequence[str],
        running: str | None,
        message_count: int | None = None,
    ) -> Thread:
        """A thread as a store read it (:class:`~trioflow.redis.RedisThreads`): a copy, not live.

        ``message_count``: how many messages it holds when ``messages`` were
        not read (a listing); by default, ``len(messages)``.
        """
        thread = cls(thread_id, max_messages=max_messages, metadata=metadata)
        thread.created_at = created_at
        thread._messages = list(messages)
        thread._runs = list(runs)
        thread._running = running
        thread._count = message_count
        return thread

    def __repr__(self) -> str:
        return f"<Thread {self.thread_id} messages={len(self._messages)} runs={len(self._runs)}>"

    @property
    def messages(self) -> tuple[Message, ...]:
        """The conversation so far, oldest first."""
        return tuple(self._messages)

    @property
    def message_count(self) -> int:
        """How many messages it holds (without copying them)."""
        return len(self._messages) if self._count is None else self._count

    @property
    def runs(self) -> tuple[str, ...]:
        """The ids of its runs, oldest first."""
        return tuple(self._runs)

    @property
    def running(self) -> str | None:
        """The id of its run going now, or ``None``."""
        return self._running

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible view: ``thread_id``, ``created_at``, ``messages``, ``runs``, ``running``, ``metadata``."""
        return {
            "thread_id": self.thread_id,
            "created_at": self.created_at,
            "messages": [m.to_dict() for m in self._messages],
            "runs": list(self._runs),
            "running": self._running,
            "metadata": self.metadata,
        }

    def check_start(self) -> None:
        """Raise what :meth:`begin` would, without beginning anything.

        Raises:
            ThreadBusy: a run of the thread is going.
            ThreadFull: one more message would pass :attr:`max_messages`.
        """
        if self._running is not None:
            raise ThreadBusy(self.thread_id, self._running)
        if self.message_count + 1 > self.max_messages:
            raise ThreadFull(self.thread_id, self.max_messages)

    def begin(self, run_id: str) -> tuple[Message, ...]:
        """Mark ``run_id`` as the thread's running run; the conversation it continues.

        Called by the executor when it starts a run on the thread.

        Raises:
            ThreadBusy: a run of the thread is going.
            ThreadFull: one more message would pass :attr:`max_messages`.
        """
        self.check_start()
        self._running = run_id
        self._runs.append(run_id)
        return tuple(self._messages)

    def end(self, run_id: str, messages: Sequence[Message] | None) -> None:
        """Record the end of run ``run_id``: ``messages``, the whole conversation it completed, or ``None``.

        ``None`` (the run failed or was cancelled) leaves the messages as
        they were. Called by the executor when the run has ended.
        """
        if self._running != run_id:
            return
        self._running = None
        if messages is not None:
            self._messages = list(messages)


class ThreadStore(Protocol):
    """Where threads are kept: :class:`Threads` (memory) or :class:`~trioflow.redis.RedisThreads`.

    The seam of the web server (``RunHub.threads``): it creates, reads and
    lists threads, and a run on a thread :meth:`begin` s it before it starts
    and :meth:`end` s it once over. Both implementations raise the same
    errors for the same cases.
    """

    max_threads: int
    """The most threads retained."""
    max_messages: int
    """The most messages a new thread holds."""

    async def create_thread(
        self, metadata: Mapping[str, Any] | None = None, *, thread_id: str | None = None
    ) -> Thread:
        """A new, empty thread (the oldest idle one is forgotten when the store is full).

        With ``thread_id``: that thread, made (with ``metadata``) only if no
        retained thread has that id, in one step (two callers racing get one thread).

        Raises:
            ThreadLimitReached: every retained thread has a run going.
        """
        ...

    async def get_thread(self, thread_id: str) -> Thread:
        """The thread ``thread_id``.

        Raises:
            ThreadNotFound: no retained thread has that id.
        """
        ...

    async def list_threads(self) -> list[Thread]:
        """The retained threads, oldest first (their messages counted, not necessarily read)."""
        ...

    async def begin(self, thread_id: str, run_id: str) -> tuple[Message, ...]:
        """Make ``run_id`` the thread's running run; the conversation it continues.

        Raises:
            ThreadNotFound: no retained thread has that id.
            ThreadBusy: another run of the thread is going.
            ThreadFull: one more message would pass the thread's limit.
        """
        ...

    async def end(
        self,
        thread_id: str,
        run_id: str,
        messages: Sequence[Message] | None,
        *,
        epoch: int | None = None,
    ) -> bool:
        """Record the end of run ``run_id``: ``messages``, the whole conversation it completed, or ``None``.

        Nothing happens unless ``run_id`` is the thread's running run (and,
        with ``epoch``, holds that fencing epoch of the Redis run store).

        Returns:
            Whether the thread was ended by this call.
        """
        ...


def _new_id() -> str:
    return f"thread_{os.urandom(8).hex()}"


class Threads:
    """The threads of a process, in memory, bounded.

    Args:
        max_threads: the most threads retained; making one more forgets
            the oldest thread with no run going.
        max_messages: the most messages a thread holds.

    Raises:
        ValueError: a limit is below 1.
    """

    __slots__ = ("_threads", "max_messages", "max_threads")

    def __init__(self, *, max_threads: int = 1000, max_messages: int = 1000) -> None:
        for name, value in (("max_threads", max_threads), ("max_messages", max_messages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        self.max_threads = max_threads
        self.max_messages = max_messages
        self._threads: collections.OrderedDict[str, Thread] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._threads)

    def create(
        self, metadata: Mapping[str, Any] | None = None, *, thread_id: str | None = None
    ) -> Thread:
        """A new, empty thread (the oldest idle one is forgotten when the store is full).

        With ``thread_id``: that thread, made only if no retained thread has that id.

        Raises:
            ThreadLimitReached: every retained thread has a run going.
        """
        if thread_id is not None and thread_id in self._threads:
            return self._threads[thread_id]
        if len(self._threads) >= self.max_threads:
            for old_id, old in self._threads.items():
                if old.running is None:
                    del self._threads[old_id]
                    break
            else:
                raise ThreadLimitReached(self.max_threads)
        thread = Thread(thread_id or _new_id(), max_messages=self.max_messages, metadata=metadata)
        self._threads[thread.thread_id] = thread
        return thread

    def get(self, thread_id: str) -> Thread:
        """The thread ``thread_id``.

        Raises:
            ThreadNotFound: no retained thread has that id.
        """
        try:
            return self._threads[thread_id]
        except KeyError:
            raise ThreadNotFound(thread_id) from None

    def list(self) -> list[Thread]:
        """The retained threads, oldest first."""
        return list(self._threads.values())

    # -- the ThreadStore protocol ----------------------------------------------------

    async def create_thread(
        self, metadata: Mapping[str, Any] | None = None, *, thread_id: str | None = None
    ) -> Thread:
        """:meth:`create`, as a :class:`ThreadStore`.

        Raises:
            ThreadLimitReached: every retained thread has a run going.
        """
        await trio.lowlevel.checkpoint()
        return self.create(metadata, thread_id=thread_id)

    async def get_thread(self, thread_id: str) -> Thread:
        """:meth:`get`, as a :class:`ThreadStore`: the live thread.

        Raises:
            ThreadNotFound: no retained thread has that id.
        """
        await trio.lowlevel.checkpoint()
        return self.get(thread_id)

    async def list_threads(self) -> builtins.list[Thread]:
        """:meth:`list`, as a :class:`ThreadStore`."""
        await trio.lowlevel.checkpoint()
        return self.list()

    async def begin(self, thread_id: str, run_id: str) -> tuple[Message, ...]:
        """:meth:`Thread.begin` of thread ``thread_id``.

        Raises:
            ThreadNotFound: no retained thread has that id.
            ThreadBusy: a run of the thread is going.
            ThreadFull: one more message would pass its limit.
        """
        await trio.lowlevel.checkpoint()
        return self.get(thread_id).begin(run_id)

    async def end(
        self,
        thread_id: str,
        run_id: str,
        messages: Sequence[Message] | None,
        *,
        epoch: int | None = None,
    ) -> bool:
        """:meth:`Thread.end` of thread ``thread_id`` (``epoch`` is ignored: nothing is fenced in memory).

        Returns:
            Whether ``run_id`` was the thread's running run (a thread
            forgotten meanwhile: ``False``).
        """
        await trio.lowlevel.checkpoint()
        thread = self._threads.get(thread_id)
        if thread is None or thread.running != run_id:
            return False
        thread.end(run_id, messages)
        return True
