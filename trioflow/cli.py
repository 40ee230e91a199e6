"""The ``trioflow`` command.

``trioflow run "What is 25 * 4?"`` runs the agent and shows its execution
live: the answer token by token, tool calls and their results as they
happen, and a progress bar with duration and ETA. ``--json`` writes one JSON
event per line instead, for pipes. Exit status: 0 when the run completed,
1 when it failed (or timed out), 130 when interrupted with Ctrl-C (after the
``flow.cancelled`` event was shown), 2 for bad usage.

``python -m trioflow`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import IO, Any, Protocol

import trio

from trioflow import __version__
from trioflow._util import collapse_single_group
from trioflow.agent import Agent
from trioflow.arithmetic import calculator
from trioflow.events import EventType, FlowEvent
from trioflow.executor import Run, RunStatus, StreamingFlowExecutor
from trioflow.models import ModelError, default_model_name, open_model
from trioflow.progress import format_duration

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Renderer(Protocol):
    """Shows a run's events as they arrive."""

    def __enter__(self) -> Renderer: ...
    def __exit__(self, *exc: object) -> None: ...
    def show(self, event: FlowEvent) -> None:
        """Show one event."""
        ...


class JsonRenderer:
    """One JSON object per line, flushed as it comes: the recording format."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __enter__(self) -> JsonRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._out.flush()

    def show(self, event: FlowEvent) -> None:
        """Write ``event`` as one line of JSON."""
        self._out.write(event.to_json() + "\n")
        self._out.flush()


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PlainRenderer:
    """Plain text for terminals without ``rich``: tokens inline, one line per other event."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._in_text = False

    def __enter__(self) -> PlainRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._in_text:
            self._out.write("\n")
        self._out.flush()

    def _line(self, text: str) -> None:
        if self._in_text:
            self._out.write("\n")
            self._in_text = False
        self._out.write(text + "\n")

    def show(self, event: FlowEvent) -> None:
        """Write ``event`` as text."""
        data = event.data
        t = event.type
        if t == EventType.TOKEN_RECEIVED:
            self._out.write(data.get("token", ""))
            self._in_text = True
        elif t == EventType.TOOL_STARTED:
            self._line(f"  -> {data.get('tool')} {_short(data.get('input'))}")
        elif t == EventType.TOOL_COMPLETED:
            self._line(f"  <- {data.get('tool')} = {_short(data.get('result'))}")
        elif t == EventType.TOOL_FAILED:
            self._line(f"  !! {data.get('tool')} failed: {data.get('error', {}).get('message')}")
        elif t == EventType.ITERATION_COMPLETED:
            self._line("")
        elif t in (EventType.WARNING, EventType.ERROR):
            self._line(f"[{t}] {data.get('message')}")
        elif t in (EventType.FLOW_PAUSED, EventType.FLOW_RESUMED):
            self._line(f"[{t}]")
        elif event.is_terminal():
            self._line(_terminal_summary(event))
        self._out.flush()


def _terminal_summary(event: FlowEvent) -> str:
    data = event.data
    duration = format_duration(float(data.get("duration") or 0.0))
    if event.type == EventType.FLOW_COMPLETED:
        usage = data.get("usage") or {}
        return (
            f"completed in {duration} - {data.get('iterations')} iteration(s), "
            f"{usage.get('total_tokens', 0)} tokens"
        )
    if event.type == EventType.FLOW_FAILED:
        error = data.get("error") or {}
        return f"failed after {duration}: {error.get('type')}: {error.get('message')}"
    return f"cancelled after {duration} ({data.get('reason')})"


