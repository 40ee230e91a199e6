"""Recording and replay: EventRecorder, replay(), replay_into(), start_replay() and `trioflow replay`."""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import CLI_ENV, timed, trioflow, write_recording
from hypothesis import given, settings
from hypothesis import strategies as st

from trioflow import (
    Agent,
    FlowEvent,
    ModelError,
    Overflow,
    RunStatus,
    ScriptedModel,
    StreamingFlowExecutor,
    Turn,
    cli,
    open_event_bus,
)
from trioflow.builtin import calculator
from trioflow.patterns import MetricsCollector, coalesce_tokens
from trioflow.recording import (
    EventRecorder,
    record,
    replay,
    replay_into,
    start_replay,
)


async def recorded_run(path: Path, model: ScriptedModel | None = None) -> list[FlowEvent]:
    """Run the calculator agent on a shared bus with a recorder; return what a subscriber saw."""
    with EventRecorder(path) as recorder:
        async with open_event_bus() as bus:
            bus.add_listener(recorder, overflow=Overflow.BLOCK)
            async with bus.subscribe() as sub:
                executor = StreamingFlowExecutor(bus=bus)
                await executor.run(Agent(model or ScriptedModel(), tools=[calculator]), "25 * 4")
                bus.close()
                seen = [event async for event in sub]
    return seen


async def replayed(source: Any, **kw: Any) -> list[FlowEvent]:
    async with replay(source, **kw) as events:
        return [event async for event in events]


async def arrival_times(path: Path, **kw: Any) -> list[float]:
    start = trio.current_time()
    async with replay(path, **kw) as events:
        return [trio.current_time() - start async for _ in events]


# -- recording ------------------------------------------------------------------------


async def test_recorder_writes_one_json_line_per_event_equal_to_what_a_subscriber_saw(tmp_path):
    path = tmp_path / "run.jsonl"
    seen = await recorded_run(path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(seen) > 20
    assert [FlowEvent.from_json(line) for line in lines] == seen
    assert lines == [event.to_json() for event in seen]


async def test_recorder_flushes_each_event_as_it_comes(tmp_path):
    path = tmp_path / "live.jsonl"
    with EventRecorder(path) as recorder:
        async with open_event_bus() as bus:
            bus.add_listener(recorder, overflow=Overflow.BLOCK)
            await bus.emit("info", {"message": "one"})
            await trio.testing.wait_all_tasks_blocked()
            assert len(path.read_text().splitlines()) == 1  # on disk while still open
            assert recorder.count == 1


async def test_recorder_types_filter_and_append(tmp_path):
    path = tmp_path / "errors.jsonl"
    for message in ("first", "second"):
        with EventRecorder(path, types={"error"}, append=True) as recorder:
            recorder(FlowEvent.info("ignored"))
            recorder(FlowEvent.error(message))
    assert [e.data["message"] for e in await replayed(path, speed=math.inf)] == [
        "first",
        "second",
    ]


def test_recorder_leaves_a_given_file_open_and_refuses_events_after_close():
    out = io.StringIO()
    recorder = EventRecorder(out)
    recorder(FlowEvent.info("hi"))
    recorder.close()
    assert not out.closed
    assert FlowEvent.from_json(out.getvalue()).data == {"message": "hi"}
    with pytest.raises(trio.ClosedResourceError):
        recorder(FlowEvent.info("late"))


async def test_record_drains_a_live_stream_into_a_file(tmp_path):
    path = tmp_path / "stream.jsonl"
    async with StreamingFlowExecutor().stream(Agent(tools=[calculator]), "25 * 4") as events:
        count = await record(events, path)
    replay_of = await replayed(path, speed=math.inf)
    assert len(replay_of) == count
    assert replay_of[-1].type == "flow.completed"
    assert [e.seq for e in replay_of] == list(range(1, count + 1))


# -- replay ------------------------------------------------------------------------------


async def test_round_trip_replays_the_recording_event_for_event(tmp_path):
    path = tmp_path / "run.jsonl"
    seen = await recorded_run(path)
    again = await replayed(path, speed=math.inf)
    assert again == seen  # type, data, timestamp, seq and run_id
    assert [(e.type, e.seq, e.run_id, e.timestamp) for e in again] == [
        (e.type, e.seq, e.run_id, e.timestamp) for e in seen
    ]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@pytest.mark.filterwarnings("ignore::trioflow.recording.RecordingWarning")  # arbitrary seqs
@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.builds(
            FlowEvent,
            st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8})?", fullmatch=True),
            st.dictionaries(st.text(), json_values, max_size=4),
            st.floats(0, 4e9),
            st.integers(0, 2**53),
            st.none() | st.text(),
        ),
        max_size=20,
    )
)
async def test_any_events_round_trip_through_a_recording(events: list[FlowEvent]):
    out = io.StringIO()
    with EventRecorder(out) as recorder:
        for event in events:
            recorder(event)
    assert out.getvalue().count("\n") == len(events)
    assert await replayed(io.BytesIO(out.getvalue().encode()), speed=math.inf) == events


