"""RedisHistory against a real redis-server: the EventHistory protocol (the same tests as
MemoryHistory's), batching, fencing, the seq check, the TTL, and a Redis restart with AOF."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import RedisServer
from trioflow import FlowEvent, HistoryExpired, MemoryHistory
from trioflow._util import collapse_single_group
from trioflow.history import EventHistory, Fenced
from trioflow.supervise import RetryPolicy

coredis = pytest.importorskip("coredis")

from trioflow.redis import (  # noqa: E402
    APPEND_SCRIPT,
    RedisHistory,
    RedisRunStore,
    open_redis,
)

OpenHistory = Callable[[int], AbstractAsyncContextManager[EventHistory]]


def events(first: int, last: int, run_id: str = "run_x") -> list[FlowEvent]:
    """Events with seqs ``first..last``, with payloads JSON must carry exactly."""
    return [
        FlowEvent(
            "info",
            {"i": seq, "text": f"é\n{seq}", "nested": {"list": [1, 2.5, None, True]}},
            1_700_000_000.0 + seq / 7,
            seq,
            run_id,
        )
        for seq in range(first, last + 1)
    ]


async def settle(history: EventHistory) -> None:
    """Write behind now, where the store does (reads then come from Redis, not the buffer)."""
    if isinstance(history, RedisHistory):
        with trio.fail_after(5):
            await history.flush()


async def written(history: RedisHistory, seq: int) -> None:
    """Wait (without asking for a flush) until the flusher has written ``seq``."""
    while history.statistics().written_seq < seq:
        await history._progress.wait()


@asynccontextmanager
async def writer(
    url: str, capacity: int = 4096, **options: object
) -> AsyncIterator[tuple[RedisRunStore, RedisHistory]]:
    """A new run's history, claimed and open for writing."""
    async with open_redis(url) as client:
        store = RedisRunStore(client, retention=60)
        record = await store.create(capacity=capacity)
        epoch = await store.claim(record.run_id)
        async with store.open_history(record.run_id, epoch=epoch, **options) as history:  # type: ignore[arg-type]
            yield store, history


@pytest.fixture(params=["memory", "redis"])
def open_history(request: pytest.FixtureRequest) -> OpenHistory:
    """Opens a history of a given capacity: a MemoryHistory, or a RedisHistory writer."""
    if request.param == "memory":

        @asynccontextmanager
        async def open_memory(capacity: int) -> AsyncIterator[EventHistory]:
            yield MemoryHistory(capacity)

        return open_memory
    url = request.getfixturevalue("redis_url")

    @asynccontextmanager
    async def open_in_redis(capacity: int) -> AsyncIterator[EventHistory]:
        async with writer(url, capacity) as (_, history):
            yield history

    return open_in_redis


# -- the protocol, for both stores ----------------------------------------------------------


async def test_an_empty_history_reads_nothing(open_history: OpenHistory) -> None:
    with trio.fail_after(10):
        async with open_history(8) as history:
            assert (history.last_seq, history.first_seq, len(history)) == (0, 1, 0)
            assert list(await history.read(0)) == []


async def test_read_returns_the_events_after_after_up_to_until(open_history: OpenHistory) -> None:
    with trio.fail_after(10):
        async with open_history(100) as history:
            for event in events(1, 10):
                history.append(event)
            for _ in range(2):  # from the buffer, then from Redis
                assert list(await history.read(0)) == events(1, 10)
                assert list(await history.read(3)) == events(4, 10)
                assert list(await history.read(3, 6)) == events(4, 6)
                assert list(await history.read(3, 99)) == events(4, 10)
                assert list(await history.read(10)) == []
                assert list(await history.read(12)) == []
                assert list(await history.read(3, 2)) == []
                await settle(history)


