"""``trioflow replay FILE``: show a recorded run again, with its original timing.

The recording is JSON lines, one event per line, as written by
``trioflow run --json`` or an :class:`~trioflow.recording.EventRecorder`. The
events are shown with the views of ``trioflow run``: a live view, plain text
(``--plain``) or JSON lines again (``--json``, byte for byte the recording's
events). ``--speed 2`` replays twice as fast, ``--speed inf`` without delays.
``--max-gap S`` (default 5) caps every pause at S recorded seconds, so at
most S / speed seconds of waiting; ``--max-gap inf`` keeps every pause,
``--max-gap 0`` none.

Events a single recorded run would not produce (a gap in the seqs, a second
terminal event of a run, a second run id) are replayed, each reported on
standard error as ``trioflow replay: warning: FILE, line N: ...`` (at most
10 of each kind).

Exit status: 0 when the recording ends with ``flow.completed``; 1 when it ends
with ``flow.failed`` or ``flow.cancelled``, without a terminal event, at a
corrupted or truncated line (reported on standard error with its line
number, after the valid events before it), or when it holds no events
(``FILE: holds no events``); 2 when the file cannot be opened or for bad
usage; 130 when interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import IO

import trio

from trioflow._util import collapse_single_group
from trioflow.cli._common import (
    add_max_gap_option,
    add_output_options,
    playback_speed,
    print_warnings,
    watch_signals,
)
from trioflow.cli._console import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    detach_stdout,
    exit_status,
    open_renderer,
)
from trioflow.events import EventType, FlowEvent
from trioflow.recording import RecordingError, empty_recording, replay

__all__ = ["HELP", "add_arguments", "main"]

HELP = "replay a recorded run (the JSON lines of 'trioflow run --json') with its timing"
"""The subcommand's one-line help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``replay`` subcommand's arguments to ``parser``."""
    parser.add_argument("file", metavar="FILE", help="the recording ('-' reads standard input)")
    parser.add_argument(
        "--speed",
        type=playback_speed,
        default=1.0,
        help="playback speed: 2 is twice as fast, 0.5 half as fast, 'inf' without delays "
        "(default: 1)",
    )
    add_max_gap_option(parser)
    add_output_options(parser)


def _titles(first: FlowEvent | None, file: str) -> tuple[str, str]:
    name = "standard input" if file == "-" else os.path.basename(file)
    if first is not None and first.type == EventType.FLOW_STARTED:
        task = first.data.get("task")
        model = first.data.get("model")
        return (
            task if isinstance(task, str) and task else name,
            f"{model} · replay" if isinstance(model, str) and model else "replay",
        )
    return name, "replay"


async def _replay(args: argparse.Namespace, out: IO[str]) -> int:
    source = sys.stdin.buffer if args.file == "-" else args.file
    interrupted: list[int] = []
    terminal: FlowEvent | None = None
    error: RecordingError | None = None
    scope = trio.CancelScope()

    def on_signal(signum: int) -> None:
        interrupted.append(signum)
        scope.cancel()

    async with replay(
        source,
        speed=args.speed,
        max_gap=args.max_gap,
        on_warning=print_warnings("replay", sys.stderr),
    ) as events:
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals, on_signal)
                try:
                    with scope:
                        try:
                            first = await events.peek()
                        except RecordingError as exc:
                            error, first = exc, None
                        if first is None and error is None:
                            error = empty_recording(events.path)  # nothing to show
                        else:
                            title, model = _titles(first, args.file)
                            with open_renderer(
                                out, json=args.json, plain=args.plain, title=title, model=model
                            ) as renderer:
                                try:
                                    async for event in events:
                                        renderer.show(event)
                                        if event.is_terminal():
                                            terminal = event
                                except RecordingError as exc:
                                    error = exc
                finally:
                    nursery.cancel_scope.cancel()
    if error is not None:
        print(f"trioflow replay: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted else EXIT_FAILED
    return exit_status(terminal, interrupted=bool(interrupted))


def main(args: argparse.Namespace) -> int:
    """Run ``trioflow replay`` with parsed ``args``; return the exit status."""
    try:
        return trio.run(_replay, args, sys.stdout)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"trioflow replay: cannot open {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return detach_stdout()