async def test_replay_keeps_the_original_timing(autojump_clock, tmp_path):
    path = write_recording(tmp_path / "t.jsonl", timed([0, 1, 1, 3.5]))
    assert await arrival_times(path) == [0, 1, 1, 3.5]


async def test_replay_at_double_speed_halves_every_delay(autojump_clock, tmp_path):
    path = write_recording(tmp_path / "t.jsonl", timed([0, 1, 1, 3.5]))
    assert await arrival_times(path, speed=2) == [0, 0.5, 0.5, 1.75]


async def test_replay_as_fast_as_possible_does_not_wait(autojump_clock, tmp_path):
    path = write_recording(tmp_path / "t.jsonl", timed([0, 100, 200]))
    assert await arrival_times(path, speed=math.inf) == [0, 0, 0]


async def test_max_gap_caps_long_pauses_and_backward_timestamps_do_not_wait(
    autojump_clock, tmp_path
):
    path = write_recording(tmp_path / "t.jsonl", timed([0, 1, 3601, 3600, 3602]))
    assert await arrival_times(path, max_gap=2) == [0, 1, 3, 3, 5]


async def test_a_slow_consumer_gets_late_events_without_extra_delay(autojump_clock, tmp_path):
    path = write_recording(tmp_path / "t.jsonl", timed([0, 1, 2, 3, 10]))
    start = trio.current_time()
    times = []
    async with replay(path) as events:
        async for _ in events:
            times.append(trio.current_time() - start)
            await trio.sleep(2.5)  # slower than the recording
    assert times == [0, 2.5, 5, 7.5, 10]  # late, never early, and no drift


async def test_cancelling_a_wait_loses_no_event(autojump_clock, tmp_path):
    path = write_recording(tmp_path / "t.jsonl", timed([0, 5]))
    async with replay(path) as events:
        assert (await events.__anext__()).seq == 1
        with trio.move_on_after(1):
            await events.__anext__()
        assert (await events.__anext__()).seq == 2
        assert trio.current_time() == 5


async def test_peek_shows_the_next_event_without_taking_it(autojump_clock, tmp_path):
    path = write_recording(tmp_path / "t.jsonl", timed([0, 5]))
    async with replay(path) as events:
        first = await events.peek()
        assert first is not None and first.seq == 1
        await trio.sleep(10)  # the timing starts with the first delivery, not the peek
        assert [(e.seq, trio.current_time()) async for e in events] == [(1, 10), (2, 15)]
        assert await events.peek() is None
        assert events.count == 2 and events.line == 2


async def test_blank_lines_are_skipped_and_a_last_line_may_lack_its_line_end():
    events = timed([0, 0])
    data = f"\n{events[0].to_json()}\n\n   \r\n{events[1].to_json()}".encode()
    assert await replayed(io.BytesIO(data), speed=math.inf) == events


async def test_missing_recording_raises_on_entering(tmp_path):
    with pytest.raises(FileNotFoundError):
        async with replay(tmp_path / "nope.jsonl"):
            pass


@pytest.mark.parametrize("kw", [{"speed": 0}, {"speed": -1}, {"speed": math.nan}, {"max_gap": -1}])
async def test_bad_replay_options_are_rejected(kw, tmp_path):
    with pytest.raises(ValueError):
        async with replay(write_recording(tmp_path / "t.jsonl", timed([0])), **kw):
            pass


async def test_a_replay_feeds_the_consumers_of_live_streams(tmp_path):
    path = tmp_path / "run.jsonl"
    seen = await recorded_run(path)
    live = MetricsCollector()
    for event in seen:
        live(event)
    again = MetricsCollector()
    async with replay(path, speed=math.inf) as events:
        async with coalesce_tokens(events, min_chars=1000, interval=None) as chunks:
            async for event in chunks:
                again(event)
    # the same figures, except that fewer events carry them (and the first chunk comes
    # with its last token, so later than the first token)
    different = {"events": 0, "time_to_first_token": None}
    assert replace(again.result(), **different) == replace(live.result(), **different)
    assert again.result().events < live.result().events


# -- replay into a bus, and a replay served like a run -----------------------------------