async def test_a_read_across_written_and_buffered_events_has_no_gap(
    open_history: OpenHistory,
) -> None:
    with trio.fail_after(10):
        async with open_history(100) as history:
            for event in events(1, 6):
                history.append(event)
            await settle(history)
            for event in events(7, 9):
                history.append(event)
            assert list(await history.read(4)) == events(5, 9)
            assert list(await history.read(4, 8)) == events(5, 8)


async def test_read_past_the_capacity_raises_HistoryExpired_with_first_available(
    open_history: OpenHistory,
) -> None:
    with trio.fail_after(10):
        async with open_history(5) as history:
            for event in events(1, 12):
                history.append(event)
            for _ in range(2):
                assert (history.first_seq, history.last_seq, len(history)) == (8, 12, 5)
                assert list(await history.read(7)) == events(8, 12)
                assert list(await history.read(7, 9)) == events(8, 9)
                for after in (0, 6):
                    with pytest.raises(HistoryExpired) as caught:
                        await history.read(after)
                    assert (caught.value.requested, caught.value.first_available) == (after, 8)
                await settle(history)


async def test_capacity_0_retains_nothing(open_history: OpenHistory) -> None:
    with trio.fail_after(10):
        async with open_history(0) as history:
            for event in events(1, 3):
                history.append(event)
            for _ in range(2):
                assert (history.first_seq, history.last_seq, len(history)) == (4, 3, 0)
                assert list(await history.read(3)) == []
                with pytest.raises(HistoryExpired) as caught:
                    await history.read(2)
                assert (caught.value.requested, caught.value.first_available) == (2, 4)
                await settle(history)


async def test_a_negative_after_raises_ValueError(open_history: OpenHistory) -> None:
    with trio.fail_after(10):
        async with open_history(8) as history:
            history.append(events(1, 1)[0])
            with pytest.raises(ValueError, match="'after'"):
                await history.read(-1)


Op = tuple[str, int, int | None]

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 9), st.none()),
        st.tuples(st.just("flush"), st.just(0), st.none()),
        st.tuples(st.just("read"), st.integers(0, 45), st.none() | st.integers(0, 45)),
    ),
    max_size=14,
)


async def outcome(history: EventHistory, after: int, until: int | None) -> object:
    """What ``read`` gives: the events, or the ``HistoryExpired`` figures."""
    try:
        return list(await history.read(after, until))
    except HistoryExpired as exc:
        return ("expired", exc.requested, exc.first_available)


@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(0, 12), ops=_ops)
def test_a_redis_history_reads_what_a_memory_history_of_its_capacity_reads(
    redis_server: RedisServer, capacity: int, ops: list[Op]
) -> None:
    async def main() -> None:
        memory = MemoryHistory(capacity)
        with trio.fail_after(10):
            async with writer(redis_server.url, capacity) as (store, redis):
                seq = 0
                for op, a, b in ops:
                    if op == "append":
                        batch = events(seq + 1, seq + a)
                        memory.extend(batch)
                        redis.extend(batch)
                        seq += a
                    elif op == "flush":
                        await redis.flush()
                    else:
                        assert await outcome(redis, a, b) == await outcome(memory, a, b)
                    shape = (redis.first_seq, redis.last_seq, len(redis))
                    assert shape == (memory.first_seq, memory.last_seq, len(memory))
                await redis.flush()
                reader = await store.history(redis.run_id)  # as another process sees it
                for after in range(seq + 2):
                    expected = await outcome(memory, after, None)
                    assert await outcome(redis, after, None) == expected
                    assert await outcome(reader, after, None) == expected

    trio.run(main)


# -- Redis only ---------------------------------------------------------------------------


async def test_events_are_stored_with_stream_id_seq_0(redis_url: str) -> None:
    with trio.fail_after(10):
        async with writer(redis_url) as (store, history):
            history.extend(events(1, 3, history.run_id))
            await history.flush()
            entries = await store.client.xrange(store.keys.events(history.run_id))
            assert [entry.identifier for entry in entries] == [b"1-0", b"2-0", b"3-0"]
            assert (
                FlowEvent.from_json(entries[1].field_values[b"e"])
                == events(2, 2, history.run_id)[0]
            )


