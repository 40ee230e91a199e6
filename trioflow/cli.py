"""The ``trioflow`` command.

``trioflow run "What is 25 * 4?"`` runs the agent and shows its execution
live: the answer token by token, tool calls and their results as they
happen, and a progress bar with duration and ETA. ``--json`` writes one JSON
event per line instead, for pipes. Exit status: 0 when the run completed,
1 when it failed (or timed out), 130 when interrupted with Ctrl-C (after the
``flow.cancelled`` event was shown), 2 for bad usage.

Other subcommands live next to the feature they drive and are registered in
:data:`SUBCOMMANDS`: each is a module with a ``HELP`` string, an
``add_arguments(parser)`` function and a ``main(args) -> int`` function.

``python -m trioflow`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import math
import signal
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import IO

import trio

from trioflow import __version__
from trioflow._util import collapse_single_group
from trioflow.console import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    detach_stdout,
    exit_status,
    open_renderer,
)
from trioflow.demo import default_agent
from trioflow.events import FlowEvent
from trioflow.executor import Run, StreamingFlowExecutor
from trioflow.handle import CancelReason
from trioflow.models import ModelError, default_model_name, open_model
from trioflow.settings import Settings, SettingsError

__all__ = ["SUBCOMMANDS", "main", "positive_float", "watch_signals"]

SUBCOMMANDS: dict[str, str] = {
    "serve": "trioflow.web.command",
    "watch": "trioflow.client.command",
    "replay": "trioflow.recording.command",
}
"""Subcommands beyond ``run``: name -> module (``HELP``, ``add_arguments``, ``main``)."""


async def watch_signals(on_signal: Callable[[int], None]) -> None:
    """Call ``on_signal(signum)`` on the first SIGINT/SIGTERM; raise KeyboardInterrupt on the second.

    Run it in a nursery next to the work it stops; cancel it when the work is done.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        seen = False
        async for signum in signals:
            if seen:  # a second Ctrl-C: stop waiting for a clean end
                raise KeyboardInterrupt
            seen = True
            on_signal(signum)


async def _run(args: argparse.Namespace, out: IO[str]) -> int:
    async with open_model(args.model, pace=args.pace) as model:
        agent = default_agent(model, system=args.system, max_iterations=args.max_iterations)
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
                                if event.is_terminal():
                                    terminal = event
                finally:
                    run.cancel(CancelReason.OUTPUT_CLOSED)
                    nursery.cancel_scope.cancel()
        return exit_status(terminal, interrupted=bool(interrupted))


def positive_float(text: str) -> float:
    """``argparse`` type: a positive, finite number."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, not {text}")
    return value


def _add_run_arguments(run: argparse.ArgumentParser, settings: Settings) -> None:
    run.add_argument("task", help='what to ask, e.g. "What is 25 * 4?"')
    run.add_argument(
        "--model",
        default=settings.model,
        help="'scripted' (offline), 'claude' or a Claude model name; default: $TRIOFLOW_MODEL "
        f"or {default_model_name()!r} (Claude when ANTHROPIC_API_KEY is set)",
    )
    run.add_argument("--json", action="store_true", help="write one JSON event per line")
    run.add_argument("--plain", action="store_true", help="plain text output (no live view)")
    run.add_argument(
        "--timeout",
        type=positive_float,
        default=settings.timeout,
        help="time limit in seconds (default: $TRIOFLOW_TIMEOUT or none)",
    )
    run.add_argument(
        "--max-iterations",
        type=int,
        default=settings.max_iterations,
        help=f"most model turns (default: $TRIOFLOW_MAX_ITERATIONS or {settings.max_iterations})",
    )
    run.add_argument(
        "--pace",
        type=_non_negative,
        default=20.0,
        help="the scripted model's tokens per second (default: 20; 0 for no delay)",
    )
    run.add_argument("--system", default=None, help="a system prompt")


def _run_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.max_iterations < 1:
        parser.error("--max-iterations must be at least 1")
    if not args.task.strip():
        parser.error("the task must not be empty")
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


def _load(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "trioflow" and not module.startswith(exc.name):
            raise  # a bug in trioflow itself, not a missing feature
        return None  # that feature or its optional dependency is not installed


def _parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="trioflow",
        description="Stream the execution of LLM agents as events, on Trio.",
    )
    parser.add_argument("--version", action="version", version=f"trioflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        parser.exit(EXIT_USAGE, f"trioflow: {exc}\n")
    _add_run_arguments(
        sub.add_parser(
            "run",
            help="run the agent on a task and stream its execution",
            description="Run the agent on TASK and show its execution live.",
        ),
        settings,
    )
    modules: dict[str, ModuleType] = {}
    for name, module_name in SUBCOMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trioflow`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser, modules = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run_main(parser, args)
    status: int = modules[args.command].main(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
