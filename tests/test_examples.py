"""The tutorial programs in ``examples/``: each runs offline, fast, and prints what its chapter promises.

Each example runs as a subprocess, the way a reader runs it, with the
scripted model (``ANTHROPIC_API_KEY`` removed) at pace 0. To add an example,
add one line to ``EXAMPLES``: its file name and the texts its output must
contain, in this order. (Output that concurrent listeners print may
interleave with the main task's: list only texts whose order is certain.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

EXAMPLES: dict[str, list[str]] = {
    "01_basic_streaming.py": [
        "flow.started",
        "iteration 1",
        "Let me calculate that.",
        "tool.started: calculator",
        "tool.completed: calculator returned 100",
        "progress: iteration 1 of at most 10",
        "25 * 4 = 100.",
        "flow.completed",
        "Answer: 25 * 4 = 100.",
        "Tokens used:",
    ],
    "02_progress_tracking.py": [
        "at most 4 iterations",
        "25.0%",
        "iteration 1/4  ETA ",
        "viewer     size",
        "dashboard  size",
        "50.0%",
        "100.0%",
        "done",
        "Answer: 25 * 4 = 100.",
        "Subscription statistics at the end of the run:",
        "utilisation",
        "dropped",
        "were dropped in all",
    ],
    "03_event_listeners.py": [
        "Run 1: What is 25 * 4?",
        "+ event-logger subscribed while run 1 is going",
        "Run 2:",
        "- event-logger unsubscribed during run 2, after tool.failed",
        "[app.run_summary] run_0002",
        "Listener report:",
        "token-counter: run_0001",
        "performance-monitor:",
        "error-tracker: 1 problem(s)",
        "tool.failed in run_0002",
        "division by zero",
        "event-logger:",
        "on_run_summary: 2 calls, 0 crashes",
    ],
    "05_custom_events.py": [
        "price.alert       ACME moved -3.5% to 96.50",
        "trade.executed    BUY 10 ACME @ 96.50",
        "portfolio.update  position 10 ACME",
        "risk.warning      ACME exposure 1840.00",
        "auditor joins at seq 7 and catches up from the history",
        "trade.executed    SELL 20 ACME @ 97.00",
        "agent: 20 * 97 - (10 * 96.5 + 10 * 92) = 55.",
        "auditor: 7 events replayed from history [1, 2, 3, 4, 5, 6, 7],",
        "3 received live [8, 9, 10]",
        "Book: 3 trades, 40 shares traded, profit +55.00",
    ],
    "06_error_handling.py": [
        "1. A normal run",
        "=> flow.completed: '25 * 4 = 100.'",
        "2. A tool error",
        "tool.failed: division by zero (the run goes on)",
        "=> flow.completed: 'I could not compute that: division by zero.'",
        "3. A flaky tool",
        "backoff delays 0.10 s, 0.20 s, 0.40 s",
        "attempt 1 failed: connection reset by peer (call 1); backing off 0.10 s",
        "attempt 2 failed: connection reset by peer (call 2); backing off 0.20 s",
        "tool.completed: 100",
        "=> flow.completed: '25 * 4 = 100.'",
        "the service was called 3 times",
        "4. A timeout",
        "=> flow.cancelled: reason 'timeout'",
        "5. A cancellation",
        "3 tokens in: cancelling the run",
        "=> flow.cancelled: reason 'user pressed stop'",
        "run.result: status cancelled",
        "6. Out of iterations",
        "=> flow.failed: MaxIterationsExceeded",
    ],
}


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env["TRIOFLOW_PACE"] = "0"
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_in_order(output: str, expected: list[str]) -> None:
    position = 0
    for text in expected:
        found = output.find(text, position)
        if found < 0:
            raise AssertionError(f"{text!r} not found in the output after {output[:position]!r}")
        position = found + len(text)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_offline_and_prints_what_its_chapter_promises(name: str) -> None:
    result = run_example(name)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_in_order(result.stdout, EXAMPLES[name])


def test_every_example_is_tested() -> None:
    on_disk = {p.name for p in EXAMPLES_DIR.glob("[0-9][0-9]_*.py")}
    assert on_disk <= set(EXAMPLES), f"examples without a test: {sorted(on_disk - set(EXAMPLES))}"