async def test_appends_made_at_once_are_written_by_one_script_call(
    redis_url: str, redis_server: RedisServer
) -> None:
    def evalsha_calls() -> int:
        stats = redis_server.info("commandstats").get("cmdstat_evalsha", "calls=0,")
        return int(stats.split(",")[0].removeprefix("calls="))

    with trio.fail_after(10):
        async with writer(redis_url) as (_, history):
            before = evalsha_calls()
            history.extend(events(1, 500))
            await history.flush()
            assert history.statistics().writes == 1
            assert evalsha_calls() - before == 1  # the batch, not 500 commands


def script_calls(redis_server: RedisServer) -> int:
    """Script calls Redis has run, ``EVALSHA`` and ``EVAL``, but for failed ones (a first
    ``EVALSHA`` fails with ``NOSCRIPT`` and is sent again as ``EVAL``)."""
    total = 0
    for name in ("evalsha", "eval"):
        raw = redis_server.info("commandstats").get(f"cmdstat_{name}", "calls=0")
        fields = dict(field.split("=") for field in raw.split(","))
        total += int(fields["calls"]) - int(fields.get("failed_calls", 0))
    return total


@asynccontextmanager
async def shared_store(url: str) -> AsyncIterator[RedisRunStore]:
    """A store on one client: the histories it opens share one writer."""
    async with open_redis(url) as client:
        yield RedisRunStore(client, retention=60)


async def test_a_hundred_runs_of_one_client_are_written_by_one_call_per_round_trip(
    redis_url: str, redis_server: RedisServer
) -> None:
    with trio.fail_after(30):
        async with shared_store(redis_url) as store:
            client = store.client
            histories: list[RedisHistory] = []
            closing = [trio.Event() for _ in range(100)]

            async def run(i: int, *, task_status: trio.TaskStatus[RedisHistory]) -> None:
                run_id = (await store.create()).run_id
                epoch = await store.claim(run_id)
                async with store.open_history(run_id, epoch=epoch, flush_interval=0.05) as h:
                    task_status.started(h)
                    await closing[i].wait()

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    histories.append(await nursery.start(run, i))
                before = script_calls(redis_server)
                for h in histories:  # every run appends at once
                    h.extend(events(1, 3, h.run_id))
                await histories[-1].flush()
                assert script_calls(redis_server) - before == 1  # one call for 100 runs
                assert [h.statistics().written_seq for h in histories] == [3] * 100
                # A steady stream: 20 rounds of one event per run, 10 ms apart.
                before = script_calls(redis_server)
                start = trio.current_time()
                for seq in range(4, 24):
                    for h in histories:
                        h.append(events(seq, seq, h.run_id)[0])
                    await trio.sleep(0.01)
                await histories[-1].flush()
                elapsed = trio.current_time() - start
                calls = script_calls(redis_server) - before
                assert calls <= elapsed / 0.05 + 25  # O(1) per interval (or per round), not O(runs)
                assert calls < 20 * 100 / 10
                # The first run's task leads the writer; when its block ends, another takes over.
                closing[0].set()
                for h in histories[1:]:
                    h.extend(events(24, 25, h.run_id))
                await histories[-1].flush()
                for h in histories[1:]:
                    assert h.statistics().written_seq == 25
                for event in closing:
                    event.set()
            for h in histories:
                record = await store.get(h.run_id)
                assert record.last_seq == h.last_seq
                assert await client.xlen(store.keys.events(h.run_id)) == h.last_seq


