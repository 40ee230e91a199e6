"""Tests for trioflow.supervise: RetryPolicy, retry, RestartPolicy and supervise.

Time-based tests request pytest-trio's ``autojump_clock`` fixture (a
``MockClock(autojump_threshold=0)``), so every delay is exact and no test
really sleeps.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trioflow.supervise import (
    Crash,
    RestartPolicy,
    RetryAttempt,
    RetryPolicy,
    SupervisorGaveUp,
    retry,
    supervise,
)

EXACT = RetryPolicy(attempts=4, base_delay=0.5, multiplier=2.0, jitter=0.0)


class FakeEmitter:
    """Records what retry() emits, in place of the real event bus."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any], str | None]] = []

    async def emit(
        self, type: str, data: Mapping[str, Any] | None = None, *, run_id: str | None = None
    ) -> None:
        await trio.lowlevel.checkpoint()
        self.events.append((type, dict(data or {}), run_id))


class Flaky:
    """An async callable that raises the given errors in turn, then returns ``result``."""

    def __init__(self, *errors: BaseException, result: object = "ok") -> None:
        self.errors = list(errors)
        self.result = result
        self.times: list[float] = []

    async def __call__(self) -> Any:
        self.times.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return self.result

    @property
    def calls(self) -> int:
        return len(self.times)


async def capture_cancelled() -> trio.Cancelled:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("not cancelled")


# -- RetryPolicy ----------------------------------------------------------------


def test_retry_policy_delay_grows_geometrically_up_to_max_delay() -> None:
    policy = RetryPolicy(base_delay=0.5, multiplier=2.0, max_delay=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_retry_policy_delay_of_huge_retry_number_is_max_delay() -> None:
    assert RetryPolicy(max_delay=30.0).delay(100_000) == 30.0


def test_retry_policy_delay_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        RetryPolicy().delay(0)


def test_next_delay_without_jitter_is_exact() -> None:
    policy = RetryPolicy(jitter=0.0)
    assert [policy.next_delay(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]


def test_next_delay_is_reproducible_with_a_seeded_rng() -> None:
    policy = RetryPolicy(jitter=0.5)
    first = policy.next_delay(2, rng=random.Random(7))
    assert first == policy.next_delay(2, rng=random.Random(7))


@given(
    retry_number=st.integers(min_value=1, max_value=50),
    base_delay=st.floats(min_value=0, max_value=10),
    multiplier=st.floats(min_value=1, max_value=4),
    max_delay=st.floats(min_value=0, max_value=100),
    jitter=st.floats(min_value=0, max_value=1),
    seed=st.integers(),
)
def test_next_delay_jitter_stays_within_bounds(
    retry_number: int,
    base_delay: float,
    multiplier: float,
    max_delay: float,
    jitter: float,
    seed: int,
) -> None:
    policy = RetryPolicy(
        base_delay=base_delay, multiplier=multiplier, max_delay=max_delay, jitter=jitter
    )
    nominal = policy.delay(retry_number)
    delay = policy.next_delay(retry_number, rng=random.Random(seed))
    assert 0.0 <= delay <= max_delay
    assert nominal * (1 - jitter) * (1 - 1e-12) <= delay <= nominal * (1 + jitter) * (1 + 1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"base_delay": -1.0},
        {"max_delay": math.inf},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"jitter": -0.1},
    ],
)
def test_retry_policy_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_retry_policy_rejects_retry_on_that_is_not_exception_classes() -> None:
    with pytest.raises(TypeError, match="retry_on"):
        RetryPolicy(retry_on=(ValueError, "nope"))  # type: ignore[arg-type]


def test_retry_policy_accepts_a_single_exception_class() -> None:
    policy = RetryPolicy(retry_on=ValueError)  # type: ignore[arg-type]
    assert policy.retry_on == (ValueError,)
    assert policy.should_retry(ValueError())
    assert not policy.should_retry(KeyError())


def test_should_retry_matches_exception_classes() -> None:
    policy = RetryPolicy(retry_on=(ConnectionError, TimeoutError))
    assert policy.should_retry(ConnectionResetError())
    assert policy.should_retry(TimeoutError())
    assert not policy.should_retry(ValueError())


