"""Progress of a run: :class:`FlowProgress` and :func:`format_duration`.

A :class:`FlowProgress` counts the completed iterations of a run out of a
total, times named steps, estimates the time remaining from the pace so far
and, given the run's deadline, reports how much of its time budget is left.
:meth:`FlowProgress.to_dict` gives the figures ready to send as a
``progress.update`` event.

All times come from Trio's clock (:func:`trio.current_time`), so tests that
run under :class:`trio.testing.MockClock` see exact figures. A
:class:`FlowProgress` can be built anywhere, but every method or property that
reads the clock needs a running Trio run; outside one, Trio raises
:class:`RuntimeError`. Those that read it say so.

A :class:`FlowProgress` is a plain object with no locks: share it only between
tasks of one Trio run (which never run at the same time).
"""

from __future__ import annotations

import math
from typing import Any

import trio

__all__ = ["FlowProgress", "format_duration"]

# Absorbs float error in differences of clock readings (60.9 - 1.0 is
# 59.89999...), so truncation does not lose a whole unit.
_EPSILON = 1e-9


def format_duration(seconds: float) -> str:
    """Format a duration for people, truncated like a stopwatch.

    Under one second: whole milliseconds (``"250 ms"``, at most ``"999 ms"``).
    Under a minute: seconds with one decimal (``"1.0 s"``, at most ``"59.9 s"``).
    From a minute on: minutes and whole seconds (``"1m 0s"``, ``"2m 5s"``,
    ``"75m 3s"``). Truncating rather than rounding means a value never shows
    the next unit's boundary early (59.97 s is ``"59.9 s"``, not ``"60.0 s"``).

    Args:
        seconds: The duration, finite and not negative.

    Returns:
        The formatted duration.

    Raises:
        ValueError: ``seconds`` is negative, NaN or infinite.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be a finite number >= 0, not {seconds!r}")
    if seconds < 1.0:
        return f"{min(999, math.floor(seconds * 1000 + _EPSILON))} ms"
    if seconds < 60.0:
        tenths = min(599, math.floor(seconds * 10 + _EPSILON))
        return f"{tenths // 10}.{tenths % 10} s"
    whole = math.floor(seconds + _EPSILON)
    return f"{whole // 60}m {whole % 60}s"


def _check_count(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, not {value}")
    return value


def _check_step_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"step name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("step name must not be empty")
    return name


class FlowProgress:
    """The progress of one run: iterations, steps, elapsed time, ETA and budget.

    :attr:`current_iteration` counts *completed* iterations: it starts at 0 and
    :meth:`complete_iteration` advances it. Percent and the time estimate
    derive from it and :attr:`total_iterations`. Going past the total is
    allowed (an agent may need an extra turn): the percent stays at 100.

    In a run, the total starts as the iteration budget (``max_iterations``).
    When the agent answers, it sets the total to the iterations it took
    (:meth:`set_total`), so a completed run reads 100 % whatever its budget
    (a 2-iteration run with a budget of 10 ends at 2/2, not 2/10 = 20 %).
    A run that fails or is cancelled keeps the budget as its total and
    reads the share it reached: it did not finish its work.

    Steps are named phases (``"model"``, ``"tools"``, ...) timed between
    :meth:`start_step` and :meth:`complete_step`. Several steps may be open
    at once; :attr:`current_step` is the most recently started open one. A
    name may be used again once its previous occurrence completed: it then
    appears in :attr:`completed_steps` once per occurrence, and
    :attr:`step_durations` holds the total time spent in it.

    Example::

        progress = FlowProgress(5, deadline=trio.current_time() + 60)
        progress.start()
        progress.start_step("model")
        ...
        progress.complete_step()
        progress.complete_iteration()
        await bus.emit("progress.update", progress.to_dict())

    Args:
        total_iterations: The number of iterations the run may take.
        deadline: When the run's time budget ends, as an absolute
            :func:`trio.current_time` value (for example a cancel scope's
            ``deadline``). ``None`` or ``math.inf`` mean no deadline.

    Raises:
        TypeError: ``total_iterations`` is not an int.
        ValueError: ``total_iterations`` is negative, or ``deadline`` is NaN.
    """

    __slots__ = (
        "_completed_steps",
        "_current",
        "_deadline",
        "_ended_at",
        "_open_steps",
        "_started_at",
        "_step_durations",
        "_total",
    )

    def __init__(self, total_iterations: int, *, deadline: float | None = None) -> None:
        self._total = _check_count("total_iterations", total_iterations)
        if deadline is not None and math.isnan(deadline):
            raise ValueError("deadline must be a number, not NaN")
        self._deadline = None if deadline is None or deadline == math.inf else float(deadline)
        self._current = 0
        self._started_at: float | None = None
        self._ended_at: float | None = None
        self._open_steps: dict[str, float] = {}
        self._completed_steps: list[str] = []
        self._step_durations: dict[str, float] = {}

    def __repr__(self) -> str:
        state = "complete" if self.is_complete else "started" if self.is_started else "not started"
        return (
            f"<FlowProgress {self._current}/{self._total} iterations, {state}, "
            f"current_step={self.current_step!r}>"
        )

    # -- changing the state -------------------------------------------------

    def start(self) -> None:
        """Record the start time, once; later calls do nothing.

        Raises:
            RuntimeError: Not inside a Trio run (on the first call).
        """
        if self._started_at is None:
            self._started_at = trio.current_time()

    def complete_iteration(self, iteration: int | None = None) -> None:
        """Record that an iteration has completed, starting the run if needed.

        Args:
            iteration: The number (1-based) of the iteration that completed,
                which becomes :attr:`current_iteration`; ``None`` (the
                default) advances it by one.

        Raises:
            TypeError: ``iteration`` is not an int.
            ValueError: ``iteration`` is negative.
            RuntimeError: The run had not started and this is not inside a
                Trio run.
        """
        if iteration is None:
            iteration = self._current + 1
        iteration = _check_count("iteration", iteration)
        self.start()
        self._current = iteration

    def set_total(self, total_iterations: int) -> None:
        """Change :attr:`total_iterations` (percent and estimate follow).

        Raises:
            TypeError: ``total_iterations`` is not an int.
            ValueError: ``total_iterations`` is negative.
        """
        self._total = _check_count("total_iterations", total_iterations)

    def start_step(self, name: str) -> None:
        """Open the step ``name``, which becomes :attr:`current_step`; start the run if needed.

        Raises:
            TypeError: ``name`` is not a string.
            ValueError: ``name`` is empty, or a step of that name is open already.
            RuntimeError: Not inside a Trio run.
        """
        name = _check_step_name(name)
        if name in self._open_steps:
            raise ValueError(f"step {name!r} is already started")
        self.start()
        self._open_steps[name] = trio.current_time()

    def complete_step(self, name: str | None = None) -> float:
        """Close an open step and record its duration.

        Args:
            name: The step to close; ``None`` (the default) closes
                :attr:`current_step`.

        Returns:
            How long this occurrence of the step took, in seconds.

        Raises:
            TypeError: ``name`` is neither a string nor ``None``.
            ValueError: No step of that name is open (never started, or
                completed already), or ``name`` is ``None`` and no step is open.
            RuntimeError: Not inside a Trio run.
        """
        if name is None:
            if not self._open_steps:
                raise ValueError("no step is in progress")
            name = next(reversed(self._open_steps))
        else:
            name = _check_step_name(name)
            if name not in self._open_steps:
                raise ValueError(f"step {name!r} is not in progress")
        elapsed = trio.current_time() - self._open_steps.pop(name)
        self._completed_steps.append(name)
        self._step_durations[name] = self._step_durations.get(name, 0.0) + elapsed
        return elapsed

    def complete(self) -> None:
        """Mark the run complete and freeze :attr:`duration` and :attr:`remaining_budget`.

        Starts the run first if it had not started (its duration is then 0).
        Later calls do nothing. Open steps stay open.

        Raises:
            RuntimeError: Not inside a Trio run (on the first call).
        """
        if self._ended_at is None:
            now = trio.current_time()
            if self._started_at is None:
                self._started_at = now
            self._ended_at = now

    # -- reading the state --------------------------------------------------

    @property
    def total_iterations(self) -> int:
        """The number of iterations the run may take (see :meth:`set_total`)."""
        return self._total

    @property
    def current_iteration(self) -> int:
        """The number of iterations completed so far (0 at first)."""
        return self._current

    @property
    def deadline(self) -> float | None:
        """The end of the time budget on Trio's clock, or ``None`` for no deadline."""
        return self._deadline

    @property
    def is_started(self) -> bool:
        """True once :meth:`start` (or anything that starts the run) was called."""
        return self._started_at is not None

    @property
    def is_complete(self) -> bool:
        """True once :meth:`complete` was called."""
        return self._ended_at is not None

    @property
    def percent(self) -> float:
        """Completed iterations as a percentage of the total, from 0.0 to 100.0.

        100.0 when the total is 0; never more than 100.0 when the run went
        past its total.
        """
        return _percent(self._current, self._total)

    @property
    def duration(self) -> float:
        """Seconds since the start: 0.0 before it, frozen by :meth:`complete`.

        Raises:
            RuntimeError: Started, not complete, and not inside a Trio run.
        """
        return self._duration(self._now())

    @property
    def formatted_duration(self) -> str:
        """:attr:`duration` as :func:`format_duration` shows it (``"1.2 s"``).

        Raises:
            RuntimeError: As :attr:`duration`.
        """
        return format_duration(self.duration)

    @property
    def estimated_remaining(self) -> float | None:
        """Estimated seconds until the last iteration completes, from the pace so far.

        ``None`` until an iteration has completed; then the mean time per
        completed iteration times the iterations left. 0.0 once the run is
        complete or past its total.

        Raises:
            RuntimeError: As :attr:`duration`.
        """
        return self._estimated_remaining(self._duration(self._now()))

    @property
    def remaining_budget(self) -> float | None:
        """Seconds left until :attr:`deadline`, never negative; ``None`` without one.

        Frozen by :meth:`complete`, so a finished run reports the budget it
        had left when it finished.

        Raises:
            RuntimeError: A deadline is set, the run is not complete, and this
                is not inside a Trio run.
        """
        return self._remaining_budget(self._now())

    @property
    def current_step(self) -> str | None:
        """The most recently started step still open, or ``None``."""
        return next(reversed(self._open_steps), None)

    @property
    def completed_steps(self) -> tuple[str, ...]:
        """The names of the completed steps, in completion order, one per occurrence."""
        return tuple(self._completed_steps)

    @property
    def step_durations(self) -> dict[str, float]:
        """Total seconds spent in each completed step, by name (a fresh copy)."""
        return dict(self._step_durations)

    # -- reporting ----------------------------------------------------------

    def summary(self) -> str:
        """A one-line summary for people.

        For example ``"Iteration 2/5 (40.0%) [tools] - 1.2 s elapsed, ~1.8 s
        remaining, 57.3 s budget left"``; the step, the estimate and the
        budget appear only when known, and a finished run ends with
        ``", complete"`` instead.

        Raises:
            RuntimeError: As :meth:`to_dict`.
        """
        now = self._now()
        duration = self._duration(now)
        text = f"Iteration {self._current}/{self._total} ({self.percent:.1f}%)"
        step = self.current_step
        if step is not None:
            text += f" [{step}]"
        text += f" - {format_duration(duration)} elapsed"
        if self.is_complete:
            return text + ", complete"
        remaining = self._estimated_remaining(duration)
        if remaining is not None:
            text += f", ~{format_duration(remaining)} remaining"
        budget = self._remaining_budget(now)
        if budget is not None:
            text += f", {format_duration(budget)} budget left"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Every figure, read at one instant, as a JSON-compatible dict.

        The keys of the PHP original: ``current_iteration``,
        ``total_iterations``, ``progress_percent``, ``current_step``,
        ``duration``, ``formatted_duration``, ``estimated_remaining``,
        ``is_complete``, ``is_started`` and ``completed_steps`` (a list), plus
        ``remaining_budget`` and ``step_durations`` (an object of seconds by
        step name). Numbers are finite; unknown figures are ``None``.

        Raises:
            RuntimeError: The clock is needed (the run started and is not
                complete, or a deadline is set) and this is not inside a Trio run.
        """
        now = self._now()
        duration = self._duration(now)
        return {
            "current_iteration": self._current,
            "total_iterations": self._total,
            "progress_percent": self.percent,
            "current_step": self.current_step,
            "duration": duration,
            "formatted_duration": format_duration(duration),
            "estimated_remaining": self._estimated_remaining(duration),
            "is_complete": self.is_complete,
            "is_started": self.is_started,
            "completed_steps": list(self._completed_steps),
            "remaining_budget": self._remaining_budget(now),
            "step_durations": dict(self._step_durations),
        }

    # -- helpers ------------------------------------------------------------

    def _now(self) -> float | None:
        """The instant figures are measured at, reading the clock only if it matters."""
        if self._ended_at is not None:
            return self._ended_at
        if self._started_at is None and self._deadline is None:
            return None
        return trio.current_time()

    def _duration(self, now: float | None) -> float:
        if self._started_at is None or now is None:
            return 0.0
        return max(0.0, now - self._started_at)

    def _estimated_remaining(self, duration: float) -> float | None:
        if self._current == 0:
            return None
        if self.is_complete:
            return 0.0
        return duration / self._current * max(0, self._total - self._current)

    def _remaining_budget(self, now: float | None) -> float | None:
        if self._deadline is None or now is None:
            return None
        return max(0.0, self._deadline - now)


def _percent(current: int, total: int) -> float:
    if total == 0:
        return 100.0
    return min(100.0, max(0.0, current / total * 100.0))
