from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest
import trio
import trio.testing
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from trioflow import Agent, ScriptedModel, StreamingFlowExecutor, ToolCall, Turn, tool
from trioflow.builtin import calculator
from trioflow.cache import (
    Cache,
    CacheObserver,
    CacheStatistics,
    MemoryCache,
    cached,
    tool_cache_key,
)
from trioflow.telemetry import Telemetry

# -- MemoryCache ---------------------------------------------------------------------------


async def test_get_of_a_missing_key_returns_the_default_and_counts_a_miss() -> None:
    cache = MemoryCache()
    assert await cache.get("nope") is None
    assert await cache.get("nope", 42) == 42
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.size) == (0, 2, 0)


async def test_set_then_get_counts_a_hit() -> None:
    cache = MemoryCache()
    await cache.set("k", {"v": 1})
    assert await cache.get("k") == {"v": 1}
    assert cache.statistics() == CacheStatistics(
        hits=1, misses=0, size=1, max_size=1024, evictions=0, expired=0
    )
    assert cache.statistics().hit_rate == 1.0


async def test_a_cached_None_is_a_hit_not_a_miss() -> None:
    cache = MemoryCache()
    marker = object()
    await cache.set("k", None)
    assert await cache.get("k", marker) is None
    assert cache.statistics().hits == 1


async def test_entries_expire_after_the_default_ttl(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(ttl=10.0)
    await cache.set("k", "v")
    await trio.sleep(9.999)
    assert await cache.get("k") == "v"
    await trio.sleep(0.001)
    assert await cache.get("k") is None
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.expired, stats.size) == (1, 1, 1, 0)


async def test_a_per_entry_ttl_overrides_the_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = MemoryCache(ttl=10.0)
    await cache.set("short", 1, ttl=1.0)
    await cache.set("forever", 2, ttl=math.inf)
    await trio.sleep(1.0)
    assert await cache.get("short") is None
    await trio.sleep(10_000)
    assert await cache.get("forever") == 2


