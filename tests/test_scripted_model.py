from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trioflow.builtin import calculator
from trioflow.models._base import (
    Message,
    Model,
    ModelError,
    ModelEvent,
    RetryNotice,
    StopReason,
    TextBlock,
    TextDelta,
    ToolCall,
    ToolInputDelta,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    TurnEnd,
    Usage,
)
from trioflow.models._scripted import ScriptedModel, Turn, find_expression, tokenize

CALCULATOR = calculator.spec()
OTHER_TOOL = ToolSpec("search", "Search.", {"type": "object", "properties": {}})


async def play(
    model: ScriptedModel,
    messages: Sequence[Message],
    tools: Sequence[ToolSpec] = (),
    system: str | None = None,
) -> list[ModelEvent]:
    async with model.stream(messages, tools=tools, system=system) as events:
        return [event async for event in events]


async def collect_into(
    received: list[ModelEvent], model: ScriptedModel, messages: Sequence[Message]
) -> None:
    async with model.stream(messages) as events:
        async for event in events:
            received.append(event)


def text_of(events: Sequence[ModelEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def turn_end(events: Sequence[ModelEvent]) -> TurnEnd:
    assert isinstance(events[-1], TurnEnd)
    assert sum(isinstance(e, TurnEnd) for e in events) == 1
    return events[-1]


def after_calculator(
    question: str, call: ToolCall, content: str, *, is_error: bool = False
) -> list[Message]:
    return [
        Message.user(question),
        Message(
            "assistant",
            (TextBlock("Let me calculate that."), ToolUseBlock(call.id, call.name, call.input)),
        ),
        Message("user", (ToolResultBlock(call.id, content, is_error),)),
    ]


# -- protocol and tokens ---------------------------------------------------------------


def test_scripted_model_implements_the_model_protocol() -> None:
    model = ScriptedModel()
    assert isinstance(model, Model)
    assert model.name == "scripted"


def test_tokenize_splits_words_keeping_leading_spaces() -> None:
    assert tokenize("Let me calculate that.") == ["Let", " me", " calculate", " that."]


@given(st.text())
def test_tokenize_round_trips(text: str) -> None:
    assert "".join(tokenize(text)) == text


@pytest.mark.parametrize("pace", [-1, float("inf"), float("nan")])
def test_invalid_pace_raises_ValueError(pace: float) -> None:
    with pytest.raises(ValueError, match="pace must be a non-negative number"):
        ScriptedModel(pace=pace)


# -- the default assistant ---------------------------------------------------------------


async def test_default_arithmetic_question_calls_the_calculator() -> None:
    events = await play(ScriptedModel(), [Message.user("What is 25 * 4?")], [CALCULATOR])
    assert events[:4] == [
        TextDelta("Let"),
        TextDelta(" me"),
        TextDelta(" calculate"),
        TextDelta(" that."),
    ]
    assert events[4] == ToolCall(
        "toolu_scripted_1", "calculator", {"operation": "evaluate", "expression": "25 * 4"}
    )
    assert turn_end(events).stop_reason == StopReason.TOOL_USE
    assert len(events) == 6


async def test_default_answers_with_the_calculator_result() -> None:
    model = ScriptedModel()
    first = await play(model, [Message.user("What is 25 * 4?")], [CALCULATOR])
    call = next(e for e in first if isinstance(e, ToolCall))
    events = await play(model, after_calculator("What is 25 * 4?", call, "100"), [CALCULATOR])
    assert text_of(events) == "25 * 4 = 100."
    assert not any(isinstance(e, ToolCall) for e in events)
    assert turn_end(events).stop_reason == StopReason.END_TURN


async def test_default_reports_a_calculator_error() -> None:
    call = ToolCall("toolu_1", "calculator", {"operation": "evaluate", "expression": "1 / 0"})
    messages = after_calculator("What is 1 / 0?", call, "division by zero", is_error=True)
    events = await play(ScriptedModel(), messages, [CALCULATOR])
    assert text_of(events) == "I could not compute that: division by zero."


async def test_default_describes_a_calculator_operation_call() -> None:
    call = ToolCall("toolu_1", "calculator", {"operation": "multiply", "a": 7.0, "b": 6})
    events = await play(ScriptedModel(), after_calculator("7 times 6", call, "42"), [CALCULATOR])
    assert text_of(events) == "7 * 6 = 42."


async def test_default_reports_another_tool_result() -> None:
    call = ToolCall("toolu_1", "search", {})
    events = await play(ScriptedModel(), after_calculator("Find it", call, "found"), [OTHER_TOOL])
    assert text_of(events) == "The search tool returned: found."


async def test_tool_call_ids_count_up() -> None:
    model = ScriptedModel()
    ids = []
    for _ in range(2):
        events = await play(model, [Message.user("2 + 2")], [CALCULATOR])
        ids += [e.id for e in events if isinstance(e, ToolCall)]
    assert ids == ["toolu_scripted_1", "toolu_scripted_2"]


@pytest.mark.parametrize(
    ("question", "expression"),
    [
        ("Compute (3 + 4) * 2", "(3 + 4) * 2"),
        ("what's 2^10", "2^10"),
        ("12 plus 30", "12 + 30"),
        ("50 minus 8", "50 - 8"),
        ("7 times 6", "7 * 6"),
        ("9 multiplied by 3", "9 * 3"),
        ("100 divided by 4", "100 / 4"),
        ("2 to the power of 8", "2 ^ 8"),
        ("17 mod 5", "17 % 5"),
        ("Please add 1.5+2.25, thanks.", "1.5+2.25"),
    ],
)
def test_find_expression_turns_words_into_operators(question: str, expression: str) -> None:
    assert find_expression(question) == expression


@pytest.mark.parametrize(
    "text", ["Write a haiku", "I have 3 apples", "Meet me on 2024-05-01", "top-10 list", ""]
)
def test_find_expression_ignores_text_without_arithmetic(text: str) -> None:
    assert find_expression(text) is None


async def test_default_words_question_calls_calculator_with_symbols() -> None:
    events = await play(ScriptedModel(), [Message.user("100 divided by 4")], [CALCULATOR])
    call = next(e for e in events if isinstance(e, ToolCall))
    assert call.input == {"operation": "evaluate", "expression": "100 / 4"}


async def test_default_non_arithmetic_reply_mentions_the_task() -> None:
    events = await play(ScriptedModel(), [Message.user("Write a haiku")], [CALCULATOR])
    assert text_of(events) == (
        'I am trioflow\'s offline scripted model. You asked: "Write a haiku". '
        "Set ANTHROPIC_API_KEY to talk to Claude."
    )
    assert not any(isinstance(e, ToolCall) for e in events)
    assert turn_end(events).stop_reason == StopReason.END_TURN


async def test_default_without_calculator_tool_replies_plainly() -> None:
    events = await play(ScriptedModel(), [Message.user("What is 25 * 4?")], [OTHER_TOOL])
    assert not any(isinstance(e, ToolCall) for e in events)
    assert 'You asked: "What is 25 * 4?"' in text_of(events)


async def test_default_text_streams_as_word_deltas() -> None:
    events = await play(ScriptedModel(), [Message.user("hello")])
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == tokenize(text_of(events))
    assert len(deltas) > 5


async def test_default_usage_counts_words_in_and_deltas_out() -> None:
    messages = [Message.user("What is 25 * 4?")]
    events = await play(ScriptedModel(), messages, [CALCULATOR], system="Be brief.")
    assert turn_end(events).usage == Usage(input_tokens=7, output_tokens=4)


# -- pace and cancellation ----------------------------------------------------------------


async def test_pace_spaces_text_deltas_exactly(autojump_clock: trio.testing.MockClock) -> None:
    model = ScriptedModel([Turn("a b c d", tool_calls=[("t", {})])], pace=4)
    start = trio.current_time()
    times = []
    async with model.stream([Message.user("go")]) as events:
        async for event in events:
            times.append((type(event).__name__, trio.current_time() - start))
    assert times == [
        ("TextDelta", 0.25),
        ("TextDelta", 0.5),
        ("TextDelta", 0.75),
        ("TextDelta", 1.0),
        # The tool's input streams too, paced: "", "{", "}".
        ("ToolInputDelta", 1.25),
        ("ToolInputDelta", 1.5),
        ("ToolInputDelta", 1.75),
        ("ToolCall", 1.75),
        ("TurnEnd", 1.75),
    ]


async def test_a_paced_model_streams_tool_input_in_a_few_pieces() -> None:
    weather = {"city": "Paris", "days": [1, 2, 3], "note": "café"}
    model = ScriptedModel([Turn("ok", tool_calls=[("w", weather), ("t", {})])], pace=1e6)
    async with model.stream([Message.user("go")]) as stream:
        events = [e async for e in stream]
    deltas = [e for e in events if isinstance(e, ToolInputDelta)]
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [c.input for c in calls] == [weather, {}]
    for call in calls:
        mine = [d for d in deltas if d.id == call.id]
        assert mine[0] == ToolInputDelta(call.id, call.name, "", first=True)
        assert not any(d.first for d in mine[1:]) and 1 <= len(mine) - 1 <= 3
        assert json.loads("".join(d.partial_json for d in mine)) == call.input
        # every delta of a call comes before the call
        assert max(events.index(d) for d in mine) < events.index(call)
    # unpaced: no deltas (a complete call, as before)
    async with ScriptedModel([Turn("ok", tool_calls=[("w", weather)])]).stream([]) as stream:
        assert not [e async for e in stream if isinstance(e, ToolInputDelta)]


async def test_pace_zero_still_checkpoints_per_event() -> None:
    model = ScriptedModel([Turn("a b")])
    async with model.stream([Message.user("go")]) as events:
        for _ in range(3):
            with trio.testing.assert_checkpoints():
                await events.__anext__()


async def test_cancellation_mid_stream_stops_promptly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = ScriptedModel([Turn("one two three four five six")], pace=10)
    received: list[ModelEvent] = []
    start = trio.current_time()
    with trio.move_on_after(0.35) as scope:
        async with model.stream([Message.user("go")]) as events:
            async for event in events:
                received.append(event)
    assert scope.cancelled_caught
    assert received == [TextDelta("one"), TextDelta(" two"), TextDelta(" three")]
    assert trio.current_time() - start == pytest.approx(0.35)


async def test_cancellation_at_pace_zero_stops_at_the_next_event() -> None:
    model = ScriptedModel()
    received: list[ModelEvent] = []
    with trio.CancelScope() as scope:
        async with model.stream([Message.user("hello there")]) as events:
            async for event in events:
                received.append(event)
                scope.cancel()
    assert len(received) == 1


# -- scripts ---------------------------------------------------------------------------------


async def test_script_turn_streams_text_then_tool_calls() -> None:
    model = ScriptedModel(
        [Turn("Checking.", tool_calls=[("search", {"q": "x"}), ToolCall("my_id", "calc", {})])]
    )
    events = await play(model, [Message.user("go")])
    assert events[:3] == [
        TextDelta("Checking."),
        ToolCall("toolu_scripted_1", "search", {"q": "x"}),
        ToolCall("my_id", "calc", {}),
    ]
    assert turn_end(events).stop_reason == StopReason.TOOL_USE


async def test_script_text_sequence_gives_exact_deltas() -> None:
    model = ScriptedModel([Turn(["Hel", "lo", " world"])])
    events = await play(model, [Message.user("go")])
    assert events[:3] == [TextDelta("Hel"), TextDelta("lo"), TextDelta(" world")]
    assert turn_end(events) == TurnEnd(StopReason.END_TURN, Usage(1, 3))


async def test_script_stop_reason_and_usage_override() -> None:
    model = ScriptedModel([Turn("cut", stop_reason=StopReason.MAX_TOKENS, usage=Usage(10, 20))])
    events = await play(model, [Message.user("go")])
    assert turn_end(events) == TurnEnd(StopReason.MAX_TOKENS, Usage(10, 20))


async def test_script_turns_are_played_in_order() -> None:
    model = ScriptedModel([Turn("first"), Turn("second")])
    assert text_of(await play(model, [Message.user("a")])) == "first"
    assert text_of(await play(model, [Message.user("b")])) == "second"


async def test_script_exhausted_raises_ModelError_on_entering() -> None:
    model = ScriptedModel([Turn("only")])
    await play(model, [Message.user("a")])
    with pytest.raises(ModelError, match="script exhausted") as info:
        await play(model, [Message.user("b")])
    assert info.value.kind == "script"


async def test_empty_script_raises_ModelError_at_once() -> None:
    with pytest.raises(ModelError, match="script exhausted"):
        await play(ScriptedModel([]), [Message.user("a")])


async def test_script_fail_raises_before_any_text() -> None:
    error = ModelError("overloaded", kind="overloaded")
    model = ScriptedModel([Turn("never seen", fail=error)])
    received: list[ModelEvent] = []
    with pytest.raises(ModelError, match="overloaded"):
        await collect_into(received, model, [Message.user("go")])
    assert received == []


async def test_script_fail_after_streams_some_deltas_first() -> None:
    model = ScriptedModel([Turn("one two three", fail=ModelError("lost"), fail_after=2)])
    received: list[ModelEvent] = []
    with pytest.raises(ModelError, match="lost"):
        await collect_into(received, model, [Message.user("go")])
    assert received == [TextDelta("one"), TextDelta(" two")]


async def test_script_retries_come_first() -> None:
    notice = RetryNotice(attempt=1, delay=0.5, error="overloaded", kind="overloaded")
    model = ScriptedModel([Turn("ok", retries=[notice])])
    events = await play(model, [Message.user("go")])
    assert events == [notice, TextDelta("ok"), TurnEnd(StopReason.END_TURN, Usage(1, 1))]


async def test_script_delay_sleeps_before_the_turn(autojump_clock: trio.testing.MockClock) -> None:
    model = ScriptedModel([Turn("ok", delay=3)])
    start = trio.current_time()
    async with model.stream([Message.user("go")]) as events:
        assert trio.current_time() - start == 3
        assert await events.__anext__() == TextDelta("ok")


async def test_script_callable_turn_sees_messages_and_tools() -> None:
    seen = []

    def respond(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Turn:
        seen.append((messages[-1].text, [t.name for t in tools]))
        return Turn(f"echo {messages[-1].text}")

    model = ScriptedModel([respond])
    events = await play(model, [Message.user("hi")], [CALCULATOR])
    assert text_of(events) == "echo hi"
    assert seen == [("hi", ["calculator"])]


async def test_script_can_mix_in_default_turns() -> None:
    default = ScriptedModel()
    model = ScriptedModel([Turn("scripted first"), default.default_turn])
    assert text_of(await play(model, [Message.user("a")])) == "scripted first"
    assert "offline scripted model" in text_of(await play(model, [Message.user("b")]))


async def test_script_generator_is_consumed_lazily() -> None:
    produced = []

    def turns() -> Iterator[Turn]:
        for i in range(3):
            produced.append(i)
            yield Turn(str(i))

    model = ScriptedModel(turns())
    await play(model, [Message.user("a")])
    assert produced == [0]


async def test_calls_records_the_messages_of_each_call() -> None:
    model = ScriptedModel([Turn("a")])
    first = [Message.user("one")]
    await play(model, first)
    with pytest.raises(ModelError):
        await play(model, [Message.user("two")])
    assert model.calls == [tuple(first), (Message.user("two"),)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"fail_after": -1}, "fail_after"), ({"delay": -1.0}, "delay")],
)
def test_invalid_turn_raises_ValueError(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Turn("x", **kwargs)  # type: ignore[arg-type]


# -- stream hygiene ----------------------------------------------------------------------------


async def test_iterating_after_exit_raises_ClosedResourceError() -> None:
    model = ScriptedModel([Turn("a b c")])
    async with model.stream([Message.user("go")]) as events:
        await events.__anext__()
    with pytest.raises(trio.ClosedResourceError):
        await events.__anext__()


async def test_entering_a_stream_twice_raises_RuntimeError() -> None:
    model = ScriptedModel([Turn("a"), Turn("b")])
    stream = model.stream([Message.user("go")])
    async with stream:
        pass
    with pytest.raises(RuntimeError, match="entered only once"):
        async with stream:
            pass
