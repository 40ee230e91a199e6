from __future__ import annotations

import math

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trioflow import (
    EventType,
    FlowEvent,
    HistoryExpired,
    Overflow,
    SubscriberEvicted,
    open_event_bus,
)


async def drain(sub, n: int | None = None) -> list[FlowEvent]:
    out: list[FlowEvent] = []
    async for event in sub:
        out.append(event)
        if n is not None and len(out) == n:
            break
    return out


async def test_emit_assigns_gapless_seq_from_one():
    async with open_event_bus() as bus:
        events = [await bus.emit("info", {"i": i}) for i in range(5)]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert bus.last_seq == 5


async def test_emit_copies_data_and_sets_run_id():
    data = {"k": 1}
    async with open_event_bus() as bus:
        event = await bus.emit("info", data, run_id="r1")
    data["k"] = 2
    assert event.data == {"k": 1}
    assert event.run_id == "r1"


async def test_emit_prebuilt_event_keeps_class_and_timestamp():
    class MyEvent(FlowEvent):
        pass

    original = MyEvent.create("trade.executed", {"x": 1})
    async with open_event_bus() as bus, bus.subscribe() as sub:
        emitted = await bus.emit(original)
        received = await sub.receive()
    assert isinstance(received, MyEvent)
    assert received is emitted
    assert (received.seq, received.timestamp, received.data) == (1, original.timestamp, {"x": 1})


async def test_subscriber_receives_in_fifo_order():
    async with open_event_bus() as bus, bus.subscribe(buffer=100) as sub:
        for i in range(50):
            await bus.emit("info", {"i": i})
        got = [(await sub.receive()).data["i"] for _ in range(50)]
    assert got == list(range(50))


async def test_types_filter_by_set_string_and_predicate():
    async with (
        open_event_bus() as bus,
        bus.subscribe(types={"token.received"}) as by_set,
        bus.subscribe(types="error") as by_str,
        bus.subscribe(types=FlowEvent.is_terminal) as by_pred,
    ):
        await bus.emit(FlowEvent.token("a"))
        await bus.emit(FlowEvent.error("e"))
        await bus.emit(FlowEvent.flow_completed("done"))
        bus.close()
        assert [e.type for e in await drain(by_set)] == ["token.received"]
        assert [e.type for e in await drain(by_str)] == ["error"]
        assert [e.type for e in await drain(by_pred)] == ["flow.completed"]


async def test_iteration_ends_cleanly_after_close_with_buffered_events():
    async with open_event_bus() as bus, bus.subscribe() as sub:
        for i in range(3):
            await bus.emit("info", {"i": i})
        await bus.aclose()
        assert [e.data["i"] for e in await drain(sub)] == [0, 1, 2]
        with pytest.raises(trio.EndOfChannel):
            await sub.receive()


async def test_emit_after_close_raises_closed_resource_error():
    async with open_event_bus() as bus:
        bus.close()
        with pytest.raises(trio.ClosedResourceError):
            await bus.emit("info")
        with pytest.raises(trio.ClosedResourceError):
            bus.emit_nowait("info")


async def test_invalid_type_is_rejected_before_seq_is_used():
    async with open_event_bus() as bus:
        with pytest.raises(ValueError, match="invalid event type"):
            await bus.emit("bad type")
        assert (await bus.emit("ok")).seq == 1


async def test_block_overflow_applies_backpressure_and_loses_nothing():
    async with open_event_bus() as bus, bus.subscribe(buffer=2) as sub:
        received: list[int] = []

        async def consume() -> None:
            async for event in sub:
                received.append(event.data["i"])
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            for i in range(20):
                await bus.emit("info", {"i": i})
                assert sub.statistics().size <= 2
            bus.close()
    assert received == list(range(20))


async def test_block_emit_waits_when_full(autojump_clock):
    async with open_event_bus() as bus, bus.subscribe(buffer=1) as sub:
        await bus.emit("info")
        done = trio.Event()

        async def emitter() -> None:
            await bus.emit("info")
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(emitter)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            await sub.receive()
            await done.wait()
        assert (await sub.receive()).seq == 2


