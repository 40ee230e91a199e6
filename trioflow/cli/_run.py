"""``trioflow run TASK``: run the agent on a task and show its execution live.

The answer streams token by token, tool calls and their results show as
they happen, under a progress bar with duration and ETA; ``--json`` writes
one JSON event per line instead, for pipes (the recording format of
``trioflow replay``). With ``--approve`` every tool call waits for a y/n
answer on the terminal first (a line on standard input: ``y`` runs it,
anything else denies it; the question goes to standard error).
Exit status: 0 when the run completed, 1 when it
failed (or timed out), 130 when interrupted with Ctrl-C (after the
``flow.cancelled`` event was shown), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO

import trio

from trioflow._util import collapse_single_group
from trioflow.approvals import ApprovalError
from trioflow.cli._common import (
    UsageError,
    add_model_option,
    add_output_options,
    add_pace_option,
    add_timeout_option,
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
from trioflow.demo import default_agent
from trioflow.events import EventType, FlowEvent
from trioflow.executor import Run, StreamingFlowExecutor
from trioflow.handle import CancelReason
from trioflow.models import ModelError, open_model
from trioflow.settings import Settings

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "main"]

HELP = "run the agent on a task and stream its execution"
"""The subcommand's one-line help."""

DESCRIPTION = "Run the agent on TASK and show its execution live."
"""The description ``trioflow run --help`` shows."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``trioflow run`` to ``parser``; defaults come from :class:`Settings`.

    Raises:
        SettingsError: a ``TRIOFLOW_*`` variable has a bad value.
    """
    settings = Settings.from_env()
    parser.add_argument("task", help='what to ask, e.g. "What is 25 * 4?"')
    add_model_option(parser, settings)
    add_output_options(parser)
    add_timeout_option(parser, settings)
    parser.add_argument(
        "--max-iterations",
        type=int,
        default=settings.max_iterations,
        help=f"most model turns (default: $TRIOFLOW_MAX_ITERATIONS or {settings.max_iterations})",
    )
    add_pace_option(parser)
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument(
        "--approve",
        action="store_true",
        help="ask on the terminal (y/n) before each tool call runs",
    )


async def _run(args: argparse.Namespace, out: IO[str]) -> int:
    async with open_model(args.model, pace=args.pace) as model:
        agent = default_agent(
            model,
            system=args.system,
            max_iterations=args.max_iterations,
            approval=(lambda call: True) if args.approve else None,
        )
        executor = StreamingFlowExecutor()
        interrupted: list[int] = []
        terminal: FlowEvent | None = None
        run: Run | None = None

        def on_signal(signum: int) -> None:
            interrupted.append(signum)
            if run is not None:
                run.cancel(CancelReason.INTERRUPTED)

        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_signals, on_signal)
                run = await executor.start(agent, args.task, timeout=args.timeout, nursery=nursery)
                try:
                    with open_renderer(
                        out, json=args.json, plain=args.plain, title=args.task, model=model.name
                    ) as renderer:
                        async with run.subscribe(after=0) as events:
                            async for event in events:
                                renderer.show(event)
                                if event.type == EventType.TOOL_APPROVAL_REQUIRED:
                                    nursery.start_soon(_ask, run, event, sys.stdin, sys.stderr)
                                if event.is_terminal():
                                    terminal = event
                finally:
                    run.cancel(CancelReason.OUTPUT_CLOSED)
                    nursery.cancel_scope.cancel()
        return exit_status(terminal, interrupted=bool(interrupted))


async def _ask(run: Run, event: FlowEvent, stdin: IO[str], err: IO[str]) -> None:
    """Ask on the terminal whether the waiting tool call of ``event`` may run; decide so."""
    data = event.data
    question = f"run {data['tool']} with {json.dumps(data['input'])}? [y/N] "

    def ask() -> str:
        err.write(question)
        err.flush()
        return stdin.readline()

    answer = await trio.to_thread.run_sync(ask, abandon_on_cancel=True)
    try:
        if answer.strip().lower() in ("y", "yes"):
            run.approve(data["call_id"])
        else:
            run.deny(data["call_id"], "denied on the terminal")
    except ApprovalError:
        pass  # the run ended (or the call timed out) meanwhile


def main(args: argparse.Namespace) -> int:
    """Run ``trioflow run`` with parsed ``args``; return the exit status.

    Raises:
        UsageError: ``--max-iterations`` is below 1, or the task is empty.
    """
    if args.max_iterations < 1:
        raise UsageError("--max-iterations must be at least 1")
    if not args.task.strip():
        raise UsageError("the task must not be empty")
    try:
        return trio.run(_run, args, sys.stdout)
    except ModelError as exc:
        print(f"trioflow: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"trioflow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return detach_stdout()
