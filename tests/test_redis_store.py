"""RedisRunStore, open_redis and the executor on Redis, against a real redis-server: records,
claims, listing, the eviction-policy warning, and a run replayed by another process's store."""

from __future__ import annotations

import logging
import re

import pytest
import trio

from tests.conftest import RedisServer
from trioflow import Agent, FlowEvent, ScriptedModel, Turn, open_event_bus, open_executor
from trioflow.handle import RunStatus

pytest.importorskip("coredis")

from trioflow.redis import (
    RedisRunStore,
    new_run_id,
    open_redis,
    redis_client,
)

# -- connecting ---------------------------------------------------------------------------


def test_redis_urls_name_a_host_port_and_db_or_a_unix_socket() -> None:
    pool = redis_client("redis://redis.example:6380/3").connection_pool
    assert (pool.location.host, pool.location.port) == ("redis.example", 6380)  # type: ignore[union-attr]
    assert pool.connection_kwargs["db"] == 3
    pool = redis_client("unix:///run/redis/redis.sock").connection_pool
    assert pool.location.path == "/run/redis/redis.sock"  # type: ignore[union-attr]


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "unix://", "redis://"])
def test_a_malformed_redis_url_raises_ValueError(url: str) -> None:
    with pytest.raises(ValueError, match="Redis URL"):
        redis_client(url)


async def test_an_evicting_maxmemory_policy_is_logged_as_a_warning(
    redis_url: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trioflow.redis")
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            assert await client.ping() == b"PONG"
        assert caplog.records == []  # noeviction: nothing to say
        redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru")
        async with open_redis(redis_url):
            pass
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "'allkeys-lru'" in record.getMessage()
    assert "noeviction" in record.getMessage()


# -- records ------------------------------------------------------------------------------


def test_new_run_ids_keep_the_run_look_sort_by_time_and_do_not_repeat() -> None:
    ids = [new_run_id() for _ in range(1000)]
    assert all(re.fullmatch(r"run_[0-9a-f]{12}_[0-9a-f]{16}", rid) for rid in ids)
    assert len(set(ids)) == 1000
    assert [rid[:16] for rid in ids] == sorted(rid[:16] for rid in ids)


async def test_a_run_is_created_pending_and_claimed_with_a_new_epoch(redis_url: str) -> None:
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client, owner="node-a")
            record = await store.create(request={"task": "What is 25 * 4?"}, capacity=32)
            assert record.run_id.startswith("run_")
            assert (record.status, record.epoch, record.attempt) == (RunStatus.PENDING, 0, 0)
            assert (record.owner, record.last_seq, record.capacity) == (None, 0, 32)
            assert record.request == {"task": "What is 25 * 4?"}
            assert await store.claim(record.run_id) == 1
            assert await store.claim(record.run_id, owner="node-b") == 2
            claimed = await store.get(record.run_id)
            assert (claimed.status, claimed.epoch, claimed.attempt) == (RunStatus.RUNNING, 2, 2)
            assert claimed.owner == "node-b"
            assert claimed.created_at == record.created_at <= claimed.updated_at


async def test_create_refuses_an_id_in_use_and_claim_an_unknown_or_finished_run(
    redis_url: str,
) -> None:
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            await store.create("run_one")
            with pytest.raises(ValueError, match="exists already"):
                await store.create("run_one")
            with pytest.raises(KeyError, match="run_two"):
                await store.claim("run_two")
            with pytest.raises(KeyError, match="run_two"):
                await store.get("run_two")
            epoch = await store.claim("run_one")
            async with store.open_history("run_one", epoch=epoch) as history:
                history.append(FlowEvent("flow.completed", {}, 1.0, 1, "run_one"))
            with pytest.raises(ValueError, match="finished"):
                await store.claim("run_one")


async def test_runs_are_listed_newest_first_from_any_client_and_expired_ones_dropped(
    redis_url: str,
) -> None:
    with trio.fail_after(10):
        async with open_redis(redis_url) as client, open_redis(redis_url) as other:
            store = RedisRunStore(client)
            ids = [(await store.create()).run_id for _ in range(3)]
            elsewhere = RedisRunStore(other)
            assert [r.run_id for r in await elsewhere.list()] == ids[::-1]
            assert [r.run_id for r in await elsewhere.list(limit=2)] == ids[:0:-1]
            await other.delete([elsewhere.keys.run(ids[1])])  # as when its TTL runs out
            assert [r.run_id for r in await elsewhere.list()] == [ids[2], ids[0]]
            assert await other.zcard(elsewhere.keys.index) == 2


