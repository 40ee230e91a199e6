"""Recovering from failures: retrying a call, restarting a long-lived task.

:func:`retry` calls an async function again, after a backoff, when it fails
with an exception its :class:`RetryPolicy` deems transient (a dropped
connection, a rate limit), and honours a server's ``Retry-After``.
:func:`supervise` keeps a long-lived task (a listener, a forwarder) running,
restarting it after a crash with a backoff, and gives up with
:class:`SupervisorGaveUp` when it crashes too often within a
:class:`RestartPolicy`'s window.

Both measure and sleep on Trio's clock, so tests under
:class:`trio.testing.MockClock` see exact delays. Neither ever catches
:class:`trio.Cancelled`, :class:`KeyboardInterrupt`, :class:`SystemExit`,
:class:`GeneratorExit` or an exception group holding any of them: only
:class:`Exception` instances are retried or count as crashes, so cancelling
the caller stops the work at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import trio

from trioflow.protocol import error_info

__all__ = [
    "Crash",
    "Emitter",
    "RestartPolicy",
    "RetryAttempt",
    "RetryPolicy",
    "SupervisorGaveUp",
    "retry",
    "supervise",
]

T = TypeVar("T")
_A = TypeVar("_A")


class Emitter(Protocol):
    """What :func:`retry` needs of an event bus: an ``emit`` coroutine.

    :class:`trioflow.EventBus` is one; so is any object with a matching
    ``emit`` (tests use a small recorder).
    """

    async def emit(
        self,
        type: str,
        data: Mapping[str, Any] | None = None,
        /,
        *,
        run_id: str | None = None,
    ) -> object:
        """Emit one event of ``type`` with ``data``, tagged with ``run_id``."""


def _check_non_negative(what: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, not {value!r}")


def _check_multiplier(value: float) -> None:
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"multiplier must be a finite number >= 1, not {value!r}")


def _check_int(what: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, not {value}")


def _backoff(n: int, base_delay: float, multiplier: float, max_delay: float) -> float:
    """``min(max_delay, base_delay * multiplier ** (n - 1))``, safe for any ``n >= 1``."""
    _check_int("retry/restart number", n, 1)
    if base_delay == 0:
        return 0.0
    try:
        delay = base_delay * float(multiplier) ** (n - 1)
    except OverflowError:
        return max_delay
    return min(max_delay, delay)


async def _notify(callback: Callable[[_A], Awaitable[None] | None] | None, arg: _A) -> None:
    """Call a sync or async callback, awaiting its result if it is awaitable."""
    if callback is None:
        return
    result = callback(arg)
    if inspect.isawaitable(result):
        await result


# -- retry --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How :func:`retry` retries: how often, after which delays, on which errors.

    The delay before retry ``n`` (1-based) is ``min(max_delay, base_delay *
    multiplier ** (n - 1))``, multiplied by a random factor in ``[1 - jitter,
    1 + jitter]`` and clamped to ``[0, max_delay]``. With the defaults the
    delays are about 0.5 s and 1 s, for three attempts in all.

    Raises:
        TypeError: ``attempts`` is not an int, or ``retry_on`` is neither a
            tuple of exception classes (a single class is accepted too) nor a
            callable.
        ValueError: ``attempts`` < 1, a delay is negative or not finite,
            ``multiplier`` < 1, ``jitter`` is outside ``[0, 1]``, or
            ``max_retry_after`` is negative or NaN.
    """

    attempts: int = 3
    """Attempts in all, the first included (1 means no retry)."""
    base_delay: float = 0.5
    """Seconds before the first retry (before jitter)."""
    max_delay: float = 30.0
    """The longest delay, jitter included."""
    multiplier: float = 2.0
    """Growth of the delay from one retry to the next."""
    jitter: float = 0.1
    """Relative spread of the delay: 0.1 means +/-10%; 0 means exact delays."""
    retry_on: tuple[type[BaseException], ...] | Callable[[BaseException], bool] = (Exception,)
    """The exception classes to retry, or a predicate that says whether to retry an exception.

    With classes, an :class:`ExceptionGroup` is retried when it is an instance
    of one of them or when every exception in it is (a strict nursery inside
    the retried function wraps even a single error in a group).
    """
    max_retry_after: float = 60.0
    """The longest server hint (``Retry-After``) honoured, in seconds; ``math.inf`` for no cap.

    A hint longer than the policy's delay replaces it, even beyond
    ``max_delay``; a hint longer than ``max_retry_after`` ends the retries
    instead: the failure is raised at once, without sleeping (a server that
    asks for an hour is not waited for with a task blocked for an hour).
    """

    def __post_init__(self) -> None:
        _check_int("attempts", self.attempts, 1)
        _check_non_negative("base_delay", self.base_delay)
        _check_non_negative("max_delay", self.max_delay)
        _check_multiplier(self.multiplier)
        if not (0 <= self.jitter <= 1):
            raise ValueError(f"jitter must be between 0 and 1, not {self.jitter!r}")
        if not self.max_retry_after >= 0:  # also rejects NaN
            raise ValueError(
                f"max_retry_after must be a number >= 0 (math.inf for no cap), "
                f"not {self.max_retry_after!r}"
            )
        retry_on: object = self.retry_on
        if isinstance(retry_on, type) and issubclass(retry_on, BaseException):
            # A lone class is callable too; never mistake it for a predicate.
            object.__setattr__(self, "retry_on", (retry_on,))
        elif isinstance(retry_on, tuple):
            for item in retry_on:
                if not (isinstance(item, type) and issubclass(item, BaseException)):
                    raise TypeError(f"retry_on must hold exception classes, not {item!r}")
        elif not callable(retry_on):
            raise TypeError(
                "retry_on must be a tuple of exception classes or a predicate, "
                f"not {type(retry_on).__name__}"
            )

    def delay(self, retry: int) -> float:
        """The delay in seconds before retry number ``retry`` (1-based), without jitter.

        Raises:
            ValueError: ``retry`` < 1.
            TypeError: ``retry`` is not an int.
        """
        return _backoff(retry, self.base_delay, self.multiplier, self.max_delay)

    def next_delay(self, retry: int, *, rng: random.Random | None = None) -> float:
        """The delay before retry number ``retry`` with jitter applied, within ``[0, max_delay]``.

        Args:
            retry: The retry number, 1-based.
            rng: The random source for the jitter; the :mod:`random` module's
                shared one by default.

        Raises:
            ValueError: ``retry`` < 1.
            TypeError: ``retry`` is not an int.
        """
        delay = self.delay(retry)
        if self.jitter:
            uniform = random.uniform if rng is None else rng.uniform
            delay *= uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.max_delay, max(0.0, delay))

    def should_retry(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another attempt under this policy.

        Never true for an exception that is not an :class:`Exception`:
        :class:`trio.Cancelled`, :class:`KeyboardInterrupt`,
        :class:`SystemExit`, :class:`GeneratorExit`, or a
        :class:`BaseExceptionGroup` holding any of them (Python only lets a
        group that holds nothing but :class:`Exception` instances be an
        :class:`Exception`), whatever ``retry_on`` says.
        """
        if not isinstance(exc, Exception):
            return False
        retry_on = self.retry_on
        if not isinstance(retry_on, tuple):
            return bool(retry_on(exc))
        if isinstance(exc, retry_on):
            return True
        if isinstance(exc, ExceptionGroup):
            _, rest = exc.split(lambda e: isinstance(e, retry_on))
            return rest is None
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class RetryAttempt:
    """A failed attempt that :func:`retry` is about to retry, as passed to ``on_retry``."""

    attempt: int
    """The number (1-based) of the attempt that failed."""
    delay: float
    """The seconds :func:`retry` will sleep before the next attempt."""
    error: BaseException
    """The exception the attempt raised."""


async def retry(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy = RetryPolicy(),
    *,
    on_retry: Callable[[RetryAttempt], Awaitable[None] | None] | None = None,
    bus: Emitter | None = None,
    run_id: str | None = None,
    retry_after: Callable[[BaseException], float | None] | None = None,
) -> T:
    """Call ``fn()`` until it succeeds, retrying transient failures with a backoff.

    When ``fn()`` raises an exception that ``policy.should_retry`` accepts and
    attempts are left, :func:`retry` computes the delay
    (:meth:`RetryPolicy.next_delay`, or the ``retry_after`` hint if that is
    longer), calls ``on_retry``, emits a ``warning`` event on ``bus``, sleeps
    the delay and calls ``fn()`` again. A hint longer than
    ``policy.max_retry_after`` is not waited for: the failure is raised at
    once, as when the attempts run out.

    The ``warning`` event's data is ``{"message", "attempt", "delay",
    "error": {"type", "message"}}``, where ``attempt`` is the number of the
    attempt that failed.

    Args:
        fn: The async function to call, with no arguments (use
            :func:`functools.partial` or a lambda to pass some).
        policy: How often, after which delays and on which errors to retry.
        on_retry: Called with a :class:`RetryAttempt` before each backoff
            sleep; may be a plain function or a coroutine function.
        bus: Where to emit a ``warning`` event before each backoff sleep.
        run_id: The run the ``warning`` events belong to.
        retry_after: Given a failure, returns the seconds the server asked to
            wait (its ``Retry-After``), or ``None``. A hint longer than the
            policy's delay replaces it, even beyond ``policy.max_delay``, up
            to ``policy.max_retry_after``; a longer one ends the retries
            (the failure is raised without sleeping); negative, NaN and
            infinite hints are ignored.

    Returns:
        What the first successful call of ``fn()`` returned.

    Raises:
        Exception: The exception of the last attempt, as it was raised (not
            wrapped, and not chained to the earlier failures), when attempts
            run out or its ``retry_after`` hint exceeds
            ``policy.max_retry_after``; at once, an exception the policy
            does not retry.
            Exceptions from ``on_retry``, ``bus.emit`` or ``retry_after``
            propagate too.

    Cancellation:
        :class:`trio.Cancelled` is never retried: cancelled during ``fn()``,
        ``fn()`` is cancelled and no other attempt is made; cancelled during
        the backoff, the sleep ends and no other attempt is made.
    """
    attempt = 1
    while True:
        try:
            return await fn()
        except Exception as exc:
            if attempt >= policy.attempts or not policy.should_retry(exc):
                raise
            error = exc
        # Outside the except clause from here on, so that the next attempt's
        # exception does not get this one as its __context__.
        delay = policy.next_delay(attempt)
        if retry_after is not None:
            hint = retry_after(error)
            if hint is not None and math.isfinite(hint) and hint >= 0:
                if hint > policy.max_retry_after:
                    raise error
                delay = max(delay, hint)
        await _notify(on_retry, RetryAttempt(attempt, delay, error))
        if bus is not None:
            kind = type(error).__name__
            await bus.emit(
                "warning",
                {
                    "message": (
                        f"attempt {attempt} of {policy.attempts} failed with {kind}: {error}; "
                        f"retrying in {delay:.2f} s"
                    ),
                    "attempt": attempt,
                    "delay": delay,
                    "error": error_info(error),
                },
                run_id=run_id,
            )
        del error
        await trio.sleep(delay)
        attempt += 1


# -- supervise ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How :func:`supervise` restarts a crashed task, and when it gives up.

    The supervisor counts the crashes of the last ``window`` seconds (a crash
    exactly ``window`` seconds old no longer counts). While that count ``n``
    is at most ``max_restarts`` it restarts the task after
    :meth:`delay` ``(n)``; beyond, it gives up. So crashes that are far
    enough apart are restarted forever, each after ``base_delay``.

    Raises:
        TypeError: ``max_restarts`` is not an int.
        ValueError: ``max_restarts`` < 0, ``window`` is not > 0 (``math.inf``
            is allowed: count every crash), a delay is negative or not
            finite, or ``multiplier`` < 1.
    """

    max_restarts: int = 5
    """Restarts allowed within ``window``; one crash more and the supervisor gives up."""
    window: float = 60.0
    """The span, in seconds on Trio's clock, over which crashes are counted."""
    base_delay: float = 0.1
    """Seconds before the first restart within the window."""
    max_delay: float = 5.0
    """The longest delay before a restart."""
    multiplier: float = 2.0
    """Growth of the delay from one restart within the window to the next."""

    def __post_init__(self) -> None:
        _check_int("max_restarts", self.max_restarts, 0)
        if not self.window > 0:
            raise ValueError(f"window must be > 0 seconds, not {self.window!r}")
        _check_non_negative("base_delay", self.base_delay)
        _check_non_negative("max_delay", self.max_delay)
        _check_multiplier(self.multiplier)

    def delay(self, restart: int) -> float:
        """Seconds to wait before restart ``restart`` (1-based, counted within the window).

        ``min(max_delay, base_delay * multiplier ** (restart - 1))``.

        Raises:
            ValueError: ``restart`` < 1.
            TypeError: ``restart`` is not an int.
        """
        return _backoff(restart, self.base_delay, self.multiplier, self.max_delay)


