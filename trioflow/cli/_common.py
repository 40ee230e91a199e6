"""What the subcommands of ``trioflow`` share: option types, common options, signals, warnings.

The ``argparse`` types check a value and raise
:exc:`argparse.ArgumentTypeError` with the message ``argparse`` shows after
the option's name. The ``add_*`` functions add an option the way every
subcommand that has it spells it. :func:`watch_signals` turns SIGINT and
SIGTERM into calls, in a nursery next to the work they stop.

This module is light (no web stack, no console), like the parser built from it.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
from collections import Counter
from collections.abc import Callable
from typing import IO

import trio

from trioflow.models import default_model_name
from trioflow.recording import DEFAULT_MAX_GAP, RecordingWarning, WarningHandler
from trioflow.settings import ENVIRONMENT_VARIABLES, Settings

__all__ = [
    "MAX_GAP_HELP",
    "MAX_WARNINGS",
    "TOKEN_ENV",
    "UsageError",
    "add_allow_model_option",
    "add_max_gap_option",
    "add_model_option",
    "add_output_options",
    "add_pace_option",
    "add_timeout_option",
    "at_least_one",
    "non_negative_float",
    "non_negative_int",
    "notify",
    "playback_speed",
    "port",
    "positive_float",
    "print_warnings",
    "seconds",
    "stop_on_signals",
    "watch_signals",
]


TOKEN_ENV = ENVIRONMENT_VARIABLES["token"]
"""The environment variable a server's token is read from when ``--token`` is not given."""


class UsageError(Exception):
    """Bad usage found after parsing: the command reports it like ``argparse`` (exit status 2)."""


# -- argparse types --------------------------------------------------------------------


def positive_float(text: str) -> float:
    """``argparse`` type: a positive, finite number."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def non_negative_float(text: str) -> float:
    """``argparse`` type: a finite number >= 0."""
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, not {text}")
    return value


def at_least_one(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def non_negative_int(text: str) -> int:
    """``argparse`` type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text}")
    return value


def port(text: str) -> int:
    """``argparse`` type: a TCP port, 0 to 65535 (0 picks a free one)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, not {text}")
    return value


def playback_speed(text: str) -> float:
    """``argparse`` type of a replay's ``--speed``: a positive number, ``inf`` for no delays."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'inf', not {text!r}") from None
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(
            f"must be a positive number ('inf' replays without delays), not {text}"
        )
    return value


def seconds(text: str) -> float:
    """``argparse`` type of ``--max-gap``: seconds >= 0, or ``inf`` for no limit."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(
            f"must be a non-negative number of seconds ('inf' for no limit), not {text}"
        )
    return value


# -- common options --------------------------------------------------------------------


def add_model_option(
    parser: argparse.ArgumentParser, settings: Settings, *, env_in_help: bool = True
) -> None:
    """``--model``: 'scripted', 'claude', a Claude model name or 'openai:NAME'; default from ``settings``."""
    where = "$TRIOFLOW_MODEL or " if env_in_help else ""
    parser.add_argument(
        "--model",
        default=settings.model,
        help="'scripted' (offline), 'claude', a Claude model name, or 'openai:NAME' for "
        "model NAME of OpenAI or of the OpenAI-compatible server at $TRIOFLOW_OPENAI_BASE_URL "
        f"(key: $OPENAI_API_KEY); default: {where}{default_model_name()!r} "
        "(Claude when ANTHROPIC_API_KEY is set)",
    )


def add_allow_model_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--allow-model MODEL`` (repeatable, into ``allow_model``): the models a request may name.

    ``trioflow serve`` and ``trioflow worker`` take it alike: a worker runs
    the requests its serve nodes accepted, so both allow the same models.
    """
    parser.add_argument(
        "--allow-model",
        action="append",
        default=[],
        metavar="MODEL",
        help="let a request's 'model' name MODEL (as --model takes it: claude-..., "
        "openai:NAME, scripted); repeatable. Without it every run uses --model",
    )


def add_pace_option(parser: argparse.ArgumentParser) -> None:
    """``--pace``: the scripted model's tokens per second (0 for no delay)."""
    parser.add_argument(
        "--pace",
        type=non_negative_float,
        default=20.0,
        help="the scripted model's tokens per second (default: 20; 0 for no delay)",
    )