def test_should_retry_uses_a_predicate() -> None:
    policy = RetryPolicy(retry_on=lambda exc: "429" in str(exc))
    assert policy.should_retry(RuntimeError("HTTP 429"))
    assert not policy.should_retry(RuntimeError("HTTP 400"))


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1), GeneratorExit()])
def test_should_retry_never_accepts_base_exceptions(exc: BaseException) -> None:
    assert not RetryPolicy(retry_on=(BaseException,)).should_retry(exc)
    assert not RetryPolicy(retry_on=lambda e: True).should_retry(exc)


async def test_should_retry_never_accepts_cancelled() -> None:
    cancelled = await capture_cancelled()
    assert not RetryPolicy(retry_on=(BaseException,)).should_retry(cancelled)
    group = BaseExceptionGroup("mixed", [ValueError(), cancelled])
    assert not RetryPolicy(retry_on=lambda e: True).should_retry(group)


def test_should_retry_accepts_group_whose_errors_all_match() -> None:
    policy = RetryPolicy(retry_on=(ConnectionError,))
    assert policy.should_retry(ExceptionGroup("g", [ConnectionResetError(), ConnectionError()]))
    assert not policy.should_retry(ExceptionGroup("g", [ConnectionError(), ValueError()]))


# -- retry ---------------------------------------------------------------------


async def test_retry_returns_the_result_of_the_first_success() -> None:
    fn = Flaky(result=42)
    assert await retry(fn, EXACT) == 42
    assert fn.calls == 1


async def test_retry_sleeps_exact_backoff_between_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(ValueError(), ValueError(), ValueError())
    assert await retry(fn, EXACT) == "ok"
    assert fn.times == [0.0, 0.5, 1.5, 3.5]


async def test_retry_raises_the_last_exception_unwrapped_and_unchained(
    autojump_clock: trio.testing.MockClock,
) -> None:
    last = ValueError("third")
    fn = Flaky(ValueError("first"), ValueError("second"), last)
    with pytest.raises(ValueError, match="third") as info:
        await retry(fn, RetryPolicy(attempts=3, jitter=0.0))
    assert info.value is last
    assert last.__context__ is None
    assert last.__cause__ is None
    assert fn.calls == 3


async def test_retry_with_one_attempt_does_not_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(ValueError())
    with pytest.raises(ValueError):
        await retry(fn, RetryPolicy(attempts=1))
    assert fn.calls == 1


async def test_retry_non_retryable_exception_propagates_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(KeyError("bad input"))
    with pytest.raises(KeyError):
        await retry(fn, RetryPolicy(retry_on=(ConnectionError,)))
    assert fn.calls == 1
    assert trio.current_time() == 0.0


async def test_retry_retries_exception_group_from_inner_nursery(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Flaky(ConnectionError()))
        return "ok"

    assert await retry(fn, RetryPolicy(retry_on=(ConnectionError,), jitter=0.0)) == "ok"
    assert calls == 2


async def test_retry_after_longer_than_backoff_is_honoured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(ConnectionError())
    await retry(fn, RetryPolicy(jitter=0.0, max_delay=1.0), retry_after=lambda exc: 10.0)
    assert fn.times == [0.0, 10.0]


async def test_retry_after_shorter_than_backoff_keeps_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(ConnectionError())
    await retry(fn, EXACT, retry_after=lambda exc: 0.1)
    assert fn.times == [0.0, 0.5]


async def test_retry_after_longer_than_max_retry_after_raises_at_once_without_sleeping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    error = ConnectionError("come back in an hour")
    fn = Flaky(error)
    retried: list[RetryAttempt] = []
    policy = RetryPolicy(jitter=0.0, max_retry_after=60.0)
    with pytest.raises(ConnectionError) as info:
        await retry(fn, policy, retry_after=lambda exc: 3600.0, on_retry=retried.append)
    assert info.value is error
    assert fn.calls == 1
    assert retried == []
    assert trio.current_time() == 0.0


async def test_retry_after_up_to_max_retry_after_is_honoured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(ConnectionError())
    await retry(fn, RetryPolicy(jitter=0.0, max_retry_after=60.0), retry_after=lambda exc: 60.0)
    assert fn.times == [0.0, 60.0]


