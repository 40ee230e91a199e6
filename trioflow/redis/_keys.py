"""The Redis key layout of trioflow: one place that names every key.

With the default prefix ``trioflow``:

* ``trioflow:run:{<run_id>}``: a hash, the run's record (status, owner,
  epoch, last seq, capacity, request, attempt, timestamps);
* ``trioflow:run:{<run_id>}:events``: a stream, the run's events, seq ``N``
  stored as entry id ``N-0`` with one field ``e``, the event's JSON;
* ``trioflow:runs``: a sorted set, every run id scored by its creation time;
* ``trioflow:queue``: a stream, the runs waiting for a worker (one entry
  ``run`` = the run id each), read by the consumer group ``workers``;
* ``trioflow:leases``: a sorted set, each running run's id scored by the
  Redis time its lease lapses (kept up by its worker's heartbeat);
* ``trioflow:node:<node_id>:wake``: a stream of one serve node's own, short
  (``MAXLEN ~ 16``, a 1 h TTL): written to wake the node's blocking tail read
  when the set of runs it follows changes (:class:`~trioflow.redis.NodeTail`);
* ``trioflow:run:{<run_id>}:watchers``: a hash, how many connections of
  each serve node watch the run; ``trioflow:node:<node_id>:alive``: a key
  each live node renews (:class:`~trioflow.redis.WatcherCounts`);
* ``trioflow:thread:{<thread_id>}``: a hash, a conversation's record
  (``thread_id``, ``created_at``, ``metadata``, ``max_messages``, ``running``:
  the id of its run going or empty, ``running_since``, ``updated_at``);
  ``trioflow:thread:{<thread_id>}:messages``: a list, its messages as JSON,
  oldest first; ``trioflow:thread:{<thread_id>}:runs``: a list, its run ids;
  ``trioflow:threads``: a sorted set, every thread id scored by its creation
  time (:class:`~trioflow.redis.RedisThreads`);
* ``trioflow:cancel``: the pub/sub channel of cancel requests
  (:func:`~trioflow.redis.request_cancel`; the durable marker is the
  ``cancel_reason``/``cancel_mode`` fields of the run's record);
* ``trioflow:decisions``: the pub/sub channel of approval decisions
  (:func:`~trioflow.redis.request_decision`; the durable marker is the
  ``decision:<call_id>`` field of the run's record, whose ``approval:<call_id>``
  fields index the calls that asked).

The braces are a hash tag: both keys of one run live in the same Redis
Cluster slot, so the one-run append script, which touches both, is
cluster-safe. The writer's script carries several runs' batches, and the
queue and the leases are shared by every run (the scripts of the work
queue touch them with a run's keys): trioflow wants one Redis, not a cluster.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Keys"]


@dataclasses.dataclass(frozen=True, slots=True)
class Keys:
    """The names of trioflow's keys under ``prefix``."""

    prefix: str = "trioflow"

    def run(self, run_id: str) -> str:
        """The hash of ``run_id``'s record."""
        return f"{self.prefix}:run:{{{run_id}}}"

    def events(self, run_id: str) -> str:
        """The stream of ``run_id``'s events."""
        return f"{self.prefix}:run:{{{run_id}}}:events"

    @property
    def index(self) -> str:
        """The sorted set of every run id, scored by creation time."""
        return f"{self.prefix}:runs"

    @property
    def queue(self) -> str:
        """The stream of runs waiting for a worker (consumer group ``workers``)."""
        return f"{self.prefix}:queue"

    @property
    def leases(self) -> str:
        """The sorted set of running runs, scored by when their lease lapses (Redis time)."""
        return f"{self.prefix}:leases"

    def watchers(self, run_id: str) -> str:
        """The hash of ``run_id``'s watchers: one field per serve node, its count."""
        return f"{self.prefix}:run:{{{run_id}}}:watchers"

    def node_alive(self, node_id: str) -> str:
        """The key a live serve node ``node_id`` renews (its watchers count while it lives)."""
        return f"{self.prefix}:node:{node_id}:alive"

    def node_wake(self, node_id: str) -> str:
        """The stream that wakes node ``node_id``'s blocking tail read."""
        return f"{self.prefix}:node:{node_id}:wake"

    def thread(self, thread_id: str) -> str:
        """The hash of ``thread_id``'s record."""
        return f"{self.prefix}:thread:{{{thread_id}}}"

    def thread_messages(self, thread_id: str) -> str:
        """The list of ``thread_id``'s messages (JSON), oldest first."""
        return f"{self.prefix}:thread:{{{thread_id}}}:messages"

    def thread_runs(self, thread_id: str) -> str:
        """The list of ``thread_id``'s run ids, oldest first."""
        return f"{self.prefix}:thread:{{{thread_id}}}:runs"

    @property
    def threads(self) -> str:
        """The sorted set of every thread id, scored by creation time."""
        return f"{self.prefix}:threads"

    @property
    def cancel_channel(self) -> str:
        """The pub/sub channel of cancel requests (JSON: ``run_id``, ``reason``, ``mode``)."""
        return f"{self.prefix}:cancel"

    @property
    def decision_channel(self) -> str:
        """The pub/sub channel of approval decisions (JSON: ``run_id``, ``call_id``, ``decision``, ...)."""
        return f"{self.prefix}:decisions"