def add_timeout_option(
    parser: argparse.ArgumentParser, settings: Settings, *, default: float | None = None
) -> None:
    """``--timeout``: a run's time limit in seconds, by default ``$TRIOFLOW_TIMEOUT``.

    Without ``default`` (one run), the limit is a positive number and none
    unless ``TRIOFLOW_TIMEOUT`` sets one. With ``default`` (the runs of a
    server), that is the limit unless ``TRIOFLOW_TIMEOUT`` sets one, and
    ``--timeout 0`` means none.
    """
    if default is None:
        parser.add_argument(
            "--timeout",
            type=positive_float,
            default=settings.timeout,
            help="time limit in seconds (default: $TRIOFLOW_TIMEOUT or none)",
        )
    else:
        parser.add_argument(
            "--timeout",
            type=non_negative_float,
            default=settings.timeout if settings.timeout is not None else default,
            help=f"time limit of a run (s); 0 for none (default: $TRIOFLOW_TIMEOUT or {default:g})",
        )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--plain``: the views of :func:`~trioflow.cli._console.open_renderer`."""
    parser.add_argument("--json", action="store_true", help="write one JSON event per line")
    parser.add_argument("--plain", action="store_true", help="plain text output (no live view)")


MAX_GAP_HELP = (
    "cap every pause between two events at SECONDS of the recording (divided by the speed "
    f"when waiting); 'inf' keeps every pause, 0 none (default: {DEFAULT_MAX_GAP:g})"
)
"""The help of ``--max-gap`` (``trioflow replay`` and ``trioflow serve``)."""


def add_max_gap_option(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """``--max-gap SECONDS``: cap a replay's pauses (``inf``: no cap), 5 s by default."""
    parser.add_argument(
        "--max-gap",
        type=seconds,
        default=DEFAULT_MAX_GAP,
        metavar="SECONDS",
        help=prefix + MAX_GAP_HELP,
    )


# -- warnings and signals --------------------------------------------------------------

MAX_WARNINGS = 10
"""The most warnings of one kind the commands show; they say when they stop showing them."""


def print_warnings(command: str, err: IO[str]) -> WarningHandler:
    """An ``on_warning`` callback printing ``trioflow COMMAND: warning: ...`` lines on ``err``.

    It prints the first :data:`MAX_WARNINGS` warnings of each kind, then one
    more saying that the further ones of that kind are not shown, then none.
    """
    shown: Counter[str] = Counter()

    def on_warning(warning: RecordingWarning) -> None:
        shown[warning.kind] += 1
        if shown[warning.kind] <= MAX_WARNINGS:
            print(f"trioflow {command}: warning: {warning}", file=err, flush=True)
        elif shown[warning.kind] == MAX_WARNINGS + 1:
            print(
                f"trioflow {command}: warning: {warning} "
                f"(further {warning.kind} warnings not shown)",
                file=err,
                flush=True,
            )

    return on_warning


async def watch_signals(
    on_signal: Callable[[int], None], on_again: Callable[[int], None] | None = None
) -> None:
    """Call ``on_signal(signum)`` on the first SIGINT/SIGTERM, and ``on_again`` on every later one.

    Without ``on_again``, a second signal raises :exc:`KeyboardInterrupt`
    (stop waiting for a clean end). Run it in a nursery next to the work it
    stops; cancel it when the work is done.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        seen = False
        async for signum in signals:
            if not seen:
                seen = True
                on_signal(signum)
            elif on_again is None:  # a second Ctrl-C: stop waiting for a clean end
                raise KeyboardInterrupt
            else:
                on_again(signum)


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ...) to systemd's ``$NOTIFY_SOCKET``; False if unset or unreachable.

    The ``sd_notify`` protocol: one datagram on a Unix socket, whose address
    starts with ``@`` for the abstract namespace.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def stop_on_signals(nursery: trio.Nursery, stop: trio.Event, err: IO[str], *, doing: str) -> None:
    """Watch SIGINT/SIGTERM in ``nursery``: the first sets ``stop``, a second cancels ``nursery``.

    The first signal prints ``trioflow: <doing> (again to stop at once)`` on
    ``err`` and tells systemd ``STOPPING=1`` (:func:`notify`); every later one
    prints ``trioflow: stopping at once`` and cancels ``nursery`` (the work
    in it ends at once).
    """

    def first(signum: int) -> None:
        print(f"trioflow: {doing} (again to stop at once)", file=err, flush=True)
        notify("STOPPING=1")
        stop.set()

    def again(signum: int) -> None:
        print("trioflow: stopping at once", file=err, flush=True)
        nursery.cancel_scope.cancel()

    nursery.start_soon(watch_signals, first, again)
