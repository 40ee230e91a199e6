"""Terminal views of an event stream, shared by ``trioflow run``, ``watch`` and ``replay``.

:func:`open_renderer` picks one: JSON lines (:class:`JsonRenderer`, the
recording format), a live ``rich`` view (:class:`RichRenderer`) or plain text
(:class:`PlainRenderer`, also the fallback without ``rich``).
:func:`exit_status` maps a run's terminal event to the command's exit status.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Protocol

from trioflow.events import EventType, FlowEvent
from trioflow.progress import format_duration

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "JsonRenderer",
    "PlainRenderer",
    "Renderer",
    "RichRenderer",
    "detach_stdout",
    "exit_status",
    "open_renderer",
]

EXIT_OK = 0
"""The run completed."""
EXIT_FAILED = 1
"""The run failed, timed out or was cancelled for another reason than Ctrl-C."""
EXIT_USAGE = 2
"""Bad command-line usage."""
EXIT_INTERRUPTED = 130
"""Interrupted with Ctrl-C (SIGINT) or SIGTERM."""


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
        if event.is_token():
            self._out.write(_token_text(event))
            self._in_text = True
        elif t == EventType.TOOL_STARTED:
            self._line(f"  -> {data.get('tool')} {_short(data.get('input'))}")
        elif t == EventType.TOOL_COMPLETED:
            self._line(f"  <- {data.get('tool')} = {_short(data.get('result'))}")
        elif t == EventType.TOOL_FAILED:
            self._line(f"  !! {data.get('tool')} failed: {data.get('error', {}).get('message')}")
        elif t == EventType.TOOL_APPROVAL_REQUIRED:
            self._line(f"  ?? {data.get('tool')} {_short(data.get('input'))} waits for approval")
        elif t == EventType.TOOL_DENIED:
            self._line(f"  xx {data.get('tool')} denied: {data.get('reason')}")
        elif t == EventType.ITERATION_COMPLETED:
            self._line("")
        elif t in (EventType.WARNING, EventType.ERROR):
            self._line(f"[{t}] {data.get('message')}")
        elif t in (EventType.FLOW_PAUSED, EventType.FLOW_RESUMED):
            self._line(f"[{t}]")
        elif event.is_terminal():
            self._line(_terminal_summary(event))
        self._out.flush()


def _token_text(event: FlowEvent) -> str:
    """The text of a ``token.received`` or coalesced ``token.chunk`` event."""
    data = event.data
    return str(data.get("token", data.get("chunk", "")))


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
    """A live terminal view with ``rich``: the transcript above a progress bar.

    The status line under the bar names the iteration *in progress* (from
    ``iteration.started``: "iteration 1/10" during the first one), with the
    percent of the last ``progress.update``; a completed run ends at 100 %.
    """

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
        self._iteration = 0
        self._budget: object = "?"
        self._elapsed = ""
        self._live = Live(
            self._render(), console=self._console, refresh_per_second=15, transient=False
        )

    def _bar(self) -> Any:
        width = 24
        filled = round(self._percent / 100 * width)
        return self._Text.assemble(
            ("█" * filled, "green"), ("░" * (width - filled), "dim"), " ", self._status
        )

    @property
    def status(self) -> str:
        """The text of the status line under the bar, as shown now."""
        return str(self._status.plain)

    def _iteration_status(self, eta: Any = None) -> Any:
        eta_text = "" if eta is None else f" · ETA {format_duration(float(eta))}"
        elapsed = f" · {self._elapsed}" if self._elapsed else ""
        return self._Text(
            f"iteration {self._iteration}/{self._budget} · {self._percent:.0f}%{elapsed}{eta_text}",
            style="dim",
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
        if event.is_token():
            text.append(_token_text(event))
        elif t == EventType.TOOL_STARTED:
            text.append(f"\n  ⚙ {data.get('tool')} ", style="cyan")
            text.append(_short(data.get("input")), style="dim")
        elif t == EventType.TOOL_COMPLETED:
            text.append(f" → {_short(data.get('result'))}", style="bold green")
            text.append(f" ({format_duration(float(data.get('duration') or 0))})\n", style="dim")
        elif t == EventType.TOOL_FAILED:
            error = data.get("error") or {}
            text.append(f" ✖ {error.get('message')}\n", style="bold red")
        elif t == EventType.TOOL_APPROVAL_REQUIRED:
            text.append(f"\n  ? {data.get('tool')} ", style="yellow")
            text.append(f"{_short(data.get('input'))} waits for approval", style="dim")
        elif t == EventType.TOOL_DENIED:
            text.append(f"\n  ✖ {data.get('tool')} denied: {data.get('reason')}\n", style="red")
        elif t == EventType.ITERATION_COMPLETED:
            if text.plain and not text.plain.endswith("\n"):
                text.append("\n")
        elif t == EventType.WARNING:
            text.append(f"\n⚠ {data.get('message')}\n", style="yellow")
        elif t == EventType.ITERATION_STARTED:
            # The iteration now running, not the last one completed.
            self._iteration = int(data.get("iteration") or self._iteration + 1)
            self._budget = data.get("max_iterations", self._budget)
            self._status = self._iteration_status()
        elif t == EventType.PROGRESS_UPDATE:
            self._percent = float(data.get("percent") or 0.0)
            self._iteration = max(self._iteration, int(data.get("current_iteration") or 0))
            self._budget = data.get("total_iterations", self._budget)
            self._elapsed = str(data.get("formatted_duration") or "")
            self._status = self._iteration_status(data.get("estimated_remaining"))
        elif t == EventType.FLOW_PAUSED:
            self._status = self._Text("paused", style="yellow")
        elif event.is_terminal():
            styles: dict[str, str] = {
                EventType.FLOW_COMPLETED: "bold green",
                EventType.FLOW_FAILED: "bold red",
            }
            style = styles.get(t, "bold yellow")
            self._percent = float(data.get("percent", self._percent) or 0.0)
            if t == EventType.FLOW_COMPLETED:
                self._percent = 100.0
            mark = "✔" if t == EventType.FLOW_COMPLETED else "✖"
            self._status = self._Text(f"{mark} {_terminal_summary(event)}", style=style)
        self._live.update(self._render())


def open_renderer(
    out: IO[str], *, json: bool = False, plain: bool = False, title: str = "", model: str = ""
) -> Renderer:
    """The renderer for these options: JSON lines, plain text, or the live ``rich`` view.

    The ``rich`` view is used unless ``json`` or ``plain`` is set; without
    ``rich`` installed, plain text.
    """
    if json:
        return JsonRenderer(out)
    if not plain:
        try:
            return RichRenderer(out, task=title, model=model)
        except ImportError:
            pass
    return PlainRenderer(out)


def exit_status(terminal: FlowEvent | None, *, interrupted: bool = False) -> int:
    """The exit status for a stream that ended with ``terminal`` (``None``: it never ended)."""
    if terminal is not None and terminal.type == EventType.FLOW_COMPLETED:
        return EXIT_OK
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def detach_stdout() -> int:
    """Stop writing to a standard output whose reader went away (``... --json | head``).

    Points file descriptor 1 at ``/dev/null`` so the interpreter's final flush
    does not fail again, and returns :data:`EXIT_FAILED` for the command to exit with.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_FAILED
