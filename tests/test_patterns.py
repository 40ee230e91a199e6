"""Production patterns: token coalescing, filter presets, metrics and error tracking."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trioflow import (
    TERMINAL_TYPES,
    Agent,
    FlowEvent,
    ModelError,
    Overflow,
    ScriptedModel,
    StreamingFlowExecutor,
    Turn,
    open_event_bus,
)
from trioflow.builtin import calculator
from trioflow.patterns import (
    PRESETS,
    ErrorTracker,
    MetricsCollector,
    TokenCoalescer,
    coalesce_into,
    coalesce_tokens,
    error_type,
    event_predicate,
    filter_events,
    preset,
)


def token(text: str, *, seq: int = 0, run_id: str | None = "r1", ts: float = 1.0) -> FlowEvent:
    return FlowEvent("token.received", {"token": text}, ts, seq, run_id)


async def source(
    events: Sequence[FlowEvent | float], *, error: Exception | None = None
) -> AsyncIterator[FlowEvent]:
    """Yield the events; a number in the sequence sleeps that many seconds."""
    for item in events:
        if isinstance(item, FlowEvent):
            yield item
        else:
            await trio.sleep(item)
    if error is not None:
        raise error


async def coalesced(events: Sequence[FlowEvent | float], **kw) -> list[tuple[float, FlowEvent]]:
    """The coalesced stream, with the Trio time each event reached the consumer."""
    out = []
    async with coalesce_tokens(source(events), **kw) as chunks:
        async for event in chunks:
            out.append((trio.current_time(), event))
    return out


def chunks_of(events: Sequence[FlowEvent]) -> list[str]:
    return [e.data["chunk"] for e in events if e.type == "token.chunk"]


# -- buffered streaming: the token coalescer -----------------------------------------


async def test_tokens_become_chunks_of_at_least_min_chars():
    out = await coalesced([token(t) for t in ["ab", "cd", "e", "fgh", "ij"]], min_chars=4)
    events = [e for _, e in out]
    assert chunks_of(events) == ["abcd", "efgh", "ij"]  # the last one flushed at the end
    assert [e.data["tokens"] for e in events] == [2, 2, 1]
    assert all(e.type == "token.chunk" for e in events)


async def test_chunk_keeps_run_id_timestamp_and_seq_of_its_last_token():
    tokens = [token("ab", seq=3, ts=10.0), token("cd", seq=4, ts=11.0)]
    ((_, chunk),) = await coalesced(tokens, min_chars=4)
    assert chunk == FlowEvent("token.chunk", {"chunk": "abcd", "tokens": 2}, 11.0, 4, "r1")


async def test_interval_flushes_held_tokens_when_the_first_is_that_old(autojump_clock):
    # one token per second, a large min_chars: only the 2.5 s interval flushes
    events: list[FlowEvent | float] = []
    for i in range(7):
        events += [token(str(i)), 1.0]
    out = await coalesced(events, min_chars=1000, interval=2.5)
    assert [(t, e.data["chunk"]) for t, e in out] == [(2.5, "012"), (5.5, "345"), (7.0, "6")]


async def test_whichever_comes_first_size_or_interval(autojump_clock):
    events = [token("aaaa"), token("bb"), 0.2, token("c"), 1.0, token("dddddd")]
    out = await coalesced(events, min_chars=5, interval=0.5)
    assert [(t, e.data["chunk"]) for t, e in out] == [(0.0, "aaaabb"), (0.7, "c"), (1.2, "dddddd")]


async def test_non_token_events_pass_through_in_order_after_the_tokens_before_them():
    started = FlowEvent.tool_started("calculator", {"a": 1}, run_id="r1")
    done = FlowEvent.flow_completed("x", run_id="r1")
    out = await coalesced([token("a"), token("b"), started, token("c"), done], min_chars=100)
    assert [(e.type, e.data.get("chunk")) for _, e in out] == [
        ("token.chunk", "ab"),
        ("tool.started", None),
        ("token.chunk", "c"),
        ("flow.completed", None),
    ]
    assert out[1][1] is started


async def test_tokens_of_different_runs_are_never_mixed():
    out = await coalesced([token("a", run_id="r1"), token("b", run_id="r2")], min_chars=100)
    assert [(e.run_id, e.data["chunk"]) for _, e in out] == [("r1", "a"), ("r2", "b")]


async def test_source_error_comes_after_every_event_before_it():
    seen = []
    with pytest.raises(RuntimeError, match="source broke"):
        async with coalesce_tokens(
            source([token("a"), token("b")], error=RuntimeError("source broke")), min_chars=100
        ) as chunks:
            async for event in chunks:
                seen.append(event)
    assert chunks_of(seen) == ["ab"]


async def test_leaving_the_block_early_stops_reading_the_source(autojump_clock):
    async def endless() -> AsyncIterator[FlowEvent]:
        while True:
            yield token("x")
            await trio.sleep(1)

    async with coalesce_tokens(endless(), min_chars=3, interval=None) as chunks:
        async for event in chunks:
            assert event.data["chunk"] == "xxx"
            break
    assert trio.current_time() == 2.0


async def test_coalescing_a_live_run_keeps_its_text_and_events(autojump_clock):
    model = ScriptedModel(pace=10)
    async with StreamingFlowExecutor().stream(
        Agent(model, tools=[calculator]), "What is 25 * 4?"
    ) as events:
        async with coalesce_tokens(events, min_chars=8, interval=0.25) as chunks:
            out = [event async for event in chunks]
    assert "".join(chunks_of(out)) == "Let me calculate that." + "25 * 4 = 100."
    assert "token.received" not in {e.type for e in out}
    assert out[-1].type == "flow.completed"
    assert sum(e.data["tokens"] for e in out if e.type == "token.chunk") == 9
    seqs = [e.seq for e in out]
    assert seqs == sorted(seqs)


async def test_coalesce_into_re_emits_into_a_bus_with_its_own_seqs():
    async with open_event_bus() as bus:
        async with bus.subscribe() as sub:
            events = [token("ab", seq=7), token("cd", seq=8), FlowEvent.flow_completed(run_id="r1")]
            emitted = await coalesce_into(source(events), bus, min_chars=4)
            bus.close()
            received = [event async for event in sub]
    assert emitted == 2
    assert [(e.seq, e.type) for e in received] == [(1, "token.chunk"), (2, "flow.completed")]
    assert received[0].data == {"chunk": "abcd", "tokens": 2}


@pytest.mark.parametrize(
    "kw",
    [{"min_chars": 0}, {"min_chars": 1.5}, {"interval": 0}, {"interval": -1}, {"buffer": -1}],
)
async def test_bad_coalescer_options_are_rejected(kw):
    with pytest.raises(ValueError):
        async with coalesce_tokens(source([]), **kw):
            pass


@given(
    texts=st.lists(st.text(max_size=6), max_size=30),
    min_chars=st.integers(1, 12),
    breaks=st.sets(st.integers(0, 30)),
)
def test_coalescer_keeps_text_order_and_makes_no_chunk_larger_than_needed(
    texts: list[str], min_chars: int, breaks: set[int]
):
    coalescer = TokenCoalescer(min_chars=min_chars, interval=None)
    stream: list[FlowEvent] = []
    for i, text in enumerate(texts):
        if i in breaks:
            stream.append(FlowEvent("step.started", {"i": i}, 1.0, 0, "r1"))
        stream.append(token(text))
    out = [o for event in stream for o in coalescer.feed(event)] + coalescer.flush()
    # the text and the other events come out in their order
    expected: list[object] = []
    got: list[object] = []
    for event in stream:
        expected.extend(event.data["token"] if event.type == "token.received" else [event])
    for event in out:
        got.extend(event.data["chunk"] if event.type == "token.chunk" else [event])
    assert got == expected
    assert coalescer.pending == 0
    # a chunk is flushed as soon as it is big enough: without its last token, it was not
    pending = list(texts)
    for event in out:
        if event.type == "token.chunk":
            n = event.data["tokens"]
            mine, pending = pending[:n], pending[n:]
            assert n >= 1 and "".join(mine) == event.data["chunk"]
            assert len("".join(mine[:-1])) < min_chars
    assert pending == []


def test_coalescer_flushes_on_reaching_min_chars():
    coalescer = TokenCoalescer(min_chars=3, interval=None)
    assert coalescer.feed(token("a")) == []
    assert coalescer.feed(token("b")) == []
    (chunk,) = coalescer.feed(token("c"))
    assert chunk.data == {"chunk": "abc", "tokens": 3}
    assert coalescer.deadline() == math.inf
    assert coalescer.flush() == []


# -- conditional streaming: filters and presets ---------------------------------------


async def run_with(types) -> list[FlowEvent]:
    async with StreamingFlowExecutor().stream(
        Agent(tools=[calculator]), "What is 25 * 4?", types=types
    ) as events:
        return [event async for event in events]


async def test_essential_preset_keeps_tokens_tool_results_errors_and_terminal_events():
    events = await run_with(preset("essential"))
    assert {e.type for e in events} == {"token.received", "tool.completed", "flow.completed"}
    assert preset("essential") >= {"token.chunk", "tool.failed", "error"} | TERMINAL_TYPES
    assert "tool.started" not in preset("essential")


async def test_verbose_preset_is_everything():
    assert preset("verbose") is None
    events = await run_with(preset("verbose"))
    assert {"flow.started", "add_message", "progress.update", "tool.started"} <= {
        e.type for e in events
    }


async def test_minimal_and_progress_presets():
    assert {e.type for e in await run_with(preset("minimal"))} == {"flow.completed"}
    progress = {e.type for e in await run_with(preset("progress"))}
    assert {"flow.started", "iteration.completed", "progress.update", "tool.started"} <= progress
    assert not progress & {"token.received", "add_message"}


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="essential, minimal, progress, verbose"):
        preset("chatty")
    assert set(PRESETS) == {"essential", "minimal", "progress", "verbose"}


def test_event_predicate_accepts_every_filter_form():
    tok, err = token("a"), FlowEvent.error("boom")
    assert event_predicate(None)(tok)
    assert event_predicate("error")(err)
    assert not event_predicate("error")(tok)
    assert event_predicate(preset("minimal"))(err)
    assert event_predicate(FlowEvent.is_token)(tok)
    with pytest.raises(ValueError):
        event_predicate({"not a type"})


async def test_filter_events_filters_any_stream():
    events = [token("a"), FlowEvent.error("boom"), FlowEvent.flow_failed("x")]
    kept = [e async for e in filter_events(source(events), preset("minimal"))]
    assert [e.type for e in kept] == ["error", "flow.failed"]


# -- metrics ---------------------------------------------------------------------------


async def run_on_shared_bus(*listeners, runs=(("What is 25 * 4?", None),)):
    results = []
    async with open_event_bus() as bus:
        for listener in listeners:
            bus.add_listener(listener, overflow=Overflow.BLOCK)
        executor = StreamingFlowExecutor(bus=bus)
        for task, model in runs:
            agent = Agent(model or ScriptedModel(pace=1), tools=[calculator])
            results.append(await executor.run(agent, task))
    return results


async def test_metrics_of_a_known_scripted_run(autojump_clock):
    metrics = MetricsCollector()
    (result,) = await run_on_shared_bus(metrics)
    m = metrics.result()
    assert m.run_id == result.run_id
    assert m.status == "completed"
    assert m.runs == 1
    assert m.tokens == 9  # "Let me calculate that." + "25 * 4 = 100." as word deltas
    assert m.characters == len("Let me calculate that." + "25 * 4 = 100.")
    assert m.iterations == 2
    assert m.tool_calls == 1
    assert m.tools == {"calculator": 1}
    assert m.tool_failures == m.errors == m.warnings == 0
    assert (m.input_tokens, m.output_tokens) == (
        result.usage.input_tokens,
        result.usage.output_tokens,
    )
    # one token per second of the MockClock, and as long for each of the 4 deltas of the
    # calculator's streamed input (a paced ScriptedModel streams tool input: "" and 3 pieces)
    assert m.duration == result.duration == 13.0
    assert m.tokens_per_second == 9 / 13
    assert m.time_to_first_token is not None and m.time_to_first_token >= 0
    assert json.loads(json.dumps(m.to_dict()))["tools"] == {"calculator": 1}


async def test_metrics_per_run_and_totals(autojump_clock):
    metrics = MetricsCollector()
    failing = ScriptedModel([Turn(text="a b", fail=ModelError("down"), fail_after=2)], pace=1)
    r1, r2 = await run_on_shared_bus(metrics, runs=[("What is 25 * 4?", None), ("go", failing)])
    by_run = metrics.by_run()
    assert list(by_run) == [r1.run_id, r2.run_id]
    assert by_run[r2.run_id].status == "failed"
    assert by_run[r2.run_id].errors == 2  # iteration.failed and flow.failed
    total = metrics.result()
    assert total.run_id is None and total.status is None
    assert total.runs == 2
    assert total.tokens == by_run[r1.run_id].tokens + by_run[r2.run_id].tokens == 11
    assert total.duration == r1.duration + r2.duration
    assert total.tokens_per_second == total.tokens / total.duration
    assert metrics.result(r2.run_id) == by_run[r2.run_id]
    with pytest.raises(KeyError):
        metrics.result("nope")


def test_metrics_from_timestamps_when_the_terminal_event_has_no_duration():
    metrics = MetricsCollector(run_id="r1")
    for event in [
        FlowEvent("flow.started", {}, 100.0, 1, "r1"),
        FlowEvent("token.received", {"token": "ab"}, 100.5, 2, "r1"),
        FlowEvent("token.received", {"token": "x"}, 100.7, 3, "other"),
        FlowEvent("token.chunk", {"chunk": "cdef", "tokens": 3}, 101.0, 4, "r1"),
        FlowEvent("flow.completed", {}, 102.0, 5, "r1"),
    ]:
        metrics(event)
    m = metrics.result()
    assert (m.tokens, m.characters, m.events) == (4, 6, 4)
    assert m.duration == 2.0
    assert m.time_to_first_token == 0.5
    assert m.tokens_per_second == 2.0
    metrics.reset()
    assert metrics.result().events == 0


# -- error tracking ----------------------------------------------------------------------


async def test_error_tracker_counts_a_failing_tool_and_a_failing_model():
    errors = ErrorTracker()
    model = ScriptedModel(
        [
            Turn(tool_calls=[("calculator", {"operation": "divide", "a": 1, "b": 0})]),
            Turn(fail=ModelError("overloaded", kind="overloaded")),
        ]
    )
    (result,) = await run_on_shared_bus(errors, runs=[("1/0", model)])
    assert errors.total == 3
    assert errors.counts == {"tool.failed": 1, "iteration.failed": 1, "flow.failed": 1}
    assert errors.error_types == {"CalculationError": 1, "ModelError": 2}
    assert [e.type for e in errors.errors] == ["tool.failed", "iteration.failed", "flow.failed"]
    assert errors.for_run(result.run_id) == errors.errors
    summary = errors.summary()
    assert summary.total == 3
    assert summary.runs == 1
    assert summary.last is not None and summary.last.type == "flow.failed"
    assert json.loads(json.dumps(summary.to_dict()))["by_error_type"]["ModelError"] == 2


def test_error_tracker_keeps_only_the_last_errors_but_counts_them_all():
    errors = ErrorTracker(limit=2)
    for i in range(5):
        errors(FlowEvent.error(f"e{i}"))
        errors(token("not an error"))
    assert errors.total == 5
    assert [e.data["message"] for e in errors.errors] == ["e3", "e4"]
    assert errors.error_types == {"unknown": 5}
    errors.reset()
    assert errors.total == 0 and errors.errors == ()
    with pytest.raises(ValueError):
        ErrorTracker(limit=-1)


def test_error_type_reads_the_error_details():
    assert error_type(FlowEvent.tool_failed("t", ValueError("x"))) == "ValueError"
    assert error_type(FlowEvent.error("x", error="plain text")) == "Error"
    assert error_type(FlowEvent.error("x")) == "unknown"
