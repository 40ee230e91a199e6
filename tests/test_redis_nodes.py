"""Serving runs from any process on Redis, against a real redis-server: the node's tail,
RemoteRun, cross-process cancel, a Redis restart mid-stream and the bounded pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from tests.conftest import RedisServer
from trioflow import Agent, FlowEvent, ScriptedModel, StreamingFlowExecutor, Turn, open_executor
from trioflow.approvals import ApprovalError
from trioflow.handle import CancelMode, RunStatus

pytest.importorskip("coredis")

from trioflow.redis import (
    NodeTail,
    RedisRunStore,
    RemoteRun,
    listen_for_cancels,
    new_run_id,
    open_node_tail,
    open_redis,
    open_remote_run,
    request_cancel,
)


@asynccontextmanager
async def executor_and_tail(
    url: str, **history: Any
) -> AsyncIterator[tuple[StreamingFlowExecutor, RedisRunStore, NodeTail]]:
    """Two "nodes" on ``url``: an executor writing its runs there (node A, its store) and a
    node tail following them (node B, ``tail.store``), each with a client of its own."""
    async with open_redis(url) as client_a, open_redis(url) as client_b:
        store_a = RedisRunStore(client_a, owner="node-a")
        store_b = RedisRunStore(client_b, owner="node-b")
        async with (
            open_executor(
                history_store=store_a.history_factory(**history), run_ids=new_run_id
            ) as executor,
            open_node_tail(store_b) as tail,
        ):
            yield executor, store_a, tail


def talker(words: int = 60, pace: float = 200) -> Agent:
    return Agent(ScriptedModel([Turn(" ".join(f"w{i}" for i in range(words)))], pace=pace))


async def collect(run: RemoteRun, after: int = 0) -> list[FlowEvent]:
    async with run.subscribe(after=after) as events:
        return [event async for event in events]


async def test_a_remote_run_streams_a_run_of_another_executor_gapless_and_resumes(
    redis_url: str,
) -> None:
    with trio.fail_after(20):
        async with executor_and_tail(redis_url, flush_interval=0.005) as (executor, _store_a, tail):
            store_b = tail.store
            run = await executor.start(talker(), "Talk")
            remote = await open_remote_run(store_b, tail, run.run_id)
            assert remote.status in (RunStatus.PENDING, RunStatus.RUNNING)
            async with trio.open_nursery() as nursery:
                results: dict[str, list[FlowEvent]] = {}

                async def watch(name: str, after: int) -> None:
                    results[name] = await collect(remote, after)

                nursery.start_soon(watch, "all", 0)
                nursery.start_soon(watch, "live", 0)
            local = await run.wait()
            assert local.status == RunStatus.COMPLETED
            seqs = [event.seq for event in results["all"]]
            assert seqs == list(range(1, run.last_seq + 1))
            assert results["all"] == results["live"]
            assert results["all"][-1].type == "flow.completed"
            assert remote.done and remote.status == RunStatus.COMPLETED
            # a resume after it ended: from the stream, then the end
            assert await collect(remote, 10) == results["all"][10:]
            await remote.refresh()
            view = remote.to_dict()
            assert view["status"] == "completed" and view["task"] == "Talk"
            assert view["last_seq"] == run.last_seq
            assert remote.pending_approvals() == []
            with pytest.raises(ApprovalError):
                remote.decide("call_1", "approve")
            assert not remote.cancel()  # finished
            stats = tail.statistics()
            assert stats.events == run.last_seq or stats.refills >= 1
            with pytest.raises(KeyError):
                await open_remote_run(store_b, tail, "run_unknown")


async def test_fifty_watchers_of_one_run_cost_one_tail_read_per_batch(
    redis_url: str, redis_server: RedisServer
) -> None:
    with trio.fail_after(30):
        async with executor_and_tail(redis_url, flush_interval=0.02) as (executor, store_a, tail):
            store_b = tail.store
            run = await executor.start(talker(200, pace=400), "Talk")
            remote = await open_remote_run(store_b, tail, run.run_id)
            results: list[list[FlowEvent]] = []
            async with trio.open_nursery() as nursery:
                for _ in range(50):

                    async def watch() -> None:
                        results.append(await collect(remote))

                    nursery.start_soon(watch)
            assert len(results) == 50
            assert all(r == results[0] for r in results)
            assert [e.seq for e in results[0]] == list(range(1, run.last_seq + 1))
            stats = tail.statistics()
            history = await store_a.history(run.run_id)
            batches = history.last_seq  # an upper bound; the writer's batches are fewer
            # one read per batch written (plus the re-issues), not one per watcher
            assert stats.reads <= batches
    commands = redis_server.info("commandstats")

    def calls(command: str) -> int:
        return int(commands.get(f"cmdstat_{command}", "calls=0").split("calls=")[1].split(",")[0])

    # every batch the writer sent (one script call each; a few more scripts: create, claim)
    # wakes the one tail read at most once, however many watch (fewer, larger batches
    # on a quiet machine; more, smaller ones under load)
    assert stats.reads <= calls("evalsha") + calls("eval") + stats.reissues + 1
    assert calls("xread") < 50 + stats.reads  # never one per watcher and batch


async def test_a_cancel_from_another_node_reaches_the_executing_node(redis_url: str) -> None:
    with trio.fail_after(20):
        async with (
            executor_and_tail(redis_url, flush_interval=0.005) as (executor, store_a, tail),
            trio.open_nursery() as nursery,
        ):
            store_b = tail.store
            await nursery.start(listen_for_cancels, store_a, executor)
            run = await executor.start(talker(2000, pace=100), "Talk")
            remote = await open_remote_run(store_b, tail, run.run_id)
            async with remote.subscribe(after=0) as events:
                async for event in events:
                    if event.seq == 5:
                        assert remote.cancel("stop it", mode=CancelMode.IMMEDIATE)
                assert event.type == "flow.cancelled"
                assert event.data["reason"] == "stop it"
            assert (await run.wait()).status == RunStatus.CANCELLED
            record = await store_b.get(run.run_id)
            assert record.cancel is not None and record.cancel["reason"] == "stop it"
            assert not await request_cancel(store_b, run.run_id, "again")  # finished
            assert not await request_cancel(store_b, "run_unknown")  # no such run
            nursery.cancel_scope.cancel()


async def test_a_lost_cancel_message_is_caught_by_the_marker_check(redis_url: str) -> None:
    with trio.fail_after(20):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            async with (
                open_executor(history_store=store.history_factory(), run_ids=new_run_id) as ex,
                trio.open_nursery() as nursery,
            ):
                run = await ex.start(talker(2000, pace=100), "Talk")
                await request_cancel(store, run.run_id, "while away")  # nobody listens yet
                await nursery.start(
                    lambda **kw: listen_for_cancels(store, ex, check_interval=0.05, **kw)
                )
                assert (await run.wait()).status == RunStatus.CANCELLED
                nursery.cancel_scope.cancel()


async def test_a_redis_restart_mid_stream_delivers_every_event_once(
    redis_aof_server: RedisServer,
) -> None:
    url = redis_aof_server.url
    with trio.fail_after(40):
        async with executor_and_tail(url, flush_interval=0.005) as (executor, _store_a, tail):
            store_b = tail.store
            run = await executor.start(talker(300, pace=100), "Talk")
            remote = await open_remote_run(store_b, tail, run.run_id)
            seen: list[int] = []
            async with remote.subscribe(after=0) as events:
                async for event in events:
                    seen.append(event.seq)
                    if event.seq == 30:
                        redis_aof_server.kill()
                        await trio.sleep(0.3)
                        redis_aof_server.start()
            assert seen == list(range(1, len(seen) + 1))
            assert (await run.wait()).status == RunStatus.COMPLETED
            assert seen[-1] == run.last_seq
            assert tail.statistics().reconnects >= 1


async def test_a_hundred_watchers_hold_one_blocking_connection(
    redis_url: str, redis_server: RedisServer
) -> None:
    with trio.fail_after(30):
        async with executor_and_tail(redis_url) as (ex, _store_a, tail):
            store_b = tail.store
            runs = [await ex.start(talker(100, pace=50), "Talk") for _ in range(4)]
            remotes = [await open_remote_run(store_b, tail, r.run_id) for r in runs]
            joined = 0
            all_joined = trio.Event()
            counts: list[int] = []
            async with trio.open_nursery() as nursery:
                for i in range(100):

                    async def watch(remote: RemoteRun = remotes[i % 4]) -> None:
                        nonlocal joined
                        async with remote.subscribe(after=0) as events:
                            joined += 1
                            if joined == 100:
                                all_joined.set()
                            counts.append(len([e async for e in events]))

                    nursery.start_soon(watch)
                await all_joined.wait()
                await trio.sleep(0.1)  # the tail is in its blocking read
                clients = redis_server.info("clients")
                assert int(clients["blocked_clients"]) <= 1
                assert tail.statistics().live == 4
            assert len(counts) == 100


async def test_a_node_tail_checks_its_bounds_and_is_needed_open(redis_url: str) -> None:
    async with open_redis(redis_url) as client:
        store = RedisRunStore(client)
        for bad in ({"block": 0}, {"count": 0}, {"max_pending": 1, "count": 2}, {"max_runs": 0}):
            with pytest.raises(ValueError):
                NodeTail(store, **bad)
        closed = NodeTail(store)
        record = await store.create()
        with pytest.raises(RuntimeError, match="not open"):
            async with closed.watch(record.run_id):
                pass  # pragma: no cover
        remote = RemoteRun(store, closed, record)
        with pytest.raises(RuntimeError, match="not open"):
            remote.cancel()


async def test_a_resume_from_the_records_newest_seq_gets_the_rest_once(
    redis_url: str,
) -> None:
    with trio.fail_after(20):
        async with executor_and_tail(redis_url, flush_interval=0.005) as (executor, _, tail):
            run = await executor.start(talker(100, pace=200), "Talk")
            async with run.subscribe(after=0) as events:
                async for event in events:
                    if event.seq == 30:
                        break
            remote = await open_remote_run(tail.store, tail, run.run_id)
            after = remote.last_seq  # from the record: this node has read nothing yet
            assert after > 0
            rest = await collect(remote, after)
            assert [e.seq for e in rest] == list(range(after + 1, rest[-1].seq + 1))
            assert rest[-1].is_terminal()


async def test_a_hundred_changes_of_the_followed_runs_do_not_exhaust_the_pool(
    redis_url: str,
) -> None:
    with trio.fail_after(30):
        async with open_redis(redis_url) as client, open_node_tail(RedisRunStore(client)) as tail:
            store = tail.store
            first = await store.create()
            async with tail.watch(first.run_id):  # the tail is in its blocking read
                for _ in range(100):  # more changes than the pool (64) has connections
                    record = await store.create()
                    async with tail.watch(record.run_id):
                        await trio.sleep(0.001)
                with trio.fail_after(2):
                    await client.ping()  # a pooled connection is still to be had
                    await store.get(first.run_id)
            assert tail.statistics().reissues >= 1


async def test_a_watcher_leaving_while_the_tails_read_is_out_harms_no_one(
    redis_url: str,
) -> None:
    """The read's events for a run nobody follows any more are dropped, not emitted on its
    closed bus (which would end the node's tail and every run it follows)."""
    with trio.fail_after(60):
        async with open_redis(redis_url) as client, open_redis(redis_url) as writer_client:
            writer = RedisRunStore(writer_client, owner="w")
            async with open_node_tail(RedisRunStore(client)) as tail:
                other = await tail.store.create()  # a run followed throughout
                other_epoch = await writer.claim(other.run_id)
                record = await tail.store.create()
                epoch = await writer.claim(record.run_id)
                async with (
                    writer.open_history(record.run_id, epoch=epoch) as history,
                    writer.open_history(other.run_id, epoch=other_epoch) as other_history,
                    tail.watch(other.run_id) as followed,
                ):
                    seq = 0

                    def put(n: int) -> None:
                        nonlocal seq
                        for _ in range(n):
                            seq += 1
                            history.append(
                                FlowEvent("token.received", {"token": "x"}, 0.0, seq, record.run_id)
                            )

                    for _ in range(200):
                        async with tail.watch(record.run_id) as feed:
                            with trio.move_on_after(1):
                                await feed.reached(seq)
                            put(3)
                            await history.flush()
                        put(3)  # released: the tail's answer may come after the bus closed
                        await history.flush()
                    other_history.append(
                        FlowEvent("token.received", {"token": "y"}, 0.0, 1, other.run_id)
                    )
                    await other_history.flush()
                    await followed.reached(1)  # the tail still serves the other run
                    assert followed.last_seq == 1