async def test_a_fenced_run_writes_nothing_and_the_other_runs_of_its_call_are_written(
    redis_url: str, redis_server: RedisServer
) -> None:
    with trio.fail_after(20):
        async with shared_store(redis_url) as store:
            a, b = [(await store.create()).run_id for _ in range(2)]
            epoch_a, epoch_b = await store.claim(a), await store.claim(b)
            caught: list[Fenced] = []

            async def run_a(*, task_status: trio.TaskStatus[RedisHistory]) -> None:
                with pytest.raises(Fenced) as fenced:
                    async with store.open_history(a, epoch=epoch_a, flush_interval=60) as h:
                        task_status.started(h)
                        await trio.sleep_forever()  # cancelled by the fence
                caught.append(fenced.value)

            async with trio.open_nursery() as nursery:
                history_a = await nursery.start(run_a)  # its task joined first: it leads
                async with store.open_history(b, epoch=epoch_b, flush_interval=60) as history_b:
                    await store.claim(a)  # a is taken over: its writer is fenced
                    before = script_calls(redis_server)
                    history_a.extend(events(1, 3, a))
                    history_b.extend(events(1, 3, b))
                    await history_b.flush()  # one call carries both batches
                    assert script_calls(redis_server) - before == 1
                    history_b.extend(events(4, 5, b))
                    await history_b.flush()  # written by b's task now: a's left the writer
            assert (caught[0].epoch, caught[0].current) == (1, 2)
            assert history_a.statistics().state == "failed"
            assert (await store.get(a)).last_seq == 0
            assert await store.client.xlen(store.keys.events(a)) == 0
            assert (await store.get(b)).last_seq == 5
            assert list(await (await store.history(b)).read(0)) == events(1, 5, b)


async def test_an_error_redis_raises_writing_one_run_fails_that_run_only(redis_url: str) -> None:
    with trio.fail_after(20):
        async with shared_store(redis_url) as store:
            good, bad = [(await store.create()).run_id for _ in range(2)]
            epochs = {good: await store.claim(good), bad: await store.claim(bad)}
            await store.client.set(store.keys.events(bad), "not a stream")
            with pytest.raises(trio.BrokenResourceError, match="Redis refused") as caught:
                async with store.open_history(good, epoch=epochs[good]) as history:
                    async with store.open_history(bad, epoch=epochs[bad]) as broken:
                        history.extend(events(1, 3, good))
                        broken.extend(events(1, 3, bad))
                        await history.flush()  # the same call: written all the same
                        await trio.sleep_forever()  # cancelled by the failure
            assert isinstance(caught.value.__cause__, coredis.exceptions.WrongTypeError)
            assert history.statistics().written_seq == 3
            assert broken.statistics().state == "failed"
            assert (await store.get(good)).last_seq == 3
            assert (await store.get(bad)).last_seq == 0


async def test_a_block_cancelled_from_outside_still_writes_what_it_buffered(
    redis_url: str,
) -> None:
    async def cancelled_with_events_buffered(store: RedisRunStore) -> None:
        run_id = (await store.create()).run_id
        epoch = await store.claim(run_id)
        with trio.CancelScope() as scope:
            async with store.open_history(run_id, epoch=epoch, flush_interval=60.0) as h:
                h.extend(events(1, 5, run_id))
                scope.cancel()  # its task is cancelled at once
                await trio.sleep_forever()
        assert (await store.get(run_id)).last_seq == 5  # nothing was lost
        assert h.statistics().state == "closed"

    with trio.fail_after(20):
        async with shared_store(redis_url) as store:
            await cancelled_with_events_buffered(store)  # its drain ran the writer itself
        async with writer(redis_url, flush_interval=60.0) as (store, _):
            await cancelled_with_events_buffered(store)  # the other history's task wrote it


