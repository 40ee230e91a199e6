"""The executing side on a real redis-server, in this process: submit, open_worker, leases,
cancels from another client, handback, reclaiming a queue entry never taken, the reaper."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.conftest import CliProcess, RedisServer, cli_process, talker
from trioflow import FlowEvent
from trioflow.events import TERMINAL_TYPES
from trioflow.handle import RunStatus

pytest.importorskip("coredis")

from trioflow.redis import (
    QUEUE_GROUP,
    WORKER_LOST,
    RedisRunStore,
    open_redis,
    open_worker,
    reap,
    request_cancel,
    submit,
)


@asynccontextmanager
async def opened_store(url: str) -> AsyncIterator[RedisRunStore]:
    async with open_redis(url) as client:
        yield RedisRunStore(client, owner="test")


async def until_terminal(store: RedisRunStore, run_id: str) -> list[FlowEvent]:
    """Every event of the run once its terminal one is written (blocking ``XREAD``s, no polling)."""
    key = store.keys.events(run_id)
    last = "0-0"
    while True:
        read = await store.client.xread({key: last}, count=512, block=1000)
        entries = read[key.encode()] if read else ()
        for entry in entries:
            last = entry.identifier.decode()
            if FlowEvent.from_json(entry.field_values[b"e"]).type in TERMINAL_TYPES:
                history = await store.history(run_id)
                return list(await history.read(0))


def assert_gapless(events: list[FlowEvent]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type in TERMINAL_TYPES for e in events].count(True) == 1
    assert events[-1].type in TERMINAL_TYPES


async def test_a_submitted_run_is_taken_and_run_by_a_worker_gapless_to_its_end(
    redis_url: str,
) -> None:
    with trio.fail_after(20):
        async with opened_store(redis_url) as store:
            run_id = await submit(store, {"task": "say it", "timeout": 30})
            assert (await store.get(run_id)).status is RunStatus.PENDING
            async with open_worker(store, agent_factory=talker(10), name="w1") as worker:
                events = await until_terminal(store, run_id)
            assert_gapless(events)
            assert events[0].type == "flow.started"
            assert events[-1].type == "flow.completed"
            record = await store.get(run_id)
            assert (record.status, record.epoch, record.attempt) == (RunStatus.COMPLETED, 1, 1)
            assert record.owner == "w1"
            stats = worker.statistics()
            assert (stats.taken, stats.completed, stats.running, stats.state) == (
                1,
                1,
                0,
                "stopped",
            )
            consumers = await store.client.xinfo_consumers(store.keys.queue, QUEUE_GROUP)
            assert consumers == ()  # a stopped worker leaves the group


async def test_submit_validates_the_request_and_refuses_an_id_in_use(redis_url: str) -> None:
    with trio.fail_after(10):
        async with opened_store(redis_url) as store:
            with pytest.raises(ValueError, match="task"):
                await submit(store, {"tsk": "typo"})
            with pytest.raises(ValueError, match="max_attempts"):
                await submit(store, {"task": "x", "max_attempts": 0})
            await submit(store, {"task": "x"}, run_id="run_same")
            with pytest.raises(ValueError, match="exists already"):
                await submit(store, {"task": "x"}, run_id="run_same")
            assert await store.client.xlen(store.keys.queue) == 1


async def test_a_worker_runs_at_most_concurrency_runs_at_once(redis_url: str) -> None:
    with trio.fail_after(30):
        async with opened_store(redis_url) as store:
            ids = [await submit(store, {"task": "say it"}) for _ in range(5)]
            async with open_worker(store, agent_factory=talker(8, pace=40), concurrency=2) as w:
                runs = [await until_terminal(store, run_id) for run_id in ids]
            assert w.statistics().completed == 5
            # Each run from its flow.started to its terminal event: at most 2 overlap, and 2 do.
            edges = sorted(
                (event.timestamp, +1 if event.type == "flow.started" else -1)
                for events in runs
                for event in (events[0], events[-1])
            )
            running = [0]
            for _, step in edges:
                running.append(running[-1] + step)
            assert max(running) == 2


async def test_cancel_from_another_client_ends_the_run_cancelled_within_a_second(
    redis_url: str,
) -> None:
    with trio.fail_after(20):
        async with opened_store(redis_url) as store, opened_store(redis_url) as elsewhere:
            run_id = await submit(store, {"task": "talk"})
            async with open_worker(store, agent_factory=talker(200, pace=20), heartbeat=1.0):
                key = store.keys.events(run_id)
                await store.client.xread({key: "0-0"}, block=5000)  # it started
                asked = trio.current_time()
                assert await request_cancel(elsewhere, run_id, "stop it")
                events = await until_terminal(store, run_id)
                assert trio.current_time() - asked < 1.0  # the message, not the heartbeat
            assert_gapless(events)
            assert events[-1].type == "flow.cancelled"
            assert events[-1].data["reason"] == "stop it"
            assert not await request_cancel(elsewhere, run_id)  # finished


async def test_a_lost_cancel_message_is_caught_by_the_next_heartbeat(redis_url: str) -> None:
    with trio.fail_after(20):
        async with opened_store(redis_url) as store:
            run_id = await submit(store, {"task": "talk"})
            async with open_worker(store, agent_factory=talker(200, pace=20), heartbeat=0.5):
                await store.client.xread({store.keys.events(run_id): "0-0"}, block=5000)
                asked = trio.current_time()
                # The marker without its message (as if the message was lost).
                await store.client.hset(
                    store.keys.run(run_id), {"cancel_reason": "quiet", "cancel_mode": "immediate"}
                )
                events = await until_terminal(store, run_id)
                assert trio.current_time() - asked < 1.0 + 0.5
            assert events[-1].type == "flow.cancelled"
            assert events[-1].data["reason"] == "quiet"


async def test_a_run_cancelled_while_pending_is_cancelled_by_the_worker_taking_it(
    redis_url: str,
) -> None:
    with trio.fail_after(20):
        async with opened_store(redis_url) as store:
            run_id = await submit(store, {"task": "talk"})
            assert await request_cancel(store, run_id, "never mind")
            async with open_worker(store, agent_factory=talker(200, pace=20)):
                events = await until_terminal(store, run_id)
            assert events[-1].type == "flow.cancelled"
            assert events[-1].data["reason"] == "never mind"


async def test_an_after_turn_cancel_never_downgrades_an_immediate_one(redis_url: str) -> None:
    with trio.fail_after(10):
        async with opened_store(redis_url) as store:
            run_id = await submit(store, {"task": "talk"})
            assert await request_cancel(store, run_id, "now")
            assert await request_cancel(store, run_id, "later", mode="after_turn")
            marker = await store.client.hmget(
                store.keys.run(run_id), ["cancel_reason", "cancel_mode"]
            )
            assert list(marker) == [b"now", b"immediate"]
            assert not await request_cancel(store, "run_unknown")
            with pytest.raises(ValueError):
                await request_cancel(store, run_id, mode="eventually")


async def test_a_queued_run_whose_request_is_invalid_ends_failed(redis_url: str) -> None:
    with trio.fail_after(20):
        async with opened_store(redis_url) as store:
            record = await store.create(request={"prompt": "not a run request"})
            await store.client.xadd(store.keys.queue, {"run": record.run_id})
            async with open_worker(store, agent_factory=talker(5)) as worker:
                events = await until_terminal(store, record.run_id)
            assert [e.type for e in events] == ["flow.failed"]
            assert events[0].data["error"]["type"] == "ValueError"
            assert worker.statistics().failed == 1
            assert (await store.get(record.run_id)).status is RunStatus.FAILED


async def test_handback_requeues_the_runs_and_another_worker_finishes_them(
    redis_url: str,
) -> None:
    with trio.fail_after(30):
        async with opened_store(redis_url) as store:
            run_id = await submit(store, {"task": "talk"})
            async with open_worker(
                store, agent_factory=talker(30, pace=20), drain="handback", name="first"
            ) as first:
                await store.client.xread({store.keys.events(run_id): "0-0"}, block=5000)
            assert first.statistics().handed_back == 1
            record = await store.get(run_id)
            assert (record.status, record.epoch, record.attempt) == (RunStatus.PENDING, 2, 1)
            async with open_worker(store, agent_factory=talker(30), name="second") as second:
                events = await until_terminal(store, run_id)
            assert second.statistics().completed == 1
            assert_gapless(events)  # the second start continues the stream: no gap, no repeat
            assert [e.type for e in events].count("flow.started") == 2
            assert events[-1].type == "flow.completed"
            record = await store.get(run_id)
            assert (record.attempt, record.owner) == (2, "second")


async def test_a_queue_entry_read_but_never_taken_is_reclaimed(redis_url: str) -> None:
    with trio.fail_after(20):
        async with opened_store(redis_url) as store:
            run_id = await submit(store, {"task": "say it"})
            client = store.client
            await client.xgroup_create(store.keys.queue, QUEUE_GROUP, "0", mkstream=True)
            read = await client.xreadgroup(QUEUE_GROUP, "dead", {store.keys.queue: ">"}, count=1)
            assert read  # read by a consumer that died before taking it
            async with open_worker(
                store, agent_factory=talker(5), lease=0.5, heartbeat=0.2
            ) as worker:
                events = await until_terminal(store, run_id)
            assert events[-1].type == "flow.completed"
            assert worker.statistics().reclaimed == 1


async def test_the_reaper_ends_a_run_whose_lease_lapsed_or_requeues_it_when_allowed(
    redis_url: str,
) -> None:
    with trio.fail_after(20):
        async with opened_store(redis_url) as store:
            keys = store.keys
            lost = await submit(store, {"task": "a"})
            retried = await submit(store, {"task": "b", "max_attempts": 2})
            for run_id in (lost, retried):  # as a worker would, then it died
                epoch = await store.claim(run_id)
                async with store.open_history(run_id, epoch=epoch) as history:
                    history.append(FlowEvent("flow.started", {"task": "a"}, 1.0, 1, run_id))
            await store.client.zadd(keys.leases, {lost: 0, retried: 0})  # lapsed long ago
            assert await reap(store) == {lost: "failed", retried: "requeued"}
            assert await reap(store) == {}
            events = list(await (await store.history(lost)).read(0))
            assert [(e.seq, e.type) for e in events] == [(1, "flow.started"), (2, "flow.failed")]
            assert events[-1].data["reason"] == WORKER_LOST
            record = await store.get(lost)
            assert (record.status, record.epoch) == (RunStatus.FAILED, 2)
            assert await store.client.ttl(keys.run(lost)) > 0
            again = await store.get(retried)
            assert (again.status, again.epoch, again.attempt) == (RunStatus.PENDING, 2, 1)
            assert await store.client.zcard(keys.leases) == 0


# -- real worker processes ------------------------------------------------------------------


@asynccontextmanager
async def worker_process(
    url: str, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[CliProcess]:
    """A worker process on ``url`` (the scripted model), once it said it is ready; killed after."""
    command = ("worker", "--redis", url, "--model", "scripted", *args)
    async with cli_process(*command, ready=" ready on ", env=env) as worker:
        yield worker


FAST = ("--lease", "2", "--heartbeat", "0.5")


async def started(store: RedisRunStore, run_id: str) -> None:
    """Wait (blocking ``XREAD``) until the run's first event is in Redis."""
    while not await store.client.xread({store.keys.events(run_id): "0-0"}, count=1, block=1000):
        pass


