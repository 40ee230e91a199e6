"""Runs on Redis: durable histories and run records that any process can read.

Needs the ``redis`` extra (``pip install "trioflow[redis]"``: `coredis
<https://coredis.readthedocs.io>`_, which runs under Trio through anyio);
``import trioflow`` never imports it. The key layout and the fencing rules
are on the :doc:`/concepts/redis` page.

* :func:`open_redis`: a connected client for ``redis://host:port/db`` or
  ``unix:///path``, checked for an evicting ``maxmemory-policy``.
* :class:`RedisRunStore`: each run's record (status, owner, fencing epoch,
  last seq, request, ...), listing and lookup, :meth:`~RedisRunStore.claim`,
  and its :class:`RedisHistory`.
* :class:`RedisHistory`: an :class:`~trioflow.EventHistory` on a Redis
  Stream, seq ``N`` as stream id ``N-0``, appends batched and written
  behind through one fenced script per batch.
* :func:`new_run_id`: run ids unique across processes.
* :func:`submit`: a run recorded and put on the work queue, in one script.
* :func:`open_worker` / :class:`Worker`: the executing side: takes runs off
  the queue, runs them under a heartbeated lease, honours cancels, drains.
* :func:`reap`: ends (``flow.failed``, ``worker_lost``) or re-queues the runs
  whose worker was lost; :func:`request_cancel`: cancel a run from any process;
  :func:`listen_for_cancels`: honour it (and decisions) where a serve node
  executes its runs.
* :func:`request_decision`: approve, deny or edit a waiting tool call of a
  run executed by any process; :func:`apply_decision`: take it where the call waits.
* :class:`RedisThreads`: conversations (:mod:`trioflow.threads`) every
  node and worker shares, begun and ended atomically, bounded.
* :class:`NodeTail` (:func:`open_node_tail`): a process's live tail, one
  blocking ``XREAD`` feeding every locally watched run; :class:`RemoteRun`
  (:func:`open_remote_run`): a :class:`~trioflow.handle.RunHandle` of a run
  executed by any process.

A :class:`~trioflow.StreamingFlowExecutor` keeps its runs here with
``history_store=store.history_factory()``::

    async with open_redis("unix:///run/redis/redis.sock") as client:
        store = RedisRunStore(client)
        async with open_executor(history_store=store.history_factory(), run_ids=new_run_id) as ex:
            run = await ex.start(agent, "What is 25 * 4?")
"""

from trioflow.history import Fenced
from trioflow.redis._approvals import apply_decision, request_decision
from trioflow.redis._cancel import listen_for_cancels
from trioflow.redis._client import (
    EVICTING_POLICY_WARNING,
    check_eviction_policy,
    open_redis,
    redis_client,
)
from trioflow.redis._history import (
    APPEND_RUNS_SCRIPT,
    APPEND_SCRIPT,
    DEFAULT_RETRY,
    RedisHistory,
    RedisHistoryStatistics,
)
from trioflow.redis._keys import Keys
from trioflow.redis._queue import QUEUE_GROUP, submit
from trioflow.redis._reaper import WORKER_LOST, reap, request_cancel
from trioflow.redis._remote import RemoteRun, open_remote_run
from trioflow.redis._store import RedisRunStore, RunRecord, new_run_id
from trioflow.redis._tail import (
    DEFAULT_RECONNECT,
    NodeTail,
    RunFeed,
    TailStatistics,
    open_node_tail,
)
from trioflow.redis._threads import STARTING_GRACE, RedisThreads
from trioflow.redis._watchers import WatcherCounts
from trioflow.redis._worker import HANDED_BACK, Worker, WorkerStatistics, open_worker

__all__ = [
    "APPEND_RUNS_SCRIPT",
    "APPEND_SCRIPT",
    "DEFAULT_RECONNECT",
    "DEFAULT_RETRY",
    "EVICTING_POLICY_WARNING",
    "HANDED_BACK",
    "QUEUE_GROUP",
    "STARTING_GRACE",
    "WORKER_LOST",
    "Fenced",
    "Keys",
    "NodeTail",
    "RedisHistory",
    "RedisHistoryStatistics",
    "RedisRunStore",
    "RedisThreads",
    "RemoteRun",
    "RunFeed",
    "RunRecord",
    "TailStatistics",
    "WatcherCounts",
    "Worker",
    "WorkerStatistics",
    "apply_decision",
    "check_eviction_policy",
    "listen_for_cancels",
    "new_run_id",
    "open_node_tail",
    "open_redis",
    "open_remote_run",
    "open_worker",
    "reap",
    "redis_client",
    "request_cancel",
    "request_decision",
    "submit",
]