async def test_replay_into_a_bus_restamps_seqs_and_keeps_the_rest(tmp_path):
    recorded = timed([0, 1, 2])
    path = write_recording(tmp_path / "t.jsonl", recorded)
    async with open_event_bus() as bus:
        await bus.emit("info", {"message": "before"})
        assert await replay_into(bus, path, speed=math.inf) == 3
        async with bus.subscribe(after=1) as sub:
            bus.close()
            received = [event async for event in sub]
    assert [e.seq for e in received] == [2, 3, 4]
    assert [(e.type, e.data, e.timestamp, e.run_id) for e in received] == [
        (e.type, e.data, e.timestamp, e.run_id) for e in recorded
    ]


async def test_start_replay_serves_a_recording_like_a_live_run(autojump_clock, tmp_path):
    path = tmp_path / "run.jsonl"
    seen = await recorded_run(path, ScriptedModel(pace=2))
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        run = await start_replay(path, nursery=nursery)
        assert run.status is RunStatus.RUNNING
        assert run.run_id == seen[0].run_id
        assert run.task == "25 * 4"
        async with run.subscribe(after=0) as events:
            live = [event async for event in events]
        await run.wait()
    assert live == seen  # one run on a fresh bus: even the seqs are the same
    assert run.done and run.status is RunStatus.COMPLETED
    assert run.terminal is not None and run.terminal.type == "flow.completed"
    assert trio.current_time() - start == pytest.approx(seen[-1].timestamp - seen[0].timestamp)
    summary = run.to_dict()
    assert summary["status"] == "completed"
    assert summary["output"] == "Let me calculate that.25 * 4 = 100."
    assert summary["counts"]["tool_calls"] == 1
    assert summary["metadata"]["replay"] == str(path)
    json.dumps(summary)
    async with run.subscribe(after=len(seen) - 1) as late:  # after the end: from the history
        assert [e.type async for e in late] == ["flow.completed"]


async def test_cancelling_a_replay_ends_it(autojump_clock, tmp_path):
    path = write_recording(tmp_path / "t.jsonl", timed([0, 60, 120]))
    async with trio.open_nursery() as nursery:
        run = await start_replay(path, nursery=nursery)
        async with run.subscribe() as events:
            async for event in events:
                assert event.seq == 1
                assert run.cancel("enough")
        assert not run.cancel()
    assert run.status is RunStatus.CANCELLED
    assert run.to_dict()["metadata"]["cancelled"] == "enough"
    assert run.last_seq == 1


# -- the `trioflow replay` command -----------------------------------------------------------


@pytest.fixture(scope="module")
def run_json(tmp_path_factory) -> Path:
    """The output of `trioflow run --json`, as a file."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["run", "What is 25 * 4?", "--json", "--pace", "0"]) == 0
    path = tmp_path_factory.mktemp("cli") / "run.jsonl"
    path.write_text(out.getvalue())
    return path


def test_the_output_of_run_json_replays_to_the_same_json(run_json, run_cli):
    proc = run_cli("replay", str(run_json), "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == run_json.read_text()


def test_replay_shows_the_run_as_run_does(run_json, run_cli):
    proc = run_cli("replay", str(run_json), "--plain", "--speed", "inf")
    assert proc.returncode == 0, proc.stderr
    assert "25 * 4 = 100." in proc.stdout
    assert "calculator" in proc.stdout
    assert "completed in" in proc.stdout


def test_replay_reads_standard_input(run_json, run_cli):
    proc = run_cli("replay", "-", "--json", "--speed", "inf", stdin=run_json.read_text())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == run_json.read_text()


async def test_replay_of_a_failed_run_exits_1(tmp_path):
    path = tmp_path / "failed.jsonl"
    await recorded_run(path, ScriptedModel([Turn(fail=ModelError("overloaded"))]))
    proc = trioflow("replay", str(path), "--plain", "--speed", "inf")
    assert proc.returncode == 1
    assert "failed" in proc.stdout


def test_replay_of_a_missing_file_exits_2(tmp_path, run_cli):
    proc = run_cli("replay", str(tmp_path / "nope.jsonl"))
    assert proc.returncode == 2
    assert "cannot open" in proc.stderr and "nope.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("speed", ["0", "-2", "fast", "nan"])
def test_replay_bad_speed_is_a_usage_error(speed, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["replay", "run.jsonl", "--speed", speed])
    assert info.value.code == 2
    assert "--speed" in capsys.readouterr().err


def test_ctrl_c_stops_a_replay_with_130(tmp_path):
    path = write_recording(tmp_path / "slow.jsonl", timed([0, 3600, 7200]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "trioflow", "replay", str(path), "--json", "--max-gap", "inf"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first event comes at once; the next in an hour
    assert json.loads(first)["id"] == 1
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert rest == ""