async def test_a_call_that_fails_is_retried_once_for_every_run_and_nothing_is_written_twice(
    redis_aof_server: RedisServer,
) -> None:
    retry = RetryPolicy(attempts=10, base_delay=0.6, jitter=0.0, retry_on=(Exception,))
    options = {"retry": retry, "write_timeout": 0.3}
    with trio.fail_after(30):
        async with shared_store(redis_aof_server.url) as store:
            client = store.client
            async with contextlib.AsyncExitStack() as stack:
                histories = []
                for _ in range(5):
                    run_id = (await store.create()).run_id
                    epoch = await store.claim(run_id)
                    histories.append(
                        await stack.enter_async_context(
                            store.open_history(run_id, epoch=epoch, **options)  # type: ignore[arg-type]
                        )
                    )
                for h in histories:
                    h.extend(events(1, 10, h.run_id))
                await histories[0].flush()
                redis_aof_server.pause()  # the call is sent, never answered: it times out
                try:
                    for h in histories:
                        h.extend(events(11, 20, h.run_id))
                    await trio.sleep(0.45)  # the call failed at 0.3 s; its retry goes at 0.9 s
                    assert [h.statistics().retries for h in histories] == [1] * 5
                finally:
                    redis_aof_server.resume()  # Redis now applies the abandoned call
                for h in histories:
                    await h.flush()
                # The retry found every batch written (the script's SEQ answer), once.
                assert [h.statistics().retries for h in histories] == [1] * 5
                for h in histories:
                    ids = [e.identifier for e in await client.xrange(store.keys.events(h.run_id))]
                    assert ids == [f"{seq}-0".encode() for seq in range(1, 21)]
                    assert list(await h.read(0)) == events(1, 20, h.run_id)


async def test_a_full_batch_is_written_at_once_and_a_partial_one_after_the_interval(
    redis_url: str,
) -> None:
    with trio.fail_after(20):
        async with writer(redis_url, batch_size=64, flush_interval=60.0) as (_, history):
            history.extend(events(1, 63))
            await trio.sleep(0.2)
            assert history.statistics().written_seq == 0  # 63 < 64 and the interval is 60 s
            history.append(events(64, 64)[0])
            await written(history, 64)
        async with writer(redis_url, batch_size=64, flush_interval=0.025) as (_, history):
            history.append(events(1, 1)[0])
            assert history.statistics().buffered == 1
            start = trio.current_time()
            await written(history, 1)
            assert trio.current_time() - start >= 0.02  # it waited for the interval


async def test_a_steady_stream_is_written_in_batches_of_about_batch_size(redis_url: str) -> None:
    with trio.fail_after(20):
        async with writer(redis_url, batch_size=64, flush_interval=0.025) as (_, history):
            for seq in range(1, 2001):
                history.append(events(seq, seq)[0])
                if seq % 8 == 0:
                    await trio.lowlevel.checkpoint()  # every 8 events, like a busy run
            await history.flush()
            writes = history.statistics().writes
    assert writes <= 2000 / 32  # batches of about 64, never one write per event


async def test_the_terminal_event_sets_the_status_and_the_retention_ttl(redis_url: str) -> None:
    with trio.fail_after(10):
        async with writer(redis_url) as (store, history):
            run_id = history.run_id
            history.extend(events(1, 2, run_id))
            await history.flush()
            assert await store.client.ttl(store.keys.run(run_id)) == -1
            history.append(FlowEvent("flow.failed", {"error": {}}, 1.0, 3, run_id))
            await history.flush()
            record = await store.get(run_id)
            assert (record.status, record.last_seq) == ("failed", 3)
            for key in (store.keys.run(run_id), store.keys.events(run_id)):
                assert 55 <= await store.client.ttl(key) <= 60