class SupervisorGaveUp(Exception):
    """:func:`supervise` stopped restarting a task that crashed too often.

    Its ``__cause__`` is the last crash.

    Attributes:
        name: The supervised task's name.
        restarts: How many times :func:`supervise` had restarted the task in
            all before giving up.
        last_error: The exception of the last crash.
    """

    def __init__(self, name: str, restarts: int, last_error: BaseException) -> None:
        super().__init__(name, restarts, last_error)
        self.name = name
        self.restarts = restarts
        self.last_error = last_error

    def __str__(self) -> str:
        return (
            f"supervised task {self.name!r} crashed too often; gave up after "
            f"{self.restarts} restart(s); last error: "
            f"{type(self.last_error).__name__}: {self.last_error}"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Crash:
    """A crash of a supervised task, as passed to ``on_crash``."""

    name: str
    """The supervised task's name."""
    error: BaseException
    """The exception the task raised."""
    restart: int
    """The number (1-based, counted within the window) of the coming restart; 0 if giving up."""
    delay: float
    """The seconds before the restart; 0.0 if giving up."""
    giving_up: bool
    """True if the supervisor gives up instead of restarting."""


async def supervise(
    fn: Callable[[], Awaitable[None]],
    policy: RestartPolicy = RestartPolicy(),
    *,
    name: str = "task",
    on_crash: Callable[[Crash], Awaitable[None] | None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``fn()`` and restart it whenever it crashes, until it returns or crashes too often.

    A crash is any :class:`Exception` from ``fn()``, an :class:`ExceptionGroup`
    from a nursery inside it included. After a crash the supervisor calls
    ``on_crash``, sleeps :meth:`RestartPolicy.delay` and calls ``fn()`` again;
    when the crashes within ``policy.window`` exceed ``policy.max_restarts``
    it calls ``on_crash`` with ``giving_up=True`` and raises
    :class:`SupervisorGaveUp`.

    Calls ``task_status.started()`` at once, before the first ``fn()``, so
    ``await nursery.start(supervise, fn)`` returns as soon as the supervisor
    runs.

    Args:
        fn: The async function to run, with no arguments.
        policy: When to restart and when to give up.
        name: The task's name, for :class:`Crash` and :class:`SupervisorGaveUp`.
        on_crash: Called with a :class:`Crash` after each crash, before the
            backoff sleep; may be a plain function or a coroutine function.
        task_status: For :meth:`trio.Nursery.start`.

    Returns:
        When ``fn()`` returns normally.

    Raises:
        SupervisorGaveUp: The task crashed more than ``policy.max_restarts``
            times within ``policy.window``; ``__cause__`` is the last crash.
        BaseException: Anything ``fn()`` raises that is not an
            :class:`Exception` (:class:`KeyboardInterrupt`, :class:`SystemExit`,
            a :class:`BaseExceptionGroup` holding one or a
            :class:`trio.Cancelled`) propagates unchanged; so do exceptions
            from ``on_crash``.

    Cancellation:
        Cancelled while ``fn()`` runs, ``fn()`` is cancelled; cancelled during
        the backoff, the sleep ends. Either way :class:`trio.Cancelled`
        propagates and ``fn()`` is not restarted.
    """
    task_status.started()
    recent: deque[float] = deque()  # times of the crashes within the window
    restarts = 0
    while True:
        try:
            await fn()
        except Exception as exc:
            # A BaseExceptionGroup that holds anything but Exceptions (a
            # Cancelled, a KeyboardInterrupt) is not an Exception, so it is
            # never caught here and propagates unchanged.
            error = exc
        else:
            return
        # Outside the except clause, so that nothing gets chained to this crash.
        now = trio.current_time()
        recent.append(now)
        while now - recent[0] >= policy.window:
            recent.popleft()
        count = len(recent)
        if count > policy.max_restarts:
            await _notify(on_crash, Crash(name, error, 0, 0.0, True))
            raise SupervisorGaveUp(name, restarts, error) from error
        delay = policy.delay(count)
        await _notify(on_crash, Crash(name, error, count, delay, False))
        del error
        await trio.sleep(delay)
        restarts += 1