@pytest.mark.parametrize("overflow", [Overflow.DROP_OLDEST, Overflow.DROP_NEWEST])
async def test_drop_policies_account_for_every_event(autojump_clock, overflow):
    emitted = 500
    async with open_event_bus() as bus, bus.subscribe(buffer=8, overflow=overflow) as sub:
        seen: list[int] = []

        async def slow_consumer() -> None:
            async for event in sub:
                seen.append(event.seq)
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_consumer)
            for i in range(emitted):
                await bus.emit("info", {"i": i})
                if i % 50 == 0:
                    await trio.sleep(0.005)
            bus.close()
        stats = sub.statistics()
    assert stats.dropped > 0
    assert stats.delivered + stats.dropped == emitted
    assert seen == sorted(seen)
    if overflow is Overflow.DROP_OLDEST:
        assert seen[-1] == emitted  # the newest is always kept
    else:
        assert seen[:8] == list(range(1, 9))  # the oldest are kept


@pytest.mark.parametrize(
    ("overflow", "kept"),
    [(Overflow.DROP_OLDEST, [8, 9, 10]), (Overflow.DROP_NEWEST, [1, 2, 3])],
    ids=["drop_oldest_keeps_the_newest", "drop_newest_keeps_the_oldest"],
)
async def test_a_drop_policy_keeps_three_of_ten_events(overflow: Overflow, kept: list[int]):
    async with (
        open_event_bus() as bus,
        bus.subscribe(buffer=3, overflow=overflow) as sub,
    ):
        for _ in range(10):
            bus.emit_nowait("info")
        bus.close()
        assert [e.seq for e in await drain(sub)] == kept
        assert sub.statistics().dropped == 7


async def test_evict_closes_slow_subscriber_while_others_continue():
    async with (
        open_event_bus() as bus,
        bus.subscribe(buffer=2, overflow=Overflow.EVICT) as slow,
        bus.subscribe(buffer=100) as fast,
    ):
        for _ in range(5):
            await bus.emit("info")
        got = [(await slow.receive()).seq, (await slow.receive()).seq]
        assert got == [1, 2]
        with pytest.raises(SubscriberEvicted) as info:
            await slow.receive()
        assert info.value.last_seq == 2
        assert isinstance(info.value, trio.BrokenResourceError)
        assert [(await fast.receive()).seq for _ in range(5)] == [1, 2, 3, 4, 5]
        assert bus.statistics().evicted == 1
        # The evicted subscriber resumes from the history with no gap.
        async with bus.subscribe(after=info.value.last_seq) as again:
            await bus.emit("info")
            assert [(await again.receive()).seq for _ in range(4)] == [3, 4, 5, 6]


async def test_evicted_subscriber_iteration_raises():
    async with open_event_bus() as bus, bus.subscribe(buffer=1, overflow=Overflow.EVICT) as sub:
        bus.emit_nowait("info")
        bus.emit_nowait("info")
        with pytest.raises(SubscriberEvicted):
            await drain(sub)


async def test_emit_nowait_is_all_or_nothing_with_full_block_subscriber():
    async with (
        open_event_bus() as bus,
        bus.subscribe(buffer=10, overflow=Overflow.DROP_NEWEST) as other,
        bus.subscribe(buffer=1) as blocking,
    ):
        bus.emit_nowait("info")
        with pytest.raises(trio.WouldBlock):
            bus.emit_nowait("info")
        assert bus.last_seq == 1
        assert other.statistics().size == 1
        assert blocking.statistics().size == 1


async def test_emit_nowait_ignores_full_block_subscriber_that_filters_type_out():
    async with open_event_bus() as bus, bus.subscribe(buffer=1, types={"error"}) as sub:
        bus.emit_nowait("error")
        bus.emit_nowait("info")  # not for the full subscriber
        assert bus.last_seq == 2
        assert sub.statistics().size == 1


async def test_emit_nowait_raises_while_a_blocked_emit_is_pending():
    async with open_event_bus() as bus, bus.subscribe(buffer=1, types={"error"}) as sub:
        await bus.emit("error")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bus.emit, "error")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.WouldBlock):
                bus.emit_nowait("info")
            await sub.receive()
        assert [(await sub.receive()).seq] == [2]