async def test_a_second_claim_fences_the_first_writer_which_writes_nothing_more(
    redis_url: str,
) -> None:
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            run_id = (await store.create()).run_id
            first = await store.claim(run_id)
            with pytest.raises(Fenced) as caught:
                async with store.open_history(run_id, epoch=first) as history:
                    history.extend(events(1, 5, run_id))
                    await history.flush()
                    second = await store.claim(run_id)  # another process takes the run over
                    history.extend(events(6, 8, run_id))
                    await trio.sleep_forever()  # cancelled by the fence
            assert (caught.value.epoch, caught.value.current) == (first, second) == (1, 2)
            assert history.statistics().state == "failed"
            history.append(events(9, 9, run_id)[0])  # dropped, not raised (the run's cleanup)
            assert list(await history.read(0, 8)) == events(1, 8, run_id)  # 6-8: the buffer
            with pytest.raises(Fenced):
                await history.read(0)  # 9 was dropped: no silent gap
            with pytest.raises(Fenced):
                await history.flush()
            assert (await store.get(run_id)).last_seq == 5
            # The new owner goes on from seq 6; the stream has each seq once.
            async with store.open_history(run_id, epoch=second) as taken:
                assert taken.last_seq == 5
                taken.extend(events(6, 7, run_id))
            ids = [e.identifier for e in await client.xrange(store.keys.events(run_id))]
            assert ids == [f"{seq}-0".encode() for seq in range(1, 8)]
            with pytest.raises(Fenced):
                async with store.open_history(run_id, epoch=first):
                    pass


async def test_the_script_refuses_a_batch_that_does_not_follow_the_last_seq(
    redis_url: str,
) -> None:
    with trio.fail_after(10):
        async with writer(redis_url) as (store, history):
            run_id = history.run_id
            history.extend(events(1, 3, run_id))
            await history.flush()
            script = store.client.register_script(APPEND_SCRIPT)
            keys = [store.keys.run(run_id), store.keys.events(run_id)]
            for first in (3, 5, 1):  # a duplicate, a gap, a replay
                with pytest.raises(coredis.exceptions.ResponseError, match=r"^SEQ 3$"):
                    await script(keys, [str(history.epoch), first, 100, "0", 0, "", "{}"])
            with pytest.raises(coredis.exceptions.ResponseError, match=r"^FENCED 1$"):
                await script(keys, ["7", 4, 100, "0", 0, "", "{}"])
            assert await store.client.xlen(store.keys.events(run_id)) == 3
            assert (await store.get(run_id)).last_seq == 3


