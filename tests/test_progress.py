"""Tests for trioflow.progress: FlowProgress and format_duration.

Time-based tests request pytest-trio's ``autojump_clock`` fixture (a
``MockClock(autojump_threshold=0)``), so every duration is exact.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trioflow.progress import FlowProgress, format_duration

PHP_KEYS = {
    "current_iteration",
    "total_iterations",
    "progress_percent",
    "current_step",
    "duration",
    "formatted_duration",
    "estimated_remaining",
    "is_complete",
    "is_started",
    "completed_steps",
}

# -- construction and errors ------------------------------------------------


def test_new_progress_is_not_started_and_has_no_iterations() -> None:
    progress = FlowProgress(5)
    assert not progress.is_started
    assert not progress.is_complete
    assert progress.current_iteration == 0
    assert progress.total_iterations == 5
    assert progress.percent == 0.0
    assert progress.duration == 0.0
    assert progress.current_step is None
    assert progress.completed_steps == ()
    assert progress.step_durations == {}


def test_negative_total_raises_ValueError() -> None:
    with pytest.raises(ValueError, match="total_iterations must be >= 0"):
        FlowProgress(-1)


def test_non_int_total_raises_TypeError() -> None:
    with pytest.raises(TypeError, match="total_iterations must be an int"):
        FlowProgress(2.5)  # type: ignore[arg-type]


def test_set_total_negative_raises_ValueError() -> None:
    progress = FlowProgress(5)
    with pytest.raises(ValueError, match="total_iterations"):
        progress.set_total(-3)
    assert progress.total_iterations == 5


def test_nan_deadline_raises_ValueError() -> None:
    with pytest.raises(ValueError, match="NaN"):
        FlowProgress(5, deadline=math.nan)


def test_start_outside_trio_raises_RuntimeError() -> None:
    with pytest.raises(RuntimeError):
        FlowProgress(5).start()


def test_to_dict_before_start_needs_no_trio_run() -> None:
    assert FlowProgress(5).to_dict()["duration"] == 0.0


async def test_negative_iteration_raises_ValueError() -> None:
    progress = FlowProgress(5)
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        progress.complete_iteration(-1)
    assert progress.current_iteration == 0


# -- iterations and percent ----------------------------------------------------


def test_percent_is_100_when_total_is_zero() -> None:
    assert FlowProgress(0).percent == 100.0


async def test_complete_iteration_advances_by_one_and_starts_the_run() -> None:
    progress = FlowProgress(4)
    progress.complete_iteration()
    progress.complete_iteration()
    assert progress.is_started
    assert progress.current_iteration == 2
    assert progress.percent == 50.0


@pytest.mark.parametrize(
    ("total", "percent"),
    [(8, 37.5), (2, 100.0)],
    ids=["sets_current_iteration", "percent_is_clamped_to_100_past_the_total"],
)
async def test_complete_iteration_with_number(total: int, percent: float) -> None:
    progress = FlowProgress(total)
    progress.complete_iteration(3)
    assert progress.current_iteration == 3
    assert progress.percent == percent


async def test_set_total_changes_percent() -> None:
    progress = FlowProgress(10)
    progress.complete_iteration(2)
    progress.set_total(4)
    assert progress.percent == 50.0


# -- duration ---------------------------------------------------------------


async def test_duration_counts_from_start(autojump_clock: trio.testing.MockClock) -> None:
    progress = FlowProgress(5)
    await trio.sleep(3)
    progress.start()
    await trio.sleep(1.5)
    assert progress.duration == 1.5


async def test_start_is_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    progress = FlowProgress(5)
    progress.start()
    await trio.sleep(1)
    progress.start()
    await trio.sleep(1)
    assert progress.duration == 2.0


async def test_complete_freezes_duration(autojump_clock: trio.testing.MockClock) -> None:
    progress = FlowProgress(5)
    progress.start()
    await trio.sleep(2)
    progress.complete()
    await trio.sleep(10)
    assert progress.is_complete
    assert progress.duration == 2.0


async def test_complete_is_idempotent(autojump_clock: trio.testing.MockClock) -> None:
    progress = FlowProgress(5)
    progress.start()
    await trio.sleep(2)
    progress.complete()
    await trio.sleep(3)
    progress.complete()
    assert progress.duration == 2.0


async def test_complete_before_start_starts_with_zero_duration() -> None:
    progress = FlowProgress(5)
    progress.complete()
    assert progress.is_started
    assert progress.is_complete
    assert progress.duration == 0.0


# -- formatted duration -------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, "0 ms"),
        (0.25, "250 ms"),
        (0.999, "999 ms"),
        (0.9999, "999 ms"),
        (1.0, "1.0 s"),
        (1.25, "1.2 s"),
        (59.9, "59.9 s"),
        (59.99, "59.9 s"),
        (60.0, "1m 0s"),
        (125.7, "2m 5s"),
        (3725.0, "62m 5s"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("seconds", [-0.001, math.nan, math.inf])
def test_format_duration_rejects_negative_and_non_finite(seconds: float) -> None:
    with pytest.raises(ValueError, match="duration"):
        format_duration(seconds)


@given(st.floats(min_value=0, max_value=1e7, allow_nan=False))
def test_format_duration_uses_the_unit_of_its_range(seconds: float) -> None:
    text = format_duration(seconds)
    if seconds < 1:
        assert re.fullmatch(r"\d{1,3} ms", text)
    elif seconds < 60:
        assert re.fullmatch(r"\d{1,2}\.\d s", text)
        assert float(text[:-2]) <= seconds + 1e-6
    else:
        match = re.fullmatch(r"(\d+)m (\d{1,2})s", text)
        assert match is not None
        assert int(match[2]) < 60
        assert int(match[1]) == int(seconds + 1e-9) // 60


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(0.999, "999 ms"), (1.0, "1.0 s"), (59.9, "59.9 s"), (60.0, "1m 0s"), (125.0, "2m 5s")],
)
async def test_formatted_duration_follows_the_clock(
    autojump_clock: trio.testing.MockClock, elapsed: float, expected: str
) -> None:
    progress = FlowProgress(5)
    progress.start()
    await trio.sleep(elapsed)
    assert progress.formatted_duration == expected


# -- estimated remaining --------------------------------------------------------


async def test_estimated_remaining_is_None_before_the_first_iteration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5)
    progress.start()
    await trio.sleep(4)
    assert progress.estimated_remaining is None


async def test_estimated_remaining_extrapolates_the_pace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5)
    progress.start()
    await trio.sleep(2)
    progress.complete_iteration()
    await trio.sleep(2)
    progress.complete_iteration()
    assert progress.estimated_remaining == 6.0  # 2 s per iteration, 3 to go


async def test_estimated_remaining_is_zero_past_the_total(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(2)
    progress.start()
    await trio.sleep(1)
    progress.complete_iteration(3)
    assert progress.estimated_remaining == 0.0


async def test_estimated_remaining_is_zero_once_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5)
    progress.start()
    await trio.sleep(1)
    progress.complete_iteration()
    progress.complete()
    assert progress.estimated_remaining == 0.0


# -- steps ---------------------------------------------------------------------


async def test_start_step_sets_current_step() -> None:
    progress = FlowProgress(5)
    progress.start_step("model")
    assert progress.current_step == "model"
    assert progress.is_started


async def test_complete_step_records_duration_and_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5)
    progress.start_step("model")
    await trio.sleep(1.5)
    assert progress.complete_step("model") == 1.5
    progress.start_step("tools")
    await trio.sleep(0.5)
    progress.complete_step("tools")
    assert progress.completed_steps == ("model", "tools")
    assert progress.step_durations == {"model": 1.5, "tools": 0.5}
    assert progress.current_step is None


async def test_complete_step_without_name_closes_the_current_step() -> None:
    progress = FlowProgress(5)
    progress.start_step("outer")
    progress.start_step("inner")
    progress.complete_step()
    assert progress.completed_steps == ("inner",)
    assert progress.current_step == "outer"


async def test_repeated_step_accumulates_its_duration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5)
    for seconds in (1, 2):
        progress.start_step("model")
        await trio.sleep(seconds)
        progress.complete_step("model")
    assert progress.completed_steps == ("model", "model")
    assert progress.step_durations == {"model": 3.0}


async def test_complete_step_never_started_raises_ValueError() -> None:
    progress = FlowProgress(5)
    progress.start_step("model")
    with pytest.raises(ValueError, match="'tools' is not in progress"):
        progress.complete_step("tools")
    assert progress.current_step == "model"


async def test_complete_step_twice_raises_ValueError() -> None:
    progress = FlowProgress(5)
    progress.start_step("model")
    progress.complete_step("model")
    with pytest.raises(ValueError, match="not in progress"):
        progress.complete_step("model")


def test_complete_step_with_no_open_step_raises_ValueError() -> None:
    with pytest.raises(ValueError, match="no step is in progress"):
        FlowProgress(5).complete_step()


async def test_start_step_already_open_raises_ValueError() -> None:
    progress = FlowProgress(5)
    progress.start_step("model")
    with pytest.raises(ValueError, match="already started"):
        progress.start_step("model")


def test_empty_step_name_raises_ValueError() -> None:
    with pytest.raises(ValueError, match="empty"):
        FlowProgress(5).start_step("")


# -- deadline ---------------------------------------------------------------


def test_remaining_budget_is_None_without_deadline() -> None:
    assert FlowProgress(5).remaining_budget is None


async def test_infinite_deadline_means_no_deadline() -> None:
    progress = FlowProgress(5, deadline=math.inf)
    assert progress.deadline is None
    assert progress.remaining_budget is None


async def test_remaining_budget_counts_down_to_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5, deadline=trio.current_time() + 30)
    await trio.sleep(12)
    assert progress.remaining_budget == 18.0


async def test_remaining_budget_is_never_negative(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5, deadline=trio.current_time() + 1)
    await trio.sleep(5)
    assert progress.remaining_budget == 0.0


async def test_remaining_budget_is_frozen_by_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5, deadline=trio.current_time() + 30)
    progress.start()
    await trio.sleep(10)
    progress.complete()
    await trio.sleep(10)
    assert progress.remaining_budget == 20.0


async def test_deadline_from_a_cancel_scope(autojump_clock: trio.testing.MockClock) -> None:
    with trio.move_on_after(45) as scope:
        progress = FlowProgress(5, deadline=scope.deadline)
        await trio.sleep(5)
        assert progress.remaining_budget == 40.0


# -- summary and to_dict ----------------------------------------------------------


async def test_summary_shows_iteration_percent_elapsed_and_estimate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = FlowProgress(5)
    progress.start()
    await trio.sleep(0.6)
    progress.complete_iteration()
    await trio.sleep(0.6)
    progress.complete_iteration()
    assert progress.summary() == "Iteration 2/5 (40.0%) - 1.2 s elapsed, ~1.8 s remaining"


async def test_summary_shows_step_and_budget(autojump_clock: trio.testing.MockClock) -> None:
    progress = FlowProgress(5, deadline=trio.current_time() + 60)
    progress.start_step("tools")
    await trio.sleep(0.25)
    assert progress.summary() == "Iteration 0/5 (0.0%) [tools] - 250 ms elapsed, 59.7 s budget left"


async def test_summary_of_a_complete_run(autojump_clock: trio.testing.MockClock) -> None:
    progress = FlowProgress(3)
    progress.start()
    await trio.sleep(90)
    progress.complete_iteration(3)
    progress.complete()
    assert progress.summary() == "Iteration 3/3 (100.0%) - 1m 30s elapsed, complete"


def test_to_dict_has_the_php_keys_and_extras() -> None:
    keys = set(FlowProgress(5).to_dict())
    assert keys >= PHP_KEYS | {"remaining_budget", "step_durations"}


async def test_to_dict_reports_every_figure(autojump_clock: trio.testing.MockClock) -> None:
    progress = FlowProgress(4, deadline=trio.current_time() + 10)
    progress.start_step("model")
    await trio.sleep(1)
    progress.complete_step()
    progress.complete_iteration()
    progress.start_step("tools")
    assert progress.to_dict() == {
        "current_iteration": 1,
        "total_iterations": 4,
        "progress_percent": 25.0,
        "current_step": "tools",
        "duration": 1.0,
        "formatted_duration": "1.0 s",
        "estimated_remaining": 3.0,
        "is_complete": False,
        "is_started": True,
        "completed_steps": ["model"],
        "remaining_budget": 9.0,
        "step_durations": {"model": 1.0},
    }


async def test_to_dict_is_json_serialisable(autojump_clock: trio.testing.MockClock) -> None:
    progress = FlowProgress(3, deadline=trio.current_time() + 5)
    progress.start_step("model")
    await trio.sleep(0.5)
    progress.complete_step()
    progress.complete_iteration()
    encoded = json.dumps(progress.to_dict(), allow_nan=False)
    assert json.loads(encoded) == progress.to_dict()