class RichRenderer:
    """A live terminal view with ``rich``: the transcript above a progress bar."""

    def __init__(self, out: IO[str], *, task: str, model: str) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.text import Text

        self._Text = Text
        self._Group = Group
        self._console = Console(file=out, highlight=False)
        self._header = Text.assemble(
            ("trioflow ", "bold magenta"), (f"· {model} · ", "dim"), (task, "bold")
        )
        self._transcript = Text()
        self._status = Text("starting…", style="dim")
        self._percent = 0.0
        self._live = Live(
            self._render(), console=self._console, refresh_per_second=15, transient=False
        )

    def _bar(self) -> Any:
        width = 24
        filled = round(self._percent / 100 * width)
        return self._Text.assemble(
            ("█" * filled, "green"), ("░" * (width - filled), "dim"), " ", self._status
        )

    def _render(self) -> Any:
        transcript = self._transcript.copy()
        transcript.rstrip()
        return self._Group(self._header, transcript, self._bar())

    def __enter__(self) -> RichRenderer:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.update(self._render(), refresh=True)
        self._live.__exit__(None, None, None)
        if not self._console.is_terminal:
            self._console.file.write("\n")

    def show(self, event: FlowEvent) -> None:
        """Add ``event`` to the live view."""
        data = event.data
        t = event.type
        text = self._transcript
        if t == EventType.TOKEN_RECEIVED:
            text.append(str(data.get("token", "")))
        elif t == EventType.TOOL_STARTED:
            text.append(f"\n  ⚙ {data.get('tool')} ", style="cyan")
            text.append(_short(data.get("input")), style="dim")
        elif t == EventType.TOOL_COMPLETED:
            text.append(f" → {_short(data.get('result'))}", style="bold green")
            text.append(f" ({format_duration(float(data.get('duration') or 0))})\n", style="dim")
        elif t == EventType.TOOL_FAILED:
            error = data.get("error") or {}
            text.append(f" ✖ {error.get('message')}\n", style="bold red")
        elif t == EventType.ITERATION_COMPLETED:
            if text.plain and not text.plain.endswith("\n"):
                text.append("\n")
        elif t == EventType.WARNING:
            text.append(f"\n⚠ {data.get('message')}\n", style="yellow")
        elif t == EventType.PROGRESS_UPDATE:
            self._percent = float(data.get("percent") or 0.0)
            eta = data.get("estimated_remaining")
            eta_text = "" if eta is None else f" · ETA {format_duration(float(eta))}"
            self._status = self._Text(
                f"iteration {data.get('current_iteration')}/{data.get('total_iterations')} · "
                f"{self._percent:.0f}% · {data.get('formatted_duration')}{eta_text}",
                style="dim",
            )
        elif t == EventType.FLOW_PAUSED:
            self._status = self._Text("paused", style="yellow")
        elif event.is_terminal():
            styles: dict[str, str] = {
                EventType.FLOW_COMPLETED: "bold green",
                EventType.FLOW_FAILED: "bold red",
            }
            style = styles.get(t, "bold yellow")
            if t == EventType.FLOW_COMPLETED:
                self._percent = 100.0
            mark = "✔" if t == EventType.FLOW_COMPLETED else "✖"
            self._status = self._Text(f"{mark} {_terminal_summary(event)}", style=style)
        self._live.update(self._render())


def _renderer(args: argparse.Namespace, out: IO[str], model: str) -> Renderer:
    if args.json:
        return JsonRenderer(out)
    if not args.plain:
        try:
            return RichRenderer(out, task=args.task, model=model)
        except ImportError:
            pass
    return PlainRenderer(out)


def _exit_status(run: Run, interrupted: bool) -> int:
    status = run.status
    if status is RunStatus.COMPLETED:
        return EXIT_OK
    if status is RunStatus.CANCELLED and interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED


async def _cancel_on_signal(run: Run, flag: list[bool]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if flag:  # a second Ctrl-C: stop waiting for a clean end
                raise KeyboardInterrupt
            flag.append(True)
            run.cancel("interrupted")


async def _run(args: argparse.Namespace, out: IO[str]) -> int:
    async with open_model(args.model, pace=args.pace) as model:
        agent = Agent(
            model, tools=[calculator], system=args.system, max_iterations=args.max_iterations
        )
        executor = StreamingFlowExecutor()
        interrupted: list[bool] = []
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                run = await executor.start(agent, args.task, timeout=args.timeout, nursery=nursery)
                nursery.start_soon(_cancel_on_signal, run, interrupted)
                try:
                    with _renderer(args, out, model.name) as renderer:
                        async with run.subscribe(after=0) as events:
                            async for event in events:
                                renderer.show(event)
                finally:
                    run.cancel("output closed")
                    nursery.cancel_scope.cancel()
        return _exit_status(run, bool(interrupted))


def _positive(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioflow",
        description="Stream the execution of LLM agents as events, on Trio.",
    )
    parser.add_argument("--version", action="version", version=f"trioflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the agent on a task and stream its execution",
        description="Run the agent on TASK and show its execution live.",
    )
    run.add_argument("task", help='what to ask, e.g. "What is 25 * 4?"')
    run.add_argument(
        "--model",
        default=None,
        help="'scripted' (offline), 'claude' or a Claude model name; default: "
        f"{default_model_name()!r} (Claude when ANTHROPIC_API_KEY is set)",
    )
    run.add_argument("--json", action="store_true", help="write one JSON event per line")
    run.add_argument("--plain", action="store_true", help="plain text output (no live view)")
    run.add_argument("--timeout", type=_positive, default=None, help="time limit in seconds")
    run.add_argument(
        "--max-iterations", type=int, default=10, help="most model turns (default: 10)"
    )
    run.add_argument(
        "--pace",
        type=_non_negative,
        default=20.0,
        help="the scripted model's tokens per second (default: 20; 0 for no delay)",
    )
    run.add_argument("--system", default=None, help="a system prompt")
    return parser


def main(argv: Sequence[str] | None = None) -> int:  # noqa: RET503 - parser.error exits
    """Run the ``trioflow`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
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
            # The reader went away (``trioflow run --json ... | head``): stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_FAILED
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse exits first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