async def submit_started(store: RedisRunStore) -> str:
    """Submit the demo's task; its id once a worker started it (its first event is in Redis)."""
    run_id = await submit(store, {"task": "What is 25 * 4?"})
    await started(store, run_id)
    return run_id


async def test_a_worker_process_runs_a_submitted_run_and_drains_it_on_sigterm_exit_0(
    redis_url: str,
) -> None:
    import os
    import secrets
    import signal

    notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    name = f"trioflow-test-{os.getpid()}-{secrets.token_hex(4)}"
    await notify.bind("\0" + name)  # systemd's NOTIFY_SOCKET, in the abstract namespace
    with notify, trio.fail_after(40):
        async with opened_store(redis_url) as store:
            env = {"NOTIFY_SOCKET": "@" + name}
            async with worker_process(redis_url, "--pace", "5", *FAST, env=env) as worker:
                assert await notify.recv(64) == b"READY=1"
                run_id = await submit_started(store)
                worker.process.send_signal(signal.SIGTERM)
                assert await notify.recv(64) == b"STOPPING=1"
                assert await worker.process.wait() == 0
            events = await until_terminal(store, run_id)
            assert_gapless(events)
            assert events[-1].type == "flow.completed"
            assert b"draining" in worker.err and b"1 completed" in worker.err