@pytest.mark.parametrize("cap", [-1.0, math.nan])
def test_bad_max_retry_after_raises_value_error(cap: float) -> None:
    with pytest.raises(ValueError, match="max_retry_after"):
        RetryPolicy(max_retry_after=cap)


@pytest.mark.parametrize("hint", [None, -5.0, math.nan, math.inf])
async def test_retry_after_ignores_missing_and_meaningless_hints(
    autojump_clock: trio.testing.MockClock, hint: float | None
) -> None:
    fn = Flaky(ConnectionError())
    await retry(fn, EXACT, retry_after=lambda exc: hint)
    assert fn.times == [0.0, 0.5]


async def test_retry_cancelled_during_backoff_makes_no_other_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(ValueError(), ValueError())
    with trio.move_on_after(1.0) as scope:
        await retry(fn, RetryPolicy(base_delay=5.0, jitter=0.0))
    assert scope.cancelled_caught
    assert fn.calls == 1
    assert trio.current_time() == 1.0


async def test_retry_calls_sync_on_retry_with_each_failed_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first, second = ValueError("a"), ValueError("b")
    seen: list[RetryAttempt] = []
    await retry(Flaky(first, second), EXACT, on_retry=seen.append)
    assert seen == [RetryAttempt(1, 0.5, first), RetryAttempt(2, 1.0, second)]


async def test_retry_awaits_async_on_retry_before_sleeping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[tuple[int, float]] = []

    async def on_retry(attempt: RetryAttempt) -> None:
        await trio.lowlevel.checkpoint()
        seen.append((attempt.attempt, trio.current_time()))

    await retry(Flaky(ValueError(), ValueError()), EXACT, on_retry=on_retry)
    assert seen == [(1, 0.0), (2, 0.5)]


async def test_retry_emits_a_warning_event_per_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = FakeEmitter()
    await retry(Flaky(TimeoutError("slow")), EXACT, bus=bus, run_id="run-1")
    assert len(bus.events) == 1
    type_, data, run_id = bus.events[0]
    assert type_ == "warning"
    assert run_id == "run-1"
    assert set(data) == {"message", "attempt", "delay", "error"}
    assert data["attempt"] == 1
    assert data["delay"] == 0.5
    assert data["error"] == {"type": "TimeoutError", "message": "slow"}
    assert "TimeoutError" in data["message"]


async def test_retry_emits_nothing_when_the_first_attempt_succeeds() -> None:
    bus = FakeEmitter()
    await retry(Flaky(), EXACT, bus=bus)
    assert bus.events == []


# -- RestartPolicy ----------------------------------------------------------------


def test_restart_policy_delay_grows_up_to_max_delay() -> None:
    policy = RestartPolicy(base_delay=0.1, multiplier=2.0, max_delay=0.5)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_restarts": -1}, {"window": 0.0}, {"window": math.nan}, {"base_delay": -0.1}],
)
def test_restart_policy_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**kwargs)


# -- supervise -----------------------------------------------------------------

STEADY = RestartPolicy(max_restarts=3, window=100.0, base_delay=1.0, max_delay=10.0)


async def test_supervise_returns_when_fn_returns() -> None:
    fn = Flaky()
    await supervise(fn, STEADY)
    assert fn.calls == 1


async def test_supervise_restarts_with_exact_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(ValueError(), ValueError(), ValueError())
    await supervise(fn, STEADY)
    assert fn.times == [0.0, 1.0, 3.0, 7.0]


async def test_supervise_reports_each_crash_to_on_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first, second = ValueError("a"), OSError("b")
    crashes: list[Crash] = []
    await supervise(Flaky(first, second), STEADY, name="listener", on_crash=crashes.append)
    assert crashes == [
        Crash("listener", first, 1, 1.0, False),
        Crash("listener", second, 2, 2.0, False),
    ]