async def test_order_is_preserved_across_concurrent_blocked_emitters():
    async with open_event_bus() as bus:
        async with bus.subscribe(buffer=1) as a, bus.subscribe(buffer=1) as b:
            results: dict[str, list[int]] = {"a": [], "b": []}

            async def consume(name: str, sub) -> None:
                async for event in sub:
                    results[name].append(event.seq)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume, "a", a)
                nursery.start_soon(consume, "b", b)
                async with trio.open_nursery() as emitters:
                    for _ in range(10):
                        emitters.start_soon(bus.emit, "info")
                bus.close()
    assert results["a"] == list(range(1, 11))
    assert results["b"] == list(range(1, 11))


async def test_cancelled_blocked_emit_evicts_subscribers_it_did_not_reach():
    async with open_event_bus() as bus, bus.subscribe(buffer=1) as sub:
        await bus.emit("info")
        with trio.move_on_after(0.01):
            await bus.emit("info")
        await sub.receive()
        with pytest.raises(SubscriberEvicted) as info:
            await sub.receive()
        assert info.value.last_seq == 1
        assert bus.history.last_seq == 2


async def test_subscriber_close_releases_a_blocked_emitter():
    async with open_event_bus() as bus:
        async with bus.subscribe(buffer=1) as sub:
            await bus.emit("info")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bus.emit, "info")
                await trio.testing.wait_all_tasks_blocked()
                sub.close()
        assert bus.last_seq == 2
        assert bus.statistics().subscribers == ()


async def test_subscription_statistics():
    async with open_event_bus() as bus, bus.subscribe(buffer=4, name="watcher") as sub:
        for _ in range(3):
            await bus.emit("info")
        await sub.receive()
        stats = sub.statistics()
    assert (stats.name, stats.size, stats.capacity, stats.delivered, stats.dropped) == (
        "watcher", 2, 4, 1, 0,
    )  # fmt: skip
    assert stats.utilization == 50.0
    assert stats.overflow is Overflow.BLOCK


async def test_receive_batch_returns_all_ready_events_in_order():
    async with open_event_bus() as bus, bus.subscribe(buffer=64) as sub:
        for _ in range(10):
            bus.emit_nowait("info")
        batch = await sub.receive_batch(max_items=4)
        assert [e.seq for e in batch] == [1, 2, 3, 4]
        batch = await sub.receive_batch()
        assert [e.seq for e in batch] == list(range(5, 11))
        assert sub.statistics().delivered == 10
        bus.close()
        with pytest.raises(trio.EndOfChannel):
            await sub.receive_batch()


async def test_receive_batch_rejects_non_positive_max():
    async with open_event_bus() as bus, bus.subscribe() as sub:
        with pytest.raises(ValueError, match="max_items"):
            await sub.receive_batch(0)


async def test_receive_nowait():
    async with open_event_bus() as bus, bus.subscribe() as sub:
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()
        bus.emit_nowait("info")
        assert sub.receive_nowait().seq == 1


async def test_invalid_buffer_is_rejected():
    async with open_event_bus() as bus:
        with pytest.raises(ValueError, match="buffer"):
            async with bus.subscribe(buffer=0):
                pass


# -- history and replay -----------------------------------------------------------


async def test_subscribe_after_replays_then_continues_live():
    async with open_event_bus(history=100) as bus:
        for _ in range(5):
            await bus.emit("info")
        async with bus.subscribe(after=2) as sub:
            await bus.emit("info")
            assert [(await sub.receive()).seq for _ in range(4)] == [3, 4, 5, 6]


async def test_subscribe_after_zero_replays_from_the_first_event():
    async with open_event_bus() as bus:
        await bus.emit("info")
        async with bus.subscribe(after=0) as sub:
            assert (await sub.receive()).seq == 1


async def test_replay_respects_type_filter():
    async with open_event_bus() as bus:
        await bus.emit("info")
        await bus.emit("error")
        async with bus.subscribe(after=0, types={"error"}) as sub:
            assert (await sub.receive()).type == "error"


async def test_subscribe_after_older_than_history_raises_history_expired():
    async with open_event_bus(history=3) as bus:
        for _ in range(10):
            await bus.emit("info")
        with pytest.raises(HistoryExpired) as info:
            async with bus.subscribe(after=2):
                pass
        assert (info.value.requested, info.value.first_available) == (2, 8)
        assert bus.statistics().subscribers == ()
        async with bus.subscribe(after=7) as sub:  # the oldest resumable point
            assert (await sub.receive()).seq == 8


