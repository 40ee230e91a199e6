"""Watchers of a run counted across serve nodes: what ``on_disconnect: cancel`` needs on Redis.

A run started with ``"on_disconnect": "cancel"`` is cancelled when the last
client watching it goes away, on whichever node that client was. So each
node (:class:`WatcherCounts`) keeps, for every run its connections watch,
how many they are, in the run's hash ``trioflow:run:{<id>}:watchers`` (one
field per node), and proves it is alive with the key
``trioflow:node:<node_id>:alive``, which it renews well within its TTL.
:meth:`WatcherCounts.total` adds up the counts of live nodes only (the
fields of a node whose key expired, one that crashed, are dropped), so a
crashed node's clients stop counting within the TTL.

The total's script reads the alive keys of the nodes it finds: like the
work queue, it wants one Redis, not a cluster.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trioflow.redis._store import RedisRunStore

__all__ = ["WatcherCounts"]

_log = logging.getLogger("trioflow.redis")

_TOTAL_SCRIPT = """
-- KEYS[1]: the run's watchers hash; ARGV[1], ARGV[2]: the alive key's prefix and suffix
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  if redis.call('EXISTS', ARGV[1] .. fields[i] .. ARGV[2]) == 1 then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return total
"""

_KEEP = 24 * 3600
"""Seconds a run's watchers hash lives after its last change (a node that never comes back)."""


class WatcherCounts:
    """One serve node's share of every run's watchers, kept in Redis.

    Args:
        store: the runs' store.
        node_id: this node's id (its tail's, :attr:`~trioflow.redis.NodeTail.node_id`).
        alive_ttl: seconds the node's alive key lives; it is renewed every
            third of that. A crashed node's watchers stop counting after it.

    Raises:
        ValueError: ``alive_ttl`` is not a positive number of seconds (at least 1).
    """

    def __init__(self, store: RedisRunStore, node_id: str, *, alive_ttl: float = 10.0) -> None:
        if not alive_ttl >= 1:
            raise ValueError(f"alive_ttl must be at least 1 second, not {alive_ttl!r}")
        self.store = store
        self.node_id = node_id
        self.alive_ttl = alive_ttl
        self._pending: dict[str, int] = {}  # run id -> this node's count, not written yet
        self._latest: dict[str, int] = {}  # run id -> this node's count now (runs watched here)
        self._wake = trio.Event()
        self._writing = (
            trio.Lock()
        )  # one write at a time: a later count never lands before an earlier

    def set(self, run_id: str, count: int) -> None:
        """Record that ``count`` of this node's connections watch ``run_id`` (written behind)."""
        self._pending[run_id] = count
        if count > 0:
            self._latest[run_id] = count
        else:
            self._latest.pop(run_id, None)
        self._wake.set()

    async def total(self, run_id: str) -> int:
        """How many connections of every live node watch ``run_id`` now (this node's count written first).

        Raises:
            coredis.exceptions.RedisError: Redis failed.
        """
        # This node's own count, written now (after any write in flight).
        async with self._writing:
            self._pending.pop(run_id, None)
            await self._write({run_id: self._latest.get(run_id, 0)})
        keys = self.store.keys
        script = self.store.client.register_script(_TOTAL_SCRIPT)
        prefix, suffix = keys.node_alive("\0").split("\0")
        total: object = await script([keys.watchers(run_id)], [prefix, suffix])
        if not isinstance(total, int):
            raise TypeError(f"the watchers script answered {total!r}, not a count")
        return total

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the node alive and write the counts behind, until cancelled (start it with ``nursery.start``).

        Redis errors are logged and retried on the next round (the counts
        still pending are kept).
        """
        alive = self.store.keys.node_alive(self.node_id)
        renew = self.alive_ttl / 3
        await self.store.client.set(alive, "1", px=int(self.alive_ttl * 1000))
        task_status.started()
        try:
            while True:
                with trio.move_on_after(renew):
                    await self._wake.wait()
                self._wake = trio.Event()
                failed = False
                async with self._writing:
                    pending, self._pending = self._pending, {}
                    try:
                        await self.store.client.set(alive, "1", px=int(self.alive_ttl * 1000))
                        if pending:
                            await self._write(pending)
                    except Exception as exc:  # Redis unreachable for now: try again next round
                        _log.warning("writing watcher counts failed (%s); retrying", exc)
                        self._pending = {**pending, **self._pending}
                        failed = True
                if failed:
                    await trio.sleep(renew)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.store.client.delete([alive])
                except Exception:  # best effort: the key expires anyway
                    pass

    async def _write(self, counts: dict[str, int]) -> None:
        keys = self.store.keys
        async with self.store.client.pipeline(transaction=False) as pipe:
            for run_id, count in counts.items():
                key = keys.watchers(run_id)
                if count > 0:
                    pipe.hset(key, {self.node_id: str(count)})
                    pipe.expire(key, _KEEP)
                else:
                    pipe.hdel(key, [self.node_id])
