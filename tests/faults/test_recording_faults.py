"""Faults in recordings and how replays survive them: the recording/replay part of the fault suite.

Corrupted, truncated, overlong and deeply nested lines; recordings without
events; timestamp jumps; and events that one recorded run would not produce
(seq gaps, a second terminal event, several run ids). Each test names the
guarantee it proves.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import CLI_ENV, timed, write_recording

from trioflow import FlowEvent, RunStatus, cli, open_event_bus
from trioflow.cli import _replay as replay_command
from trioflow.cli._common import MAX_WARNINGS
from trioflow.patterns import coalesce_tokens
from trioflow.recording import (
    DEFAULT_MAX_GAP,
    MAX_LINE_BYTES,
    RecordingError,
    RecordingWarning,
    replay,
    replay_into,
    start_replay,
)

SERVE = [sys.executable, "-m", "trioflow", "serve", "--port", "0", "--model", "scripted"]
DEEP = "[" * 30_000
"""A short line nested 30,000 levels deep: ``json.loads`` raises RecursionError on it."""
DEEP_EVENT = '{"type": "info", "data": {"a": ' + "[" * 30_000 + "]" * 30_000 + "}}"
"""A well-formed event whose data nests 30,000 levels deep."""


async def replayed(source: Any, **kw: Any) -> list[FlowEvent]:
    async with replay(source, **kw) as events:
        return [event async for event in events]


def main(*argv: str) -> int:
    """Run the ``trioflow`` command in this process (its output goes to capsys)."""
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def run_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output of `trioflow run --json` (run in this process), as a file."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main("run", "What is 25 * 4?", "--json", "--pace", "0", "--model", "scripted")
    assert status == 0
    path = tmp_path_factory.mktemp("cli") / "run.jsonl"
    path.write_text(out.getvalue())
    return path


# -- lines that are not events: RecordingError with the line, after the valid events ---------


async def test_corrupted_line_is_reported_with_its_number_after_the_valid_events(tmp_path):
    lines = [e.to_json() for e in timed([0, 0, 0, 0])]
    lines[2] = '{"id": 3, "type": "token.rec'  # a line cut short, then more lines
    path = tmp_path / "corrupt.jsonl"
    path.write_text("\n".join(lines) + "\n")
    seen = []
    with pytest.raises(RecordingError) as info:
        async with replay(path, speed=math.inf) as events:
            async for event in events:
                seen.append(event)
    assert [e.seq for e in seen] == [1, 2]
    assert info.value.line == 3
    assert info.value.path == str(path)
    assert not info.value.truncated
    assert isinstance(info.value, ValueError)
    assert f"{path}, line 3" in str(info.value)


async def test_truncated_last_line_is_reported_after_the_valid_events(tmp_path):
    text = "".join(e.to_json() + "\n" for e in timed([0, 0, 0]))
    path = tmp_path / "cut.jsonl"
    path.write_text(text[:-20])  # the writer died in the middle of the third line
    seen = []
    with pytest.raises(RecordingError, match="truncated") as info:
        async with replay(path, speed=math.inf) as events:
            async for event in events:
                seen.append(event)
    assert [e.seq for e in seen] == [1, 2]
    assert (info.value.line, info.value.truncated) == (3, True)


async def test_iteration_ends_after_a_recording_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" + timed([0])[0].to_json() + "\n")
    async with replay(path) as events:
        with pytest.raises(RecordingError):
            await events.__anext__()
        assert [e async for e in events] == []


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"data": {}}', "'type' is missing"),
        (b"[1, 2]", "JSON object"),
        (b'{"type": "token.received", "id": -1}', "'id'"),
        (b'{"type": "bad type"}', "'type'"),
        (b'{"type": "info", "data": {"m": "\xff\xfe"}}', "not an event"),
    ],
)
async def test_lines_that_are_not_events_are_corrupted(line: bytes, reason: str):
    data = timed([0])[0].to_json().encode() + b"\n" + line + b"\n"
    with pytest.raises(RecordingError, match=reason) as info:
        await replayed(io.BytesIO(data))
    assert info.value.line == 2


async def test_an_overlong_line_is_corrupted_not_buffered_for_ever():
    data = b'{"type": "info", "data": {"m": "' + b"x" * (MAX_LINE_BYTES + 1)
    with pytest.raises(RecordingError, match="longer than") as info:
        await replayed(io.BytesIO(timed([0])[0].to_json().encode() + b"\n" + data))
    assert info.value.line == 2


async def test_a_corrupted_line_reaches_a_coalesced_consumer_after_the_chunks(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(e.to_json() + "\n" for e in timed([0, 0])) + "garbage\n")
    chunks_seen = []
    with pytest.raises(RecordingError):
        async with replay(path) as events:
            async with coalesce_tokens(events, min_chars=1000) as chunks:
                async for chunk in chunks:
                    chunks_seen.append(chunk.data["chunk"])
    assert chunks_seen == ["01"]


async def test_replay_into_emits_the_valid_events_before_raising(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(timed([0])[0].to_json() + "\n{broken\n")
    async with open_event_bus() as bus:
        with pytest.raises(RecordingError):
            await replay_into(bus, path, run_id="renamed")
        assert bus.last_seq == 1
        (event,) = await bus.history.read(0, 1)
        assert event.run_id == "renamed"


async def test_a_replayed_corrupted_recording_ends_with_an_error_event(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(timed([0])[0].to_json() + "\n{broken\n")
    async with trio.open_nursery() as nursery:
        run = await start_replay(path, nursery=nursery, speed=math.inf)
        async with run.subscribe() as events:
            received = [event async for event in events]
    assert [e.type for e in received] == ["token.received", "error"]
    assert received[1].data["line"] == 2
    assert received[1].run_id == "r1"
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error.line == 2


async def test_start_replay_fails_fast_on_a_missing_or_foreign_file(tmp_path):
    async with trio.open_nursery() as nursery:
        with pytest.raises(FileNotFoundError):
            await start_replay(tmp_path / "nope.jsonl", nursery=nursery)
        (tmp_path / "notes.txt").write_text("these are not events\n")
        with pytest.raises(RecordingError):
            await start_replay(tmp_path / "notes.txt", nursery=nursery)


def test_replay_of_a_corrupted_recording_shows_the_valid_events_then_exits_1(
    run_json, tmp_path, run_cli
):
    lines = run_json.read_text().splitlines(keepends=True)
    path = tmp_path / "corrupt.jsonl"
    path.write_text("".join(lines[:5]) + "{not json\n" + "".join(lines[5:]))
    proc = run_cli("replay", str(path), "--json", "--speed", "inf")
    assert proc.returncode == 1
    assert proc.stdout == "".join(lines[:5])
    assert f"{path}, line 6" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_replay_of_a_truncated_recording_exits_1(run_json, tmp_path, run_cli):
    path = tmp_path / "cut.jsonl"
    text = run_json.read_text()
    path.write_text(text[: text.rindex("\n", 0, -1) + 30])
    proc = run_cli("replay", str(path), "--json", "--speed", "inf")
    assert proc.returncode == 1
    assert "truncated" in proc.stderr
    assert f"line {len(text.splitlines())}" in proc.stderr


@pytest.mark.parametrize("deep", [DEEP, DEEP_EVENT], ids=["open-brackets", "deep-data"])
async def test_a_deeply_nested_line_is_a_recording_error_not_a_recursion_error(tmp_path, deep):
    events = timed([0, 0])
    path = tmp_path / "deep.jsonl"
    path.write_text(f"{events[0].to_json()}\n{deep}\n{events[1].to_json()}\n")
    seen = []
    with pytest.raises(RecordingError, match="nested deeper than") as info:
        async with replay(path, speed=math.inf) as events_:
            async for event in events_:
                seen.append(event)
    assert seen == events[:1]
    assert (info.value.path, info.value.line) == (str(path), 2)
    assert str(info.value).startswith(f"{path}, line 2: not an event")


def test_from_json_refuses_deep_nesting_nan_and_lone_surrogates_with_a_value_error():
    for text in (DEEP, DEEP_EVENT, '{"type": "info", "timestamp": NaN}', '{"type": "\\ud800"}'):
        with pytest.raises(ValueError, match="not valid JSON"):
            FlowEvent.from_json(text)


async def test_a_served_replay_with_a_deep_line_serves_the_events_before_it_then_an_error(
    tmp_path,
):
    path = tmp_path / "deep.jsonl"
    path.write_text(f"{timed([0])[0].to_json()}\n{DEEP}\n")
    async with trio.open_nursery() as nursery:
        run = await start_replay(path, nursery=nursery, speed=math.inf)
        async with run.subscribe() as events:
            received = [event async for event in events]
    assert [e.type for e in received] == ["token.received", "error"]
    assert received[1].data["line"] == 2
    assert "nested deeper than" in received[1].data["reason"]
    assert run.status is RunStatus.FAILED


def test_serve_replay_of_a_deep_first_line_exits_1_with_one_line(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text(f"{DEEP}\n{timed([0])[0].to_json()}\n")
    assert main("serve", "--port", "0", "--model", "scripted", "--replay", str(path)) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"trioflow serve: cannot replay {path}, line 1: not an event: "
        "event is not valid JSON: nested deeper than 64 levels"
    ]


def test_replay_command_of_a_deep_line_shows_the_events_before_it_then_exits_1(
    run_json, tmp_path, capsys
):
    lines = run_json.read_text().splitlines(keepends=True)
    path = tmp_path / "deep.jsonl"
    path.write_text("".join(lines[:3]) + DEEP + "\n" + "".join(lines[3:]))
    assert main("replay", str(path), "--json", "--speed", "inf") == 1
    out, err = capsys.readouterr()
    assert out == "".join(lines[:3])
    assert (
        err
        == f"trioflow replay: {path}, line 4: not an event: event is not valid JSON: nested deeper than 64 levels\n"
    )


# -- recordings without events ---------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n \n\r\n\t\n"], ids=["empty", "blank-lines"])
def test_replay_command_of_a_recording_without_events_says_so_and_exits_1(tmp_path, capsys, text):
    path = tmp_path / "nothing.jsonl"
    path.write_text(text)
    assert main("replay", str(path), "--plain") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"trioflow replay: {path}: holds no events (it is empty or holds only blank lines)\n"
    )


@pytest.mark.parametrize("text", ["", "\n \n\r\n\t\n"], ids=["empty", "blank-lines"])
def test_serve_replay_of_a_recording_without_events_says_so_and_exits_1(tmp_path, capsys, text):
    path = tmp_path / "nothing.jsonl"
    path.write_text(text)
    assert main("serve", "--port", "0", "--model", "scripted", "--replay", str(path)) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"trioflow serve: cannot replay {path}: "
        "holds no events (it is empty or holds only blank lines)"
    ]


def test_an_empty_recording_read_from_standard_input_says_so(run_cli):
    proc = run_cli("replay", "-", "--json", stdin="\n\n")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (
        "trioflow replay: <stdin>: holds no events (it is empty or holds only blank lines)\n"
    )


# -- timestamp jumps: every pause is capped at max_gap (5 s by default) -------------------------


async def _replay_with_defaults(api: str, path: Path, **kw: Any) -> None:
    if api == "replay":
        await replayed(path, **kw)
    elif api == "replay_into":
        async with open_event_bus() as bus:
            await replay_into(bus, path, **kw)
    else:
        async with trio.open_nursery() as nursery:
            run = await start_replay(path, nursery=nursery, **kw)
            await run.wait()


@pytest.mark.parametrize("api", ["replay", "replay_into", "start_replay"])
async def test_a_huge_timestamp_jump_waits_at_most_the_default_max_gap(
    autojump_clock, tmp_path, api
):
    # a corrupted clock: the third event is stamped 30 years after the second
    path = write_recording(tmp_path / "jump.jsonl", timed([0, 1, 1e9, 1e9 + 1]))
    start = trio.current_time()
    await _replay_with_defaults(api, path)
    assert DEFAULT_MAX_GAP == 5
    assert trio.current_time() - start == 1 + 5 + 1


async def test_max_gap_is_in_recorded_seconds_and_inf_or_none_disables_it(autojump_clock, tmp_path):
    path = write_recording(tmp_path / "jump.jsonl", timed([0, 1, 3600]))

    async def arrivals(**kw: Any) -> list[float]:
        start = trio.current_time()
        async with replay(path, **kw) as events:
            return [trio.current_time() - start async for _ in events]

    assert await arrivals() == [0, 1, 6]
    assert await arrivals(speed=2) == [0, 0.5, 3]  # the cap applies before the speed
    assert await arrivals(speed=0.5) == [0, 2, 12]
    assert await arrivals(max_gap=math.inf) == [0, 1, 3600]
    assert await arrivals(max_gap=None) == [0, 1, 3600]
    assert await arrivals(max_gap=0) == [0, 0, 0]


def test_replay_and_serve_default_to_the_5_s_max_gap_and_take_inf(capsys):
    from trioflow.cli import _serve as serve_command

    for module, argv in ((replay_command, ["f.jsonl"]), (serve_command, ["--replay", "f.jsonl"])):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert parser.parse_args(argv).max_gap == 5
        assert parser.parse_args([*argv, "--max-gap", "inf"]).max_gap == math.inf
        assert parser.parse_args([*argv, "--max-gap", "0"]).max_gap == 0
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--max-gap", "nan"])


# -- events one recorded run would not produce: RecordingWarning, and the replay goes on -------


def _event(etype: str, seq: int, run_id: str = "r1", **data: Any) -> FlowEvent:
    return FlowEvent(etype, data, 1_700_000_000.0, seq, run_id)


async def _warnings_of(path: Path) -> tuple[list[FlowEvent], list[RecordingWarning]]:
    found: list[RecordingWarning] = []
    async with replay(path, speed=math.inf, on_warning=found.append) as events:
        return [event async for event in events], found


async def test_a_gap_in_the_seqs_is_a_warning_and_the_replay_goes_on(tmp_path):
    recorded = [_event("info", seq) for seq in (1, 2, 5, 6, 7, 7)]
    seen, found = await _warnings_of(write_recording(tmp_path / "gap.jsonl", recorded))
    assert seen == recorded
    assert [(w.kind, w.line, w.path) for w in found] == [
        ("seq", 3, str(tmp_path / "gap.jsonl")),
        ("seq", 6, str(tmp_path / "gap.jsonl")),
    ]
    assert found[0].reason == "seq 5 follows seq 2: seq 3-4 missing"
    assert found[1].reason == "seq 7 follows seq 7: out of order or repeated"
    assert (
        str(found[0]) == f"{tmp_path / 'gap.jsonl'}, line 3: seq 5 follows seq 2: seq 3-4 missing"
    )


async def test_a_second_terminal_event_of_a_run_is_a_warning(tmp_path):
    recorded = [
        _event("flow.started", 1),
        _event("flow.completed", 2),
        _event("flow.failed", 3),
    ]
    seen, found = await _warnings_of(write_recording(tmp_path / "twice.jsonl", recorded))
    assert seen == recorded
    assert [(w.kind, w.line) for w in found] == [("terminal", 3)]
    assert "first is on line 2" in found[0].reason


async def test_a_second_run_id_is_a_warning_once(tmp_path):
    recorded = [
        _event("flow.started", 1, "r1"),
        _event("flow.completed", 2, "r1"),
        _event("flow.started", 3, "r2"),
        _event("flow.completed", 4, "r2"),  # a terminal of another run: no warning
        _event("info", 5, "r1"),
        _event("info", 6, "r2"),
    ]
    seen, found = await _warnings_of(write_recording(tmp_path / "two-runs.jsonl", recorded))
    assert seen == recorded
    assert [(w.kind, w.line) for w in found] == [("run_id", 3)]
    assert (
        found[0].reason == "run id 'r2' after events of run 'r1': the recording holds several runs"
    )


async def test_a_recorded_run_replays_without_warnings(run_json):
    seen, found = await _warnings_of(run_json)
    assert seen[-1].type == "flow.completed"
    assert found == []


async def test_without_on_warning_recording_warnings_are_python_warnings(tmp_path):
    path = write_recording(tmp_path / "gap.jsonl", [_event("info", 1), _event("info", 3)])
    with pytest.warns(RecordingWarning, match=r"line 2: seq 3 follows seq 1: seq 2 missing") as rec:
        assert len(await replayed(path, speed=math.inf)) == 2
    (warning,) = [w.message for w in rec]
    assert isinstance(warning, RecordingWarning) and warning.kind == "seq"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecordingWarning)
        with pytest.raises(RecordingWarning):
            await replayed(path, speed=math.inf)


async def test_start_replay_reports_warnings_to_on_warning(tmp_path):
    path = write_recording(tmp_path / "gap.jsonl", [_event("info", 1), _event("info", 3)])
    found: list[RecordingWarning] = []
    async with trio.open_nursery() as nursery:
        run = await start_replay(path, nursery=nursery, speed=math.inf, on_warning=found.append)
        await run.wait()
    assert [(w.kind, w.line) for w in found] == [("seq", 2)]
    assert run.last_seq == 2


def test_replay_command_prints_warnings_and_keeps_replaying(run_json, tmp_path, capsys):
    lines = run_json.read_text().splitlines(keepends=True)
    path = tmp_path / "gaps.jsonl"
    kept = lines[:1] + lines[2:] + lines[-1:]  # seq 2 lost; the terminal event twice
    path.write_text("".join(kept))
    assert main("replay", str(path), "--json", "--speed", "inf") == 0
    out, err = capsys.readouterr()
    assert out == "".join(kept)
    assert err.splitlines() == [
        f"trioflow replay: warning: {path}, line 2: seq 3 follows seq 1: seq 2 missing",
        f"trioflow replay: warning: {path}, line {len(kept)}: seq {len(lines)} follows seq "
        f"{len(lines)}: out of order or repeated",
        f"trioflow replay: warning: {path}, line {len(kept)}: a second terminal event "
        f"(flow.completed) of run {json.loads(kept[0])['run_id']!r}; the first is on line "
        f"{len(kept) - 1}",
    ]


def test_replay_command_shows_at_most_10_warnings_of_a_kind(tmp_path, capsys):
    path = write_recording(tmp_path / "odd.jsonl", [_event("info", seq) for seq in range(1, 30, 2)])
    assert main("replay", str(path), "--json", "--speed", "inf") == 1  # no terminal event
    err = capsys.readouterr().err.splitlines()
    assert len(err) == MAX_WARNINGS + 1
    assert err[-1].endswith("seq 22 missing (further seq warnings not shown)")


def test_serve_replay_serves_the_valid_part_of_a_deep_recording_and_prints_its_warnings(
    tmp_path,
):
    import httpx

    path = tmp_path / "deep.jsonl"
    path.write_text(
        f"{_event('flow.started', 1).to_json()}\n{_event('info', 3).to_json()}\n{DEEP}\n"
    )
    proc = subprocess.Popen(
        [*SERVE, "--replay", str(path), "--speed", "inf"],
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    try:
        assert proc.stderr is not None
        lines = []
        while not lines or "replaying" not in lines[-1]:
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        events_url = lines[-1].rsplit(" ", 1)[1].strip()
        with httpx.Client(timeout=10) as http:
            stream = http.get(events_url).text  # ends when the replay has ended
            view = http.get(events_url.removesuffix("/events")).json()
        received = [line[7:] for line in stream.splitlines() if line.startswith("event: ")]
        assert view["status"] == "failed"
        assert "line 3: not an event" in view["metadata"]["error"]
        assert received == ["flow.started", "info", "run.error"]  # SSE renames "error"
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 0
    err = "".join(lines) + rest
    assert f"trioflow serve: warning: {path}, line 2: seq 3 follows seq 1: seq 2 missing\n" in err
    assert "Traceback" not in err


# -- what a replayed run reports is what the live run reported ------------------------------


async def test_a_replayed_run_with_a_retried_cut_reports_only_the_attempt_that_counted(tmp_path):
    t0 = 1_700_000_000.0
    events = [
        FlowEvent("token.received", {"token": "Hello "}, t0, 1, "r1"),
        FlowEvent("token.received", {"token": "the"}, t0, 2, "r1"),
        FlowEvent("warning", {"message": "retrying", "discarded_tokens": 2}, t0, 3, "r1"),
        FlowEvent("token.received", {"token": "Hello "}, t0, 4, "r1"),
        FlowEvent("token.received", {"token": "there."}, t0, 5, "r1"),
    ]
    path = write_recording(tmp_path / "cut.jsonl", events)
    async with trio.open_nursery() as nursery:
        run = await start_replay(path, nursery=nursery, speed=math.inf)
        await run.wait()
    assert run.to_dict()["output"] == "Hello there."