async def test_history_is_bounded():
    async with open_event_bus(history=5) as bus:
        for _ in range(20):
            await bus.emit("info")
        stats = bus.statistics()
    assert (stats.history_size, stats.history_capacity, stats.emitted) == (5, 5, 20)


async def test_subscribe_on_closed_bus_replays_history_then_ends():
    async with open_event_bus() as bus:
        for _ in range(3):
            await bus.emit("info")
    async with bus.subscribe(after=1) as sub:
        assert [e.seq for e in await drain(sub)] == [2, 3]


async def test_negative_after_is_rejected():
    async with open_event_bus() as bus:
        with pytest.raises(ValueError, match="after"):
            async with bus.subscribe(after=-1):
                pass


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=30),
    st.integers(min_value=0, max_value=40),
)
def test_replay_then_live_has_no_gap_or_duplicate_under_concurrent_emits(
    bursts: list[int], subscribe_at: int
):
    async def main() -> None:
        total = sum(bursts) + 5
        async with open_event_bus(history=total + 10) as bus:
            collected: list[int] = []

            async def emitter() -> None:
                for burst in bursts:
                    for _ in range(burst):
                        await bus.emit("info")
                    await trio.lowlevel.checkpoint()
                for _ in range(5):
                    await bus.emit("info")

            async def late_subscriber() -> None:
                while bus.last_seq < min(subscribe_at, total):
                    await trio.lowlevel.checkpoint()
                async with bus.subscribe(after=max(0, bus.last_seq - 3), buffer=total) as sub:
                    first = sub  # noqa: F841
                    async for event in sub:
                        collected.append(event.seq)
                        if event.seq == total:
                            return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(late_subscriber)
                nursery.start_soon(emitter)
        assert collected == list(range(collected[0], total + 1))

    trio.run(main)


# -- listeners ------------------------------------------------------------------------


async def test_sync_and_async_listeners_see_every_event():
    sync_seen: list[int] = []
    async_seen: list[int] = []

    async def async_listener(event: FlowEvent) -> None:
        await trio.lowlevel.checkpoint()
        async_seen.append(event.seq)

    async with open_event_bus() as bus:
        bus.add_listener(lambda e: sync_seen.append(e.seq))
        bus.add_listener(async_listener)
        for _ in range(10):
            await bus.emit("info")
    assert sync_seen == list(range(1, 11))
    assert async_seen == list(range(1, 11))


async def test_slow_listener_does_not_stall_others(autojump_clock):
    fast: list[int] = []

    async def slow(event: FlowEvent) -> None:
        await trio.sleep(3600)

    async with open_event_bus(drain_timeout=1) as bus:
        bus.add_listener(slow, buffer=2, overflow=Overflow.DROP_NEWEST)
        bus.add_listener(lambda e: fast.append(e.seq))
        for _ in range(50):
            await bus.emit("info")
        await trio.testing.wait_all_tasks_blocked()
        assert fast == list(range(1, 51))
        stats = {s.name: s for s in bus.statistics().listeners}
        assert stats["slow"].subscription.dropped > 0


async def test_remove_listener_stops_it():
    seen: list[int] = []
    async with open_event_bus() as bus:
        lid = bus.add_listener(lambda e: seen.append(e.seq))
        await bus.emit("info")
        await trio.testing.wait_all_tasks_blocked()
        bus.remove_listener(lid)
        await bus.emit("info")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(KeyError):
            bus.remove_listener(lid)
    assert seen == [1]


async def test_close_lets_listeners_drain_buffered_events():
    seen: list[int] = []

    async def slowish(event: FlowEvent) -> None:
        await trio.lowlevel.checkpoint()
        seen.append(event.seq)

    async with open_event_bus() as bus:
        bus.add_listener(slowish, buffer=100)
        for _ in range(50):
            bus.emit_nowait("info")
    assert seen == list(range(1, 51))


async def test_drain_timeout_cancels_stuck_listener(autojump_clock):
    async def stuck(event: FlowEvent) -> None:
        await trio.sleep(math.inf)

    start = trio.current_time()
    async with open_event_bus(drain_timeout=2) as bus:
        bus.add_listener(stuck)
        await bus.emit("info")
    assert trio.current_time() - start == pytest.approx(2)


