"""The tutorial programs in ``examples/``: each runs offline, fast, and prints what its chapter promises.

Each example runs as a subprocess, the way a reader runs it, with the
scripted model (``ANTHROPIC_API_KEY`` removed) at pace 0. To add an example,
add one line to ``EXAMPLES``: its file name (followed by its command-line
arguments, if it needs any) and the texts its output must contain, in this
order. (Output that concurrent listeners print may interleave with the main
task's: list only texts whose order is certain.)
"""

from __future__ import annotations

import os
import shlex
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
        "progress: 1/10 iterations (10%)",
        "25 * 4 = 100.",
        "progress: 2/2 iterations (100%)",
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
        "100.0%",
        "iteration 2/2",
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
        "profit.checked    20 * 97 - (10 * 96.5 + 10 * 92) = 55 (by the agent's tool, call",
        "agent: 20 * 97 - (10 * 96.5 + 10 * 92) = 55.",
        "auditor: 7 events replayed from history [1, 2, 3, 4, 5, 6, 7],",
        "4 received live [8, 9, 10, ",
        "Book: 3 trades, 40 shares traded, profit +55.00",
    ],
    "04_sse_streaming.py": [
        "server listening on http://127.0.0.1:",
        "POST /runs -> 201: run run_",
        "/events",
        "Let me calculate that.",
        "tool.completed: 100",
        "25 * 4 = 100.",
        "flow.completed (terminal event)",
        "Answer: 25 * 4 = 100.",
        "server stopped",
    ],
    "10_vercel_ui_stream.py": [
        "server listening on http://127.0.0.1:",
        "POST /vercel/chat -> 200, x-vercel-ai-ui-message-stream: v1",
        "start: message run_",
        "Let me calculate that.",
        'tool-input-available: calculator {"operation": "evaluate", "expression": "25 * 4"}',
        "tool-output-available: 100",
        "25 * 4 = 100.",
        "finish: stop",
        "[DONE] (the last id: ",
        "second message -> 200",
        "7 * 6 = 42.",
        "[DONE]",
        ": 8 messages",
        "after Last-Event-ID: 5",
        " me calculate that.",
        "tool-output-available: 100",
        "finish: stop",
        "server stopped",
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
    "08_conversations.py": [
        "1. One conversation, three messages:",
        "person: approve '25 * 4'",
        "assistant: 25 * 4 = 100.",
        "(the thread holds 4 messages)",
        "person: deny '1000 + 1' (too big)",
        "tool.denied: sums with 1000 need a manager",
        "the user denied this call: sums with 1000 need a manager",
        "(the thread holds 8 messages)",
        "person: edit '99 * 99' to '9 * 9'",
        "assistant: 99 * 99 = 81.",
        "(the thread holds 12 messages)",
        "runs of the thread: 3",
        "2. Cancel after the turn:",
        "tool.completed: 42",
        "flow.cancelled: 'the user said stop'",
    ],
    "11_ndjson.py": [
        "server listening on http://127.0.0.1:",
        "POST /runs -> 201: run run_",
        "-> application/x-ndjson",
        "flow.started",
        "tool.completed",
        "flow.completed",
        "lines; the last is the terminal event",
        "no gap, no duplicate: True",
        "curl -sN",
        "server stopped",
    ],
    "09_agui.py": [
        "server listening on http://127.0.0.1:",
        "POST /agui -> 200 text/event-stream",
        "RUN_STARTED threadId=thread-1 runId=agui-run-1",
        "TEXT_MESSAGE_CONTENT ' calculate'",
        "TOOL_CALL_START calculator",
        "TOOL_CALL_RESULT '100'",
        "RUN_FINISHED threadId=thread-1 runId=agui-run-1 result='25 * 4 = 100.'",
        "messages sent: user, assistant, tool, assistant, user",
        "TOOL_CALL_RESULT '42'",
        "RUN_FINISHED threadId=thread-1 runId=agui-run-2 result='7 * 6 = 42.'",
        "resumed: 15 more, from TOOL_CALL_RESULT '100'",
        "no gap, no duplicate: True",
        "server stopped",
    ],
    "07_integration.py": [
        "settings: cache_size=100, cache_ttl=60 s, metrics=True",
        "services created: settings, cache, telemetry, event_manager, flow_executor",
        "run 1: 'What is 25 * 4?' -> completed: '25 * 4 = 100.' (computed, cached)",
        "run 4: 'What is 25 * 4?' -> completed: '25 * 4 = 100.' (cache hit)",
        "Telemetry (Prometheus text",
        "Cache statistics:",
        "hits 1, misses 3, hit rate 25%",
        "size 3 of at most 100 entries",
        "services torn down",
    ],
    "production_patterns.py": [
        "1. Buffered streaming",
        "token.chunk (",
        "flow.completed",
        "token.received events became",
        "2. Conditional streaming: preset 'essential'",
        "tool.completed: 100",
        "received only: token.received x9, tool.completed x1, flow.completed x1",
        "3. Recording three runs",
        "'What is 2 ^ 10?' -> failed",
        "recorded 79 events to runs.jsonl",
        "live: 3 runs, 79 events, 25 tokens, 5 iterations, 3 tool calls (1 failed), 2 errors",
        "errors: 2 in 2 runs",
        "by error type: {'CalculationError': 1, 'MaxIterationsExceeded': 1}",
        "replayed terminal events: flow.completed, flow.completed, flow.failed",
        "runs in the recording: 3",
        "replay: 3 runs, 79 events",
        "live and replayed figures agree: True",
    ],
    "supervisor.py --runs 12 --concurrency 3": [
        "supervisor: at most 3 flows at once, until 12 runs",
        "completed in",
        "supervisor stopped: 12 flows started; 12 completed",
        "peak concurrency: ",
        "(limit 3)",
    ],
    "websocket_client.py": [
        "connecting to ws://127.0.0.1:",
        "run 1 started: run_",
        "run 2 started: run_",
        "cancelling run 2 over the same connection",
        "Summary, by run:",
        "flow.completed: '25 * 4 = 100.'",
        "flow.cancelled: reason 'cancelled by client'",
        "server stopped",
    ],
}


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    file, *args = shlex.split(name)
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env["TRIOFLOW_PACE"] = "0"
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / file), *args],
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
    on_disk = {p.name for p in EXAMPLES_DIR.glob("*.py")}
    tested = {shlex.split(name)[0] for name in EXAMPLES}
    assert on_disk <= tested, f"examples without a test: {sorted(on_disk - tested)}"