async def test_kill_9_of_the_worker_ends_its_run_worker_lost_within_10_s(redis_url: str) -> None:
    with trio.fail_after(60):
        async with opened_store(redis_url) as store:
            # The default lease (5 s), heartbeat (1 s) and reap interval (1 s).
            async with worker_process(redis_url, "--pace", "1", "--name", "a") as a:
                run_id = await submit_started(store)
                assert (await store.get(run_id)).owner == "a"
                async with worker_process(redis_url, "--name", "b"):
                    a.process.kill()
                    killed = trio.current_time()
                    events = await until_terminal(store, run_id)
                    assert trio.current_time() - killed < 10.0
            assert_gapless(events)
            assert events[-1].type == "flow.failed"
            assert events[-1].data["reason"] == WORKER_LOST
            assert (await store.get(run_id)).status is RunStatus.FAILED


async def test_a_worker_paused_past_its_lease_is_fenced_and_writes_nothing_more(
    redis_url: str,
) -> None:
    import signal

    with trio.fail_after(60):
        async with opened_store(redis_url) as store:
            async with worker_process(redis_url, "--pace", "2", "--name", "a", *FAST) as a:
                run_id = await submit_started(store)
                a.process.send_signal(signal.SIGSTOP)
                async with worker_process(redis_url, "--name", "b", *FAST):
                    events = await until_terminal(store, run_id)  # b's reaper ended it
                    assert events[-1].data["reason"] == WORKER_LOST
                    a.process.send_signal(signal.SIGCONT)
                    await a.wait_for("stopped here")  # a's next heartbeat: fenced
                    a.process.send_signal(signal.SIGTERM)
                    assert await a.process.wait() == 0
            after = list(await (await store.history(run_id)).read(0))
            assert after == events  # nothing written after the reaper's terminal event
            entries = await store.client.xrange(store.keys.events(run_id))
            ids = [entry.identifier.decode() for entry in entries]
            assert ids == [f"{seq}-0" for seq in range(1, len(events) + 1)]


