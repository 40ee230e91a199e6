"""The ``trioflow`` command: exit status and output in process (``cli``), and as a real
process where the process is the point (signals, ``python -m``, what an import loads)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from conftest import CLI_ENV, trioflow

from trioflow import FlowEvent

if TYPE_CHECKING:
    from conftest import RunCli


def test_run_json_writes_one_event_per_line_and_exits_0(run_cli: RunCli) -> None:
    proc = run_cli("run", "What is 25 * 4?", "--json", "--pace", "0")
    assert proc.returncode == 0, proc.stderr
    events = [FlowEvent.from_json(line) for line in proc.stdout.splitlines()]
    assert events[0].type == "flow.started"
    assert events[-1].type == "flow.completed"
    assert events[-1].data["output"] == "25 * 4 = 100."
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert any(e.type == "tool.completed" and e.data["result"] == 100 for e in events)


def test_run_plain_shows_tokens_tool_call_and_result(run_cli: RunCli) -> None:
    proc = run_cli("run", "What is 25 * 4?", "--plain", "--pace", "0")
    assert proc.returncode == 0, proc.stderr
    assert "calculator" in proc.stdout
    assert "= 100" in proc.stdout
    assert "25 * 4 = 100." in proc.stdout
    assert "completed in" in proc.stdout


@pytest.mark.parametrize(("answer", "ran"), [("y\n", True), ("n\n", False), ("", False)])
def test_run_approve_asks_on_the_terminal_before_each_tool_call(
    run_cli: RunCli, answer: str, ran: bool
) -> None:
    proc = run_cli("run", "What is 25 * 4?", "--plain", "--pace", "0", "--approve", stdin=answer)
    assert proc.returncode == 0, proc.stderr
    assert 'run calculator with {"operation": "evaluate", "expression": "25 * 4"}? [y/N]' in (
        proc.stderr
    )
    assert "waits for approval" in proc.stdout
    assert ("= 100" in proc.stdout) is ran
    assert ("denied: denied on the terminal" in proc.stdout) is not ran
    assert ("25 * 4 = 100." in proc.stdout) is ran


def test_run_approve_json_has_the_approval_events(run_cli: RunCli) -> None:
    proc = run_cli("run", "What is 25 * 4?", "--json", "--pace", "0", "--approve", stdin="yes\n")
    types = [FlowEvent.from_json(line).type for line in proc.stdout.splitlines()]
    assert types.index("tool.approval_required") < types.index("tool.approved")
    assert types.index("tool.approved") < types.index("tool.started")


def test_run_rich_view_shows_the_answer_and_completion(run_cli: RunCli) -> None:
    proc = run_cli("run", "What is 25 * 4?", "--pace", "0")
    assert proc.returncode == 0, proc.stderr
    assert "25 * 4 = 100." in proc.stdout
    assert "completed" in proc.stdout


def test_timeout_exits_1_with_flow_cancelled(run_cli: RunCli) -> None:
    proc = run_cli("run", "tell me about trio", "--json", "--pace", "1", "--timeout", "0.5")
    assert proc.returncode == 1
    last = FlowEvent.from_json(proc.stdout.splitlines()[-1])
    assert last.type == "flow.cancelled"
    assert last.data["reason"] == "timeout"


def test_max_iterations_usage_error_exits_2(run_cli: RunCli) -> None:
    proc = run_cli("run", "x", "--max-iterations", "0")
    assert proc.returncode == 2
    assert "max-iterations" in proc.stderr


def test_unknown_model_is_a_clear_error(run_cli: RunCli) -> None:
    proc = run_cli("run", "x", "--model", "gpt-9")
    assert proc.returncode == 2
    assert "unknown model" in proc.stderr


def test_claude_without_key_is_a_clear_error(run_cli: RunCli) -> None:
    proc = run_cli("run", "x", "--model", "claude")
    assert proc.returncode == 1
    assert "ANTHROPIC_API_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_prints_flow_cancelled_and_exits_130():
    proc = subprocess.Popen(
        [sys.executable, "-m", "trioflow", "run", "a long story", "--json", "--pace", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    assert proc.stdout is not None
    # Wait until the run is streaming tokens, then interrupt it.
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        if json.loads(line)["type"] == "token.received":
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    last = FlowEvent.from_json(rest.splitlines()[-1])
    assert last.type == "flow.cancelled"
    assert last.data["reason"] == "interrupted"


def test_python_dash_m_and_version():
    proc = trioflow("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("trioflow ")


def test_run_reads_defaults_from_settings_environment(
    run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOFLOW_MAX_ITERATIONS", "1")
    proc = run_cli("run", "What is 25 * 4?", "--json", "--pace", "0")
    assert proc.returncode == 1  # one iteration is not enough for a tool call and an answer
    last = FlowEvent.from_json(proc.stdout.splitlines()[-1])
    assert last.data["reason"] == "max_iterations"


def test_bad_settings_environment_is_a_usage_error(
    run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOFLOW_MAX_ITERATIONS", "many")
    proc = run_cli("run", "x")
    assert proc.returncode == 2
    assert "TRIOFLOW_MAX_ITERATIONS" in proc.stderr


HEAVY = (
    "starlette",
    "hypercorn",
    "httpx",
    "httpx2",
    "trio_websocket",
    "anthropic",
    "openai",
    "rich",
    "opentelemetry",
    "coredis",
    "anyio",
)
"""The optional dependencies that neither ``import trioflow`` nor the parser may load."""


def heavy_modules_after(code: str) -> list[str]:
    """The heavy modules (and ``trioflow.cli``'s) loaded after running ``code`` in a new interpreter."""
    probe = (
        f"{code}\nimport sys\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['trioflow', 'cli']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, *HEAVY],
        capture_output=True,
        text=True,
        timeout=60,
        env=CLI_ENV,
        check=True,
    )
    heavy, cli = proc.stdout.splitlines()[-2:]
    return [*json.loads(heavy.replace("'", '"')), *json.loads(cli.replace("'", '"'))]


def test_import_trioflow_loads_no_web_stack_and_no_cli():
    assert heavy_modules_after("import trioflow") == []


def test_the_parser_loads_no_web_stack():
    loaded = heavy_modules_after("from trioflow.cli import build_parser\nbuild_parser()")
    assert not set(loaded) & set(HEAVY), loaded


def test_run_json_loads_no_web_stack():
    code = (
        "import contextlib, io\nfrom trioflow.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['run', 'What is 25 * 4?', '--json', '--pace', '0']) == 0"
    )
    loaded = heavy_modules_after(code)
    assert not set(loaded) & set(HEAVY), loaded


def test_feature_packages_do_not_import_the_cli():
    code = "import trioflow.web._app, trioflow.web._defaults, trioflow.client, trioflow.recording"
    loaded = heavy_modules_after(code)
    assert not [m for m in loaded if m.startswith("trioflow.")], loaded


def test_python_dash_m_trioflow_cli_is_the_command_too():
    proc = subprocess.run(
        [sys.executable, "-m", "trioflow.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=CLI_ENV,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("trioflow ")