async def test_ttl_None_means_no_expiry(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(ttl=None)
    await cache.set("k", "v")
    await trio.sleep(86_000.0)
    assert await cache.get("k") == "v"


async def test_a_full_cache_evicts_the_least_recently_used_entry() -> None:
    cache = MemoryCache(max_size=2)
    await cache.set("a", 1)
    await cache.set("b", 2)
    assert await cache.get("a") == 1  # "a" is now the most recently used
    await cache.set("c", 3)
    assert await cache.get("b") is None
    assert await cache.get("a") == 1
    assert await cache.get("c") == 3
    stats = cache.statistics()
    assert (stats.size, stats.evictions) == (2, 1)


async def test_a_full_cache_drops_expired_entries_before_evicting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = MemoryCache(max_size=2, ttl=5.0)
    await cache.set("old", 1, ttl=1.0)
    await cache.set("live", 2)
    await trio.sleep(2.0)
    await cache.set("new", 3)
    assert await cache.get("live") == 2
    stats = cache.statistics()
    assert (stats.evictions, stats.expired, stats.size) == (0, 1, 2)


async def test_setting_an_existing_key_replaces_it_without_eviction() -> None:
    cache = MemoryCache(max_size=1)
    await cache.set("k", 1)
    await cache.set("k", 2)
    assert await cache.get("k") == 2
    assert cache.statistics().evictions == 0


async def test_delete_clear_and_purge(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(ttl=1.0)
    await cache.set("a", 1)
    await cache.set("b", 2, ttl=100.0)
    assert await cache.delete("a") is True
    assert await cache.delete("a") is False
    await cache.set("c", 3)
    await trio.sleep(1.0)
    assert await cache.purge() == 1
    assert len(cache) == 1
    await cache.clear()
    assert len(cache) == 0
    assert cache.statistics().expired == 1


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_size"):
        MemoryCache(max_size=0)
    with pytest.raises(ValueError, match="ttl"):
        MemoryCache(ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        cached(calculator, ttl=-1)
    with pytest.raises(TypeError, match="needs a Tool"):
        cached(lambda: 1)  # type: ignore[arg-type]


async def test_set_with_a_bad_ttl_raises() -> None:
    with pytest.raises(ValueError, match="ttl"):
        await MemoryCache().set("k", 1, ttl=-2.0)


def test_memory_cache_implements_the_protocol() -> None:
    assert isinstance(MemoryCache(), Cache)


# -- keys ------------------------------------------------------------------------------------


def test_tool_cache_keys_ignore_key_order() -> None:
    assert tool_cache_key("t", {"a": 1, "b": [1, 2]}) == tool_cache_key("t", {"b": [1, 2], "a": 1})
    assert tool_cache_key("t", {"a": 1}) != tool_cache_key("u", {"a": 1})
    assert tool_cache_key("t", {"a": 1}) == 'tool:t:{"a":1}'


def test_an_input_that_is_not_json_cannot_be_a_key() -> None:
    with pytest.raises(TypeError, match="cache key"):
        tool_cache_key("t", {"a": object()})


# -- cached tools ---------------------------------------------------------------------------


def counting_tool() -> tuple[Any, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    @tool
    async def square(x: int) -> int:
        """Square a number.

        Args:
            x: The number.
        """
        calls.append({"x": x})
        await trio.sleep(1.0)
        if x < 0:
            raise ValueError("negative")
        return x * x

    return square, calls


def test_a_cached_tool_looks_like_the_original() -> None:
    calc = cached(calculator)
    assert calc is not calculator
    assert calc.name == calculator.name
    assert calc.description == calculator.description
    assert calc.input_schema == calculator.input_schema
    assert calc.spec() == calculator.spec()


async def test_repeated_calls_with_the_same_input_are_served_from_the_cache(
    autojump_clock: trio.testing.MockClock,
) -> None:
    square, calls = counting_tool()
    cache = MemoryCache()
    fast = cached(square, cache)
    assert await fast.invoke({"x": 3}) == 9
    start = trio.current_time()
    assert await fast.invoke({"x": 3.0}) == 9  # the same input once checked
    assert trio.current_time() == start  # no second call of the tool
    assert await fast.invoke({"x": 4}) == 16
    assert calls == [{"x": 3}, {"x": 4}]
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.size) == (1, 2, 2)


async def test_cached_results_expire_with_the_ttl(autojump_clock: trio.testing.MockClock) -> None:
    square, calls = counting_tool()
    fast = cached(square, ttl=5.0)
    await fast.invoke({"x": 2})
    await trio.sleep(4.0)
    await fast.invoke({"x": 2})
    assert len(calls) == 1
    await trio.sleep(5.0)
    await fast.invoke({"x": 2})
    assert len(calls) == 2


async def test_errors_are_not_cached(autojump_clock: trio.testing.MockClock) -> None:
    square, calls = counting_tool()
    cache = MemoryCache()
    fast = cached(square, cache)
    for _ in range(2):
        with pytest.raises(ValueError, match="negative"):
            await fast.invoke({"x": -1})
    assert len(calls) == 2
    assert cache.statistics().size == 0


async def test_bad_input_is_rejected_before_the_cache(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from trioflow import ToolInputError

    square, calls = counting_tool()
    cache = MemoryCache()
    with pytest.raises(ToolInputError):
        await cached(square, cache).invoke({"x": "three"})
    assert cache.statistics().misses == 0
    assert calls == []


async def test_concurrent_calls_with_the_same_input_call_the_tool_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    square, calls = counting_tool()
    cache = MemoryCache()
    fast = cached(square, cache)
    results: list[int] = []

    async def call(x: int) -> None:
        results.append(await fast.invoke({"x": x}))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(call, 7)
        nursery.start_soon(call, 8)
    assert sorted(results) == [49] * 5 + [64]
    assert sorted(c["x"] for c in calls) == [7, 8]
    stats = cache.statistics()
    assert (stats.hits, stats.misses) == (4, 2)


async def test_cached_calculator_in_a_full_run_serves_the_second_run_from_the_cache() -> None:
    cache = MemoryCache()
    agent = Agent(ScriptedModel(), tools=[cached(calculator, cache, ttl=60.0)])
    executor = StreamingFlowExecutor()
    for _ in range(2):
        async with executor.stream(agent, "What is 25 * 4?") as events:
            results = [e.data["result"] async for e in events if e.type == "tool.completed"]
        assert results == [100]
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.size) == (1, 1, 1)


async def test_hits_and_misses_reach_telemetry_counters() -> None:
    reader = InMemoryMetricReader()
    telemetry = Telemetry(meter_provider=MeterProvider(metric_readers=[reader]))
    calc = cached(calculator, observer=telemetry)
    script = [
        Turn("", tool_calls=[ToolCall("c1", "calculator", {"operation": "add", "a": 1, "b": 2})]),
        Turn("", tool_calls=[ToolCall("c2", "calculator", {"operation": "add", "a": 1, "b": 2})]),
        Turn("3 twice."),
    ]
    result = await StreamingFlowExecutor().run(Agent(ScriptedModel(script), tools=[calc]), "1+2")
    assert result.ok
    data = reader.get_metrics_data()
    assert data is not None
    figures = {
        (m.name, tuple(sorted(p.attributes.items()))): p.value  # type: ignore[union-attr]
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    }
    assert figures[("trioflow.cache.hits", (("tool", "calculator"),))] == 1
    assert figures[("trioflow.cache.misses", (("tool", "calculator"),))] == 1


# -- the observer hook ------------------------------------------------------------------------


class Lookups:
    """A CacheObserver that writes down what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, str | None]] = []

    def record_cache(self, *, hit: bool, tool: str | None = None) -> None:
        self.seen.append((hit, tool))


async def test_the_observer_is_told_each_hit_and_miss_with_the_tool_name() -> None:
    lookups = Lookups()
    assert isinstance(lookups, CacheObserver)
    calc = cached(calculator, observer=lookups)
    add = {"operation": "add", "a": 1, "b": 2}
    assert await calc.invoke(add) == 3
    assert await calc.invoke(add) == 3
    assert await calc.invoke({"operation": "add", "a": 2, "b": 2}) == 4
    assert lookups.seen == [(False, "calculator"), (True, "calculator"), (False, "calculator")]


async def test_failed_calls_are_told_as_misses_and_still_not_cached() -> None:
    lookups = Lookups()
    calls = 0

    @tool
    async def flaky(x: int) -> int:
        """Fails on its first call."""
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first call")
        return x

    fast = cached(flaky, observer=lookups)
    with pytest.raises(Exception, match="first call"):
        await fast.invoke({"x": 1})
    assert await fast.invoke({"x": 1}) == 1
    assert await fast.invoke({"x": 1}) == 1
    assert lookups.seen == [(False, "flaky"), (False, "flaky"), (True, "flaky")]


async def test_telemetry_is_the_older_name_of_the_observer() -> None:
    lookups = Lookups()
    calc = cached(calculator, telemetry=lookups)
    await calc.invoke({"operation": "add", "a": 1, "b": 2})
    assert lookups.seen == [(False, "calculator")]
    with pytest.raises(ValueError, match="not both"):
        cached(calculator, observer=lookups, telemetry=lookups)


def test_a_telemetry_is_a_cache_observer() -> None:
    assert isinstance(Telemetry(), CacheObserver)


def test_importing_the_cache_loads_no_telemetry() -> None:
    code = (
        "import sys, trioflow.cache; "
        "print([m for m in sys.modules if 'telemetry' in m or 'opentelemetry' in m])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