async def test_cancel_from_another_process_reaches_the_worker_process_lost_message_or_not(
    redis_url: str,
) -> None:
    with trio.fail_after(40):
        async with opened_store(redis_url) as store:
            async with worker_process(redis_url, "--pace", "1", *FAST):  # heartbeat 0.5 s
                heard, lost = [await submit_started(store) for _ in range(2)]
                asked = trio.current_time()
                assert await request_cancel(store, heard, "enough")
                # The marker alone, as if the pub/sub message was lost: the heartbeat reads it.
                await store.client.hset(
                    store.keys.run(lost), {"cancel_reason": "quiet", "cancel_mode": "immediate"}
                )
                for run_id, reason in ((heard, "enough"), (lost, "quiet")):
                    events = await until_terminal(store, run_id)
                    assert trio.current_time() - asked < 1.0 + 0.5
                    assert_gapless(events)
                    assert events[-1].type == "flow.cancelled"
                    assert events[-1].data["reason"] == reason


async def test_a_worker_process_hands_its_runs_back_and_another_finishes_them(
    redis_url: str,
) -> None:
    import signal

    with trio.fail_after(60):
        async with opened_store(redis_url) as store:
            async with worker_process(redis_url, "--pace", "2", "--drain", "handback", *FAST) as a:
                run_id = await submit_started(store)
                a.process.send_signal(signal.SIGTERM)
                assert await a.process.wait() == 0
            assert b"1 handed back" in a.err
            assert (await store.get(run_id)).status is RunStatus.PENDING
            async with worker_process(redis_url, "--pace", "0", *FAST):
                events = await until_terminal(store, run_id)
            assert_gapless(events)
            assert events[-1].type == "flow.completed"
            assert (await store.get(run_id)).attempt == 2


def test_the_worker_command_exits_1_without_redis_and_2_for_bad_usage(tmp_path: Path) -> None:
    from tests.conftest import trioflow

    done = trioflow("worker", "--redis", f"unix://{tmp_path}/none.sock", "--model", "scripted")
    assert done.returncode == 1
    assert "cannot reach Redis" in done.stderr
    done = trioflow("worker", "--redis", "unix:///x.sock", "--lease", "1", "--heartbeat", "1")
    assert (done.returncode, done.stderr.strip()) == (
        2,
        "trioflow worker: --heartbeat must be below --lease",
    )
    done = trioflow("worker", "--redis", "http://localhost:6379", "--model", "scripted")
    assert done.returncode == 2
    assert "redis://" in done.stderr


async def test_a_worker_rides_out_a_redis_restart_with_aof_and_its_run_completes(
    redis_aof_server: RedisServer,
) -> None:
    url = redis_aof_server.url
    with trio.fail_after(40):
        async with opened_store(url) as store:
            run_id = await submit(store, {"task": "talk"})
            async with open_worker(store, agent_factory=talker(30, pace=15), name="w") as worker:
                await started(store, run_id)
                redis_aof_server.kill()  # kill -9 mid-run; back well within the lease
                redis_aof_server.start()
                events = await until_terminal(store, run_id)
            assert_gapless(events)
            assert events[-1].type == "flow.completed"
            assert worker.statistics().completed == 1


async def test_the_runs_of_a_worker_given_the_metrics_bus_are_counted(redis_url: str) -> None:
    """``serve --workers N --metrics``: the in-process worker's runs reach ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    from trioflow.redis import open_node_tail, open_remote_run, submit
    from trioflow.web._defaults import open_metrics

    with trio.fail_after(20):
        async with (
            open_metrics() as (bus, render),
            open_redis(redis_url) as client,
        ):
            store = RedisRunStore(client)
            async with (
                open_node_tail(store) as tail,
                open_worker(store, bus=bus, reap_interval=None) as worker,
            ):
                run_id = await submit(store, {"task": "What is 25 * 4?"})
                await (await open_remote_run(store, tail, run_id)).wait()
            assert worker.statistics().completed == 1  # the worker's block drained
            await trio.testing.wait_all_tasks_blocked()
            body, _ = render()
            found = {f.name: f.samples for f in text_string_to_metric_families(body.decode())}
            runs = {s.labels["status"]: s.value for s in found["trioflow_runs"]}
            assert runs == {"completed": 1.0}, run_id