async def test_a_history_whose_redis_is_gone_fails_after_the_retry_policy_backoff(
    tmp_path: object, autojump_clock: trio.testing.MockClock
) -> None:
    # No I/O but a connect that fails at once: the backoff is exact on the MockClock.
    from trioflow.redis._keys import Keys

    client = coredis.Redis(
        unix_socket_path=f"{tmp_path}/nothing.sock",
        retry_policy=coredis.retry.NoRetryPolicy(),
    )
    retry = RetryPolicy(attempts=4, base_delay=1.0, jitter=0.0, retry_on=(Exception,))
    history = RedisHistory(
        client, Keys(), "run_x", capacity=8, last_seq=0, epoch=1, retry=retry, flush_interval=0.025
    )
    async with client:
        start = trio.current_time()
        with (
            pytest.raises(trio.BrokenResourceError, match="Redis kept failing"),
            collapse_single_group(),
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(history._flusher)
                history.append(events(1, 1)[0])
        elapsed = trio.current_time() - start
    assert elapsed == pytest.approx(0.025 + 1 + 2 + 4, abs=0.01)
    assert history.statistics().retries == 3
    assert history.statistics().state == "failed"


async def test_the_buffer_is_bounded_the_history_fails_when_it_would_overflow(
    tmp_path: object,
) -> None:
    from trioflow.redis._keys import Keys

    client = coredis.Redis(unix_socket_path=f"{tmp_path}/nothing.sock")
    history = RedisHistory(
        client, Keys(), "run_x", capacity=8, last_seq=0, epoch=1, batch_size=4, max_buffer=10
    )
    history.extend(events(1, 10))
    assert history.statistics().state == "open"
    history.append(events(11, 11)[0])
    assert history.statistics().state == "failed"
    history.extend(events(12, 20))  # dropped: the buffer stays bounded
    assert history.statistics().buffered == 11
    with pytest.raises(trio.BrokenResourceError, match="more than 10 events"):
        await history.flush()


async def test_an_event_json_cannot_carry_fails_the_history_instead_of_its_flusher(
    redis_url: str,
) -> None:
    with trio.fail_after(10):
        with pytest.raises(trio.BrokenResourceError, match="cannot be encoded") as caught:
            async with writer(redis_url) as (_, history):
                history.extend(events(1, 2))
                history.append(FlowEvent("info", {"x": math.nan}, 1.0, 3, "run_x"))
                await trio.sleep_forever()  # cancelled by the failure
        assert isinstance(caught.value.__cause__, ValueError)
        assert history.statistics().written_seq == 0  # the batch held the event: none of it


async def test_a_full_redis_is_waited_for_and_a_wrong_key_type_fails_at_once(
    redis_url: str, redis_server: RedisServer
) -> None:
    retry = RetryPolicy(attempts=100, base_delay=0.02, max_delay=0.05, retry_on=(Exception,))
    with trio.fail_after(10):
        async with writer(redis_url, retry=retry) as (store, history):
            redis_server.command("CONFIG", "SET", "maxmemory", "1")  # every write: OOM
            history.extend(events(1, 3))
            await trio.sleep(0.2)
            assert history.statistics().written_seq == 0
            assert history.statistics().retries > 0
            redis_server.command("CONFIG", "SET", "maxmemory", "0")
            await history.flush()
            assert (await store.get(history.run_id)).last_seq == 3
        with pytest.raises(trio.BrokenResourceError, match="Redis refused") as caught:
            async with writer(redis_url, retry=retry) as (store, history):
                await store.client.set(store.keys.events(history.run_id), "not a stream")
                history.extend(events(1, 3))
                await trio.sleep_forever()
        assert isinstance(caught.value.__cause__, coredis.exceptions.WrongTypeError)
        assert history.statistics().retries == 0


async def test_a_paused_redis_is_retried_after_the_write_timeout_and_nothing_is_written_twice(
    redis_aof_server: RedisServer,
) -> None:
    retry = RetryPolicy(attempts=100, base_delay=0.02, max_delay=0.1, retry_on=(Exception,))
    with trio.fail_after(30):
        async with writer(redis_aof_server.url, retry=retry, write_timeout=0.3) as (
            store,
            history,
        ):
            history.extend(events(1, 10))
            await history.flush()
            redis_aof_server.pause()  # SIGSTOP: the writes are sent, never answered
            try:
                history.extend(events(11, 20))
                await trio.sleep(1.0)
                assert history.statistics().written_seq == 10
                assert history.statistics().retries >= 2
            finally:
                redis_aof_server.resume()
            await history.flush()
            history.extend(events(21, 25))
            await history.flush()
            # The first write was applied on SIGCONT; its retries were recognised as done.
            ids = [
                e.identifier for e in await store.client.xrange(store.keys.events(history.run_id))
            ]
            assert ids == [f"{seq}-0".encode() for seq in range(1, 26)]
            assert list(await history.read(0)) == events(1, 25)


async def test_after_a_redis_restart_with_aof_the_history_is_intact_and_appends_resume(
    redis_aof_server: RedisServer,
) -> None:
    retry = RetryPolicy(attempts=100, base_delay=0.02, max_delay=0.2, retry_on=(Exception,))
    with trio.fail_after(30):
        async with writer(redis_aof_server.url, retry=retry) as (store, history):
            run_id = history.run_id
            history.extend(events(1, 50, run_id))
            await history.flush()
            redis_aof_server.kill()  # kill -9, mid-run
            history.extend(events(51, 80, run_id))  # buffered while Redis is away
            await trio.sleep(0.3)
            assert history.statistics().written_seq == 50
            assert list(await history.read(50, 55)) == events(51, 55, run_id)  # from the buffer
            redis_aof_server.start()  # the same socket and files
            history.extend(events(81, 100, run_id))
            await history.flush()
            assert history.statistics().retries > 0
            assert list(await history.read(0)) == events(1, 100, run_id)
            ids = [e.identifier for e in await store.client.xrange(store.keys.events(run_id))]
            assert ids == [f"{seq}-0".encode() for seq in range(1, 101)]