async def test_add_listener_on_closed_bus_raises():
    async with open_event_bus() as bus:
        bus.close()
        with pytest.raises(trio.ClosedResourceError):
            bus.add_listener(print)


# -- named events --------------------------------------------------------------------


async def test_register_event_and_emit_by_name():
    got: list[FlowEvent] = []
    async with open_event_bus() as bus:
        bus.register_event("on_trade", "trade.executed", callback=got.append)
        await bus.emit_named("on_trade", {"qty": 1})
        bus.emit_named_nowait("on_trade", {"qty": 2})
    assert [e.data["qty"] for e in got] == [1, 2]
    assert all(e.type == "trade.executed" for e in got)


@pytest.mark.parametrize("name", ["token", "onToken", "on-token", ""])
async def test_register_event_requires_on_prefix(name: str):
    async with open_event_bus() as bus:
        with pytest.raises(ValueError, match="on_"):
            bus.register_event(name, "info")


async def test_default_and_streaming_presets():
    async with open_event_bus() as bus:
        bus.register_default_events()
        assert bus.registered_events["on_token"] == EventType.TOKEN_RECEIVED
        assert bus.registered_events["on_end"] == EventType.FLOW_COMPLETED
        bus.register_streaming_events()
        assert bus.registered_events["on_message"] == EventType.ADD_MESSAGE
        event = await bus.emit_named("on_token", {"token": "x"})
        assert event.is_token()


async def test_emit_unknown_name_raises_key_error():
    async with open_event_bus() as bus:
        with pytest.raises(KeyError, match="on_nothing"):
            await bus.emit_named("on_nothing")


async def test_known_types_are_per_bus():
    # Each bus keeps its own cache of validated type names: what one bus
    # validated (by emitting) or named (register_event) does not leak to another.
    async with open_event_bus(name="a") as a, open_event_bus(name="b") as b:
        await a.emit("per-bus.emitted")
        a.emit_nowait("per-bus.emitted-nowait")
        a.register_event("on_per_bus", "per-bus.named")
        for type in ("per-bus.emitted", "per-bus.emitted-nowait", "per-bus.named"):
            assert type in a._known_types
            assert type not in b._known_types
        assert EventType.TOKEN_RECEIVED in b._known_types
        async with a.subscribe(types={"per-bus.named"}):
            pass
        with pytest.raises(ValueError, match="unknown"):
            async with b.subscribe(types={"per-bus.named"}):
                pass
        with pytest.raises(KeyError, match="on_per_bus"):
            await b.emit_named("on_per_bus")
        # The other bus still validates on its own.
        with pytest.raises(ValueError, match="invalid event type"):
            await b.emit("per-bus emitted")
        assert (await b.emit("per-bus.emitted")).seq == 1
        assert "per-bus.emitted" in b._known_types


async def test_bus_statistics_counts():
    async with open_event_bus(history=10) as bus:
        async with bus.subscribe(buffer=1, overflow=Overflow.DROP_NEWEST):
            for _ in range(4):
                await bus.emit("info")
            stats = bus.statistics()
    assert (stats.emitted, stats.last_seq, stats.history_size, stats.dropped) == (4, 4, 4, 3)
    assert len(stats.subscribers) == 1
    assert not stats.closed


async def test_cancelled_emit_sends_nothing():
    async with open_event_bus() as bus, bus.subscribe() as sub:
        with trio.CancelScope() as scope:
            scope.cancel()
            await bus.emit("info")
        assert bus.last_seq == 0
        assert sub.statistics().size == 0


@pytest.mark.parametrize("after", [None, 0])
async def test_subscribe_cancelled_before_it_returns_leaves_no_subscriber(after):
    async with open_event_bus() as bus:
        await bus.emit("info")
        with trio.CancelScope() as scope:
            scope.cancel()
            async with bus.subscribe(after=after, name="never"):
                pytest.fail("the subscription was handed out despite the cancellation")
        assert bus.statistics().subscribers == ()


async def test_emit_that_delivered_returns_despite_pending_cancellation():
    async with open_event_bus() as bus, bus.subscribe() as sub:
        with trio.CancelScope() as scope:
            event = await bus.emit("info")
            scope.cancel()
        assert event.seq == 1
        assert (await sub.receive()).seq == 1