# -- the executor on Redis ------------------------------------------------------------------


async def test_a_run_kept_in_redis_is_replayed_by_another_process_store(redis_url: str) -> None:
    with trio.fail_after(20):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            async with open_executor(
                history=64, history_store=store.history_factory(), run_ids=new_run_id
            ) as executor:
                run = await executor.start(Agent(), "What is 25 * 4?")
                async with run.subscribe(after=0) as events:
                    live = [event async for event in events]
            assert live[-1].type == "flow.completed"
            assert run.last_seq == live[-1].seq == len(live)
        # "After a restart": a new client, a new store, nothing shared but Redis.
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            record = await store.get(run.run_id)
            assert (record.status, record.last_seq, record.epoch) == ("completed", len(live), 1)
            assert record.request["task"] == "What is 25 * 4?"
            history = await store.history(run.run_id)
            assert list(await history.read(0)) == live
            # Served the way a run's bus serves it: a closed bus over the history.
            async with open_event_bus(history=history) as bus:
                bus.close()
                async with bus.subscribe(after=5) as resumed:  # Last-Event-ID: 5
                    assert [event async for event in resumed] == live[5:]
            with pytest.raises(trio.ClosedResourceError):
                history.append(live[0])


READ_BACK = """
import sys, trio
from trioflow.redis import RedisRunStore, open_redis

async def main(url, run_id, after):
    async with open_redis(url) as client:
        store = RedisRunStore(client)
        record = await store.get(run_id)
        print(record.status, record.last_seq)
        for event in await (await store.history(run_id)).read(int(after)):
            print(event.to_json())

trio.run(main, *sys.argv[1:])
"""


async def test_another_process_reads_a_finished_run_back_from_redis(redis_url: str) -> None:
    import os
    import sys
    from pathlib import Path

    import trioflow

    with trio.fail_after(60):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            async with open_executor(
                history_store=store.history_factory(), run_ids=new_run_id
            ) as executor:
                run = await executor.start(Agent(), "What is 25 * 4?")
                async with run.subscribe(after=0) as events:
                    live = [event async for event in events]
        root = str(Path(trioflow.__file__).parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        proc = await trio.run_process(
            [sys.executable, "-c", READ_BACK, redis_url, run.run_id, "3"],
            capture_stdout=True,
            env=env,
        )
    head, *lines = proc.stdout.decode().splitlines()
    assert head == f"completed {len(live)}"
    assert [FlowEvent.from_json(line) for line in lines] == live[3:]


async def test_a_run_claimed_elsewhere_is_fenced_and_the_executor_goes_on(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trioflow.executor")
    slow = Agent(ScriptedModel([Turn(" ".join(f"w{i}" for i in range(200)))], pace=100))
    with trio.fail_after(20):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client, owner="node-a")
            async with open_executor(
                history_store=store.history_factory(flush_interval=0.01), run_ids=new_run_id
            ) as executor:
                run = await executor.start(slow, "Talk")
                async with run.subscribe(after=0) as events:
                    async for event in events:
                        if event.seq == 20:
                            break
                await RedisRunStore(client, owner="node-b").claim(run.run_id)
                result = await run.wait()
                assert result.status == RunStatus.CANCELLED
                after = await executor.run(Agent(), "What is 25 * 4?")  # still serving
                assert after.status == RunStatus.COMPLETED
            record = await store.get(run.run_id)
            assert (record.owner, record.epoch, record.status) == ("node-b", 2, "running")
            written = await store.history(run.run_id)
            seqs = [event.seq for event in await written.read(0)]
            assert seqs == list(range(1, record.last_seq + 1))  # nothing after the fence
            assert not any(event.is_terminal() for event in await written.read(0))
    [warning] = [r for r in caplog.records if r.name == "trioflow.executor"]
    assert f"run {run.run_id} stopped" in warning.getMessage()
    assert "was fenced off" in warning.getMessage()


async def test_a_run_id_taken_in_redis_is_refused_when_the_run_starts(redis_url: str) -> None:
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            await store.create("run_taken")
            async with open_executor(history_store=store.history_factory()) as executor:
                with pytest.raises(ValueError, match="exists already"):
                    await executor.start(Agent(), "What is 25 * 4?", run_id="run_taken")
                assert "run_taken" not in executor.runs  # not left pending in the registry
                run = await executor.start(Agent(), "What is 25 * 4?")  # still serving
                assert (await run.wait()).status == RunStatus.COMPLETED