async def test_supervise_awaits_async_on_crash(autojump_clock: trio.testing.MockClock) -> None:
    seen: list[int] = []

    async def on_crash(crash: Crash) -> None:
        await trio.lowlevel.checkpoint()
        seen.append(crash.restart)

    await supervise(Flaky(ValueError()), STEADY, on_crash=on_crash)
    assert seen == [1]


async def test_supervise_gives_up_after_max_restarts_within_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors = [ValueError(str(n)) for n in range(4)]
    fn = Flaky(*errors)
    with pytest.raises(SupervisorGaveUp) as info:
        await supervise(fn, STEADY, name="listener")
    assert fn.calls == 4
    assert info.value.__cause__ is errors[-1]
    assert info.value.last_error is errors[-1]
    assert info.value.restarts == 3
    assert info.value.name == "listener"
    assert "listener" in str(info.value)


async def test_supervise_reports_giving_up_to_on_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    error = ValueError("boom")
    crashes: list[Crash] = []
    with pytest.raises(SupervisorGaveUp):
        await supervise(Flaky(error), RestartPolicy(max_restarts=0), on_crash=crashes.append)
    assert crashes == [Crash("task", error, 0, 0.0, True)]


async def test_supervise_does_not_give_up_on_crashes_spread_beyond_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            await trio.sleep(20)  # longer than the window
            raise ValueError(calls)

    crashes: list[Crash] = []
    policy = RestartPolicy(max_restarts=1, window=10.0, base_delay=1.0)
    await supervise(fn, policy, on_crash=crashes.append)
    assert calls == 6
    assert [crash.restart for crash in crashes] == [1, 1, 1, 1, 1]


async def test_supervise_crash_exactly_window_old_no_longer_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError
        if calls == 2:
            await trio.sleep(9.0)  # crashes at 10.0: the first crash is 10 s old
            raise ValueError

    await supervise(fn, RestartPolicy(max_restarts=1, window=10.0, base_delay=1.0))
    assert calls == 3


async def test_supervise_crash_is_not_chained_to_the_previous_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    crashes: list[Crash] = []
    await supervise(Flaky(ValueError(), ValueError()), STEADY, on_crash=crashes.append)
    assert crashes[1].error.__context__ is None


@pytest.mark.parametrize(
    "keep_calling",
    [
        pytest.param(lambda fn: retry(fn, EXACT), id="retry"),
        pytest.param(lambda fn: supervise(fn, STEADY), id="supervise"),
    ],
)
async def test_a_call_cancelled_while_running_is_not_made_again(
    autojump_clock: trio.testing.MockClock,
    keep_calling: Callable[[Callable[[], Awaitable[None]]], Awaitable[Any]],
) -> None:
    """Neither ``retry`` nor ``supervise`` swallows the cancellation of a running call."""
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()

    with trio.move_on_after(5.0) as scope:
        await keep_calling(fn)
    assert scope.cancelled_caught
    assert calls == 1


async def test_supervise_cancelled_during_backoff_does_not_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(ValueError())
    with trio.move_on_after(0.5) as scope:
        await supervise(fn, STEADY)
    assert scope.cancelled_caught
    assert fn.calls == 1


async def test_supervise_propagates_keyboard_interrupt_without_restart() -> None:
    fn = Flaky(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        await supervise(fn, STEADY)
    assert fn.calls == 1


async def test_supervise_propagates_group_holding_a_base_exception_unchanged() -> None:
    group = BaseExceptionGroup("mixed", [ValueError(), SystemExit(1)])
    fn = Flaky(group)
    with pytest.raises(BaseExceptionGroup) as info:
        await supervise(fn, STEADY)
    assert info.value is group
    assert fn.calls == 1


async def test_supervise_counts_exception_group_from_inner_nursery_as_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Flaky(ValueError("child")))

    crashes: list[Crash] = []
    await supervise(fn, STEADY, on_crash=crashes.append)
    assert calls == 2
    assert isinstance(crashes[0].error, ExceptionGroup)


async def test_supervise_reports_started_to_nursery_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()
    finished = trio.Event()

    async def fn() -> None:
        await release.wait()
        finished.set()

    async with trio.open_nursery() as nursery:
        assert await nursery.start(supervise, fn) is None
        assert not finished.is_set()
        release.set()
    assert finished.is_set()
