"""Faults of a run's outside world, and what trioflow guarantees when they happen.

The model's faults are played by the local Anthropic protocol server
(:mod:`trioflow.testing._anthropic_server`) on 127.0.0.1, driven by the real
``anthropic`` SDK (nothing of it is mocked): rate limits and overload
(``429``/``529``, with or without ``retry-after``), server errors, streams
cut mid-text, ``error`` events mid-stream, corrupt stream data. The tools'
and listeners' faults are played by functions that hang or raise.

Every test is bounded in time and sleeps nowhere: backoffs and timeouts run
on ``autojump_clock`` (a :class:`trio.testing.MockClock` that jumps when every
task is blocked), so delays are exact and ``trio.current_time()`` proves that
no long sleep happened. Why the autojump clock is reliable against the local
server (and why those tests use no ``trio.fail_after`` guard) is explained in
``tests/test_anthropic_model.py``; tests that hold a reply at a gate run on the
real clock, with a guard, and retry without backoff.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing
from conftest import KEY, MODEL, POLICY, collect, collect_until_error, notices

from trioflow import (
    TERMINAL_TYPES,
    Agent,
    FlowEvent,
    RestartPolicy,
    RunResult,
    RunStatus,
    ScriptedModel,
    StreamingFlowExecutor,
    Turn,
    open_event_bus,
    tool,
)
from trioflow.models._base import (
    ModelEvent,
    RetryNotice,
    StopReason,
    TextDelta,
    TurnEnd,
    Usage,
)
from trioflow.models._claude import AnthropicModel
from trioflow.supervise import RetryPolicy
from trioflow.testing._anthropic_server import (
    AnthropicServer,
    DisconnectAfter,
    ErrorEventAfter,
    ErrorReply,
    StreamedReply,
    ToolUse,
)

NO_BACKOFF = RetryPolicy(attempts=4, base_delay=0, jitter=0)
"""For tests on the real clock: retries without any sleep."""

CUT = DisconnectAfter(6)
"""message_start, ping, content_block_start, "Hello", " there", ", how", then the connection drops."""
CUT_TEXT = "Hello there, how"


def terminal_of(events: Sequence[FlowEvent]) -> FlowEvent:
    """The one terminal event, which must be the last."""
    terminal = [e for e in events if e.type in TERMINAL_TYPES]
    assert len(terminal) == 1, [e.type for e in events]
    assert events[-1] is terminal[0]
    return terminal[0]


def consumer_text(events: Sequence[FlowEvent]) -> str:
    """The text a consumer assembles from ``token.received``, dropping what retries void."""
    parts: list[str] = []
    for event in events:
        if event.type == "token.received":
            parts.append(event.data["token"])
        elif event.type == "warning" and event.data.get("discarded_tokens"):
            del parts[-event.data["discarded_tokens"] :]
    return "".join(parts)


async def run_claude(
    anthropic_server: AnthropicServer,
    *,
    retry: RetryPolicy = POLICY,
    agent_kw: dict[str, Any] | None = None,
) -> tuple[list[FlowEvent], RunResult, dict[str, Any]]:
    """Run an agent on Claude (the local server) to its end.

    Returns:
        The run's events, its result and its ``Run.to_dict()``.
    """
    async with (
        AnthropicModel(MODEL, api_key=KEY, base_url=anthropic_server.base_url, retry=retry) as m,
        StreamingFlowExecutor() as executor,
    ):
        run = await executor.start(Agent(m, **(agent_kw or {})), "Hi")
        async with run.subscribe(after=0) as sub:
            events = [event async for event in sub]
        result = await run.wait()
    return events, result, run.to_dict()


# -- model: rate limits, overload, server errors ------------------------------------


async def test_rate_limit_waits_for_retry_after_when_it_is_longer_than_the_backoff(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(
        ErrorReply(429, "rate_limit_error", retry_after=7), StreamedReply(text=["ok"])
    )
    events = await collect(model)
    notice = events[0]
    assert isinstance(notice, RetryNotice)
    assert (notice.attempt, notice.delay, notice.kind) == (1, 7.0, "rate_limit")
    assert not notice.restarted
    assert notice.error.startswith("RateLimitError: 429 rate_limit_error")
    assert events[1:] == [TextDelta("ok"), TurnEnd(StopReason.END_TURN, Usage(25, 1))]
    first, second = anthropic_server.requests
    assert second.time - first.time == pytest.approx(7.0)


async def test_overloaded_529_is_retried(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(ErrorReply(529, "overloaded_error"), StreamedReply(text=["ok"]))
    events = await collect(model)
    (notice,) = notices(events)
    assert (notice.attempt, notice.delay, notice.kind) == (1, 0.5, "overloaded")
    assert "529" in notice.error
    assert "overloaded_error" in notice.error
    assert events[-2:] == [TextDelta("ok"), TurnEnd(StopReason.END_TURN, Usage(25, 1))]


async def test_server_errors_are_retried_with_exponential_backoff(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(
        ErrorReply(500, "api_error"), ErrorReply(503, "api_error"), StreamedReply(text=["ok"])
    )
    events = await collect(model)
    assert [(n.attempt, n.delay, n.kind) for n in notices(events)] == [
        (1, 0.5, "server_error"),
        (2, 1.0, "server_error"),
    ]
    times = [r.time for r in anthropic_server.requests]
    assert times == pytest.approx([0.0, 0.5, 1.5])


async def test_exhausted_retries_raise_a_retryable_model_error(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(*[ErrorReply(529, "overloaded_error")] * 4)
    seen: list[ModelEvent] = []
    info = await collect_until_error(model, seen)
    assert (info.value.kind, info.value.status, info.value.retryable) == ("overloaded", 529, True)
    assert "4 attempt" in str(info.value)
    assert [n.attempt for n in notices(seen)] == [1, 2, 3]
    assert anthropic_server.statistics().requests == 4


@pytest.mark.parametrize(
    ("status", "error_type", "kind"),
    [
        (429, "rate_limit_error", "rate_limit"),
        (529, "overloaded_error", "overloaded"),
        (503, "api_error", "server_error"),
    ],
)
async def test_a_retried_api_error_then_an_answer_completes_the_run(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    status: int,
    error_type: str,
    kind: str,
) -> None:
    anthropic_server.add(ErrorReply(status, error_type), StreamedReply(text=["Fine", "."]))
    events, result, _ = await run_claude(anthropic_server)
    (warning,) = [e for e in events if e.type == "warning"]
    assert (warning.data["attempt"], warning.data["kind"]) == (1, kind)
    assert terminal_of(events).type == "flow.completed"
    assert terminal_of(events).data["output"] == result.output == "Fine."
    assert anthropic_server.statistics().requests == 2


@pytest.mark.parametrize(
    ("status", "error_type", "kind"),
    [
        (429, "rate_limit_error", "rate_limit"),
        (529, "overloaded_error", "overloaded"),
        (500, "api_error", "server_error"),
    ],
)
async def test_an_api_error_on_every_attempt_ends_the_run_with_flow_failed(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    status: int,
    error_type: str,
    kind: str,
) -> None:
    anthropic_server.add(*[ErrorReply(status, error_type)] * 4)
    events, result, _ = await run_claude(anthropic_server)
    terminal = terminal_of(events)
    assert terminal.type == "flow.failed"
    assert terminal.data["error"]["type"] == "ModelError"
    assert terminal.data["error"]["kind"] == kind
    assert "4 attempt" in terminal.data["error"]["message"]
    assert [e.data["attempt"] for e in events if e.type == "warning"] == [1, 2, 3]
    assert result.status is RunStatus.FAILED
    assert anthropic_server.statistics().requests == 4


# -- model: retry-after --------------------------------------------------------------


@pytest.mark.parametrize(
    ("hint", "policy"),
    [
        (3600, POLICY),  # the default cap, 60 s
        (61, POLICY),
        (30, RetryPolicy(attempts=4, base_delay=0.5, jitter=0, max_retry_after=10)),
    ],
)
async def test_a_retry_after_beyond_the_cap_fails_the_run_at_once_without_sleeping(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    hint: float,
    policy: RetryPolicy,
) -> None:
    anthropic_server.add(
        ErrorReply(429, "rate_limit_error", retry_after=hint), StreamedReply(text=["unused"])
    )
    events, result, _ = await run_claude(anthropic_server, retry=policy)
    assert trio.current_time() < 1.0  # no sleep of `hint` seconds (the clock would show it)
    terminal = terminal_of(events)
    assert terminal.type == "flow.failed"
    error = terminal.data["error"]
    assert (error["type"], error["kind"]) == ("ModelError", "rate_limit")
    assert f"retry after {hint:g} s" in error["message"]
    assert f"max_retry_after of {policy.max_retry_after:g} s" in error["message"]
    assert [e for e in events if e.type == "warning"] == []
    assert result.status is RunStatus.FAILED
    stats = anthropic_server.statistics()
    assert (stats.requests, stats.script_remaining) == (1, 1)


async def test_a_retry_after_beyond_the_cap_is_a_model_error_carrying_the_hint(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(ErrorReply(529, "overloaded_error", retry_after=3600))
    seen: list[ModelEvent] = []
    info = await collect_until_error(model, seen)
    assert (info.value.kind, info.value.status) == ("overloaded", 529)
    assert info.value.retryable
    assert info.value.retry_after == 3600
    assert seen == []
    assert trio.current_time() < 1.0


async def test_a_retry_after_within_the_cap_is_still_honoured(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(
        ErrorReply(429, "rate_limit_error", retry_after=60), StreamedReply(text=["ok"])
    )
    events, result, _ = await run_claude(anthropic_server)
    (warning,) = [e for e in events if e.type == "warning"]
    assert warning.data["delay"] == 60.0
    assert terminal_of(events).type == "flow.completed"
    assert result.output == "ok"
    first, second = anthropic_server.requests
    assert second.time - first.time == pytest.approx(60.0)


# -- model: streams cut short ------------------------------------------------------------


async def test_disconnect_mid_stream_is_retried_and_the_turn_restarts(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    # message_start, ping, content_block_start, "Hello", " there", then the connection drops.
    anthropic_server.add(DisconnectAfter(5), StreamedReply(text=["Hello", " again"]))
    events = await collect(model)
    assert events[:2] == [TextDelta("Hello"), TextDelta(" there")]
    notice = events[2]
    assert isinstance(notice, RetryNotice)
    assert notice.kind == "connection"
    assert notice.restarted
    assert "RemoteProtocolError" in notice.error
    assert events[3:5] == [TextDelta("Hello"), TextDelta(" again")]
    assert anthropic_server.statistics().dropped == 1


async def test_stream_ending_before_message_stop_is_retried(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(DisconnectAfter(4, complete_body=True), StreamedReply(text=["ok"]))
    events = await collect(model)
    assert events[0] == TextDelta("Hello")
    notice = events[1]
    assert isinstance(notice, RetryNotice)
    assert notice.kind == "connection"
    assert notice.restarted
    assert "message_stop" in notice.error
    assert events[2] == TextDelta("ok")


async def test_overloaded_error_event_mid_stream_is_retried(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(ErrorEventAfter(4, "overloaded_error"), StreamedReply(text=["ok"]))
    events = await collect(model)
    assert events[0] == TextDelta("Hello")
    notice = events[1]
    assert isinstance(notice, RetryNotice)
    assert (notice.kind, notice.restarted) == ("overloaded", True)
    assert events[2:] == [TextDelta("ok"), TurnEnd(StopReason.END_TURN, Usage(25, 1))]


# -- model: invalid stream data -------------------------------------------------------

# Index 4 of the reply's events is its second text delta: the raw block goes
# out after "Hello", then the reply goes on to its message_stop.
NOT_JSON = (4, b"data: {this is not json\n\n")
NOT_UTF8 = (4, b'event: content_block_delta\ndata: {"text": "\xff\xfe"}\n\n')
NOT_AN_OBJECT = (4, b"event: content_block_delta\ndata: 42\n\n")
CORRUPT = [
    pytest.param(NOT_JSON, "not JSON", id="not-json"),
    pytest.param(NOT_UTF8, "not UTF-8", id="not-utf8"),
    pytest.param(NOT_AN_OBJECT, "not a JSON object", id="not-an-object"),
]


@pytest.mark.parametrize(("raw", "what"), CORRUPT)
async def test_invalid_stream_data_on_every_attempt_ends_the_run_with_flow_failed(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    raw: tuple[int, bytes],
    what: str,
) -> None:
    corrupt = StreamedReply(text=["Hello", " there"], raw=[raw])
    anthropic_server.add(corrupt, corrupt)
    policy = RetryPolicy(attempts=2, base_delay=0.5, jitter=0)
    events, result, run = await run_claude(anthropic_server, retry=policy)
    terminal = terminal_of(events)
    assert terminal.type == "flow.failed"
    error = terminal.data["error"]
    assert (error["type"], error["kind"]) == ("ModelError", "invalid_response")
    assert "2 attempt" in error["message"]
    assert what in error["message"]
    (warning,) = [e for e in events if e.type == "warning"]
    assert warning.data["kind"] == "invalid_response"
    # No reply was cut by the server: the attempts failed on the data alone.
    stats = anthropic_server.statistics()
    assert (stats.requests, stats.dropped) == (2, 0)
    assert result.output == run["output"] == "Hello"  # the last attempt's text, once


@pytest.mark.parametrize(("raw", "what"), CORRUPT)
async def test_invalid_stream_data_is_retried_and_a_sound_stream_completes_the_run(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    raw: tuple[int, bytes],
    what: str,
) -> None:
    anthropic_server.add(
        StreamedReply(text=["Hello", " there"], raw=[raw]), StreamedReply(text=["Fine", "."])
    )
    events, result, _ = await run_claude(anthropic_server)
    (warning,) = [e for e in events if e.type == "warning"]
    assert (warning.data["kind"], warning.data["restarted"]) == ("invalid_response", True)
    assert what in warning.data["message"]
    assert warning.data["discarded_tokens"] == 1  # "Hello"
    terminal = terminal_of(events)
    assert terminal.type == "flow.completed"
    assert terminal.data["output"] == result.output == consumer_text(events) == "Fine."


# -- what users see after retries ---------------------------------------------------------


async def test_a_turn_cut_twice_then_answered_outputs_only_the_answer(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
) -> None:
    # The answer asks for a tool, so that the next request shows the assistant
    # message the model is sent back.
    @tool
    def now() -> str:
        """The time."""
        return "noon"

    answer = StreamedReply(text=["It is", " time"], tool_uses=[ToolUse("now", {}, id="toolu_1")])
    anthropic_server.add(CUT, CUT, answer, StreamedReply(text=["Noon."]))
    events, result, run = await run_claude(anthropic_server, agent_kw={"tools": [now]})
    warnings = [e for e in events if e.type == "warning"]
    assert [(w.data["restarted"], w.data["discarded_tokens"]) for w in warnings] == [(True, 3)] * 2
    tokens = [
        e.data["token"] for e in events if e.type == "token.received" and e.data["iteration"] == 1
    ]
    assert "".join(tokens) == CUT_TEXT * 2 + "It is time"  # every token was streamed live...
    assert consumer_text(events) == "It is timeNoon."  # ...and the warnings void the cut ones
    (assistant,) = [
        e
        for e in events
        if e.type == "add_message" and e.data["role"] == "assistant" and e.data["index"] == 1
    ]
    assert assistant.data["content"] == "It is time"
    sent = anthropic_server.requests[3].body["messages"][1]
    assert sent["role"] == "assistant"
    assert [b["text"] for b in sent["content"] if b["type"] == "text"] == ["It is time"]
    terminal = terminal_of(events)
    assert terminal.type == "flow.completed"
    assert terminal.data["output"] == result.output == run["output"] == "Noon."


async def test_a_turn_cut_on_every_attempt_fails_with_the_last_attempts_text_once(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(CUT, CUT, CUT, CUT)
    events, result, run = await run_claude(anthropic_server)
    terminal = terminal_of(events)
    assert terminal.type == "flow.failed"
    assert terminal.data["error"]["kind"] == "connection"
    assert [w.data["discarded_tokens"] for w in events if w.type == "warning"] == [3, 3, 3]
    assert result.output == run["output"] == consumer_text(events) == CUT_TEXT
    assert CUT_TEXT not in str(terminal.data)


async def test_a_run_cancelled_after_retried_cuts_keeps_only_the_current_attempts_text(
    anthropic_server: AnthropicServer,
) -> None:
    gate = trio.Event()  # never set: the third attempt holds after "Almost", " there"
    held = StreamedReply(text=["Almost", " there", "!"], gate=gate, gate_after=5)
    anthropic_server.add(CUT, CUT, held)
    events: list[FlowEvent] = []
    with trio.fail_after(10):
        async with (
            AnthropicModel(
                MODEL, api_key=KEY, base_url=anthropic_server.base_url, retry=NO_BACKOFF
            ) as model,
            StreamingFlowExecutor() as executor,
        ):
            run = await executor.start(Agent(model), "Hi")
            async with run.subscribe(after=0) as sub:
                async for event in sub:
                    events.append(event)
                    warned = len([e for e in events if e.type == "warning"])
                    if (
                        event.type == "token.received"
                        and event.data["token"] == " there"
                        and warned == 2
                    ):
                        assert run.to_dict()["output"] == "Almost there"
                        run.cancel("user pressed stop")
            result = await run.wait()
    assert terminal_of(events).type == "flow.cancelled"
    assert result.status is RunStatus.CANCELLED
    assert result.output == run.to_dict()["output"] == consumer_text(events) == "Almost there"


# -- credentials -------------------------------------------------------------------------


async def test_api_key_never_appears_in_events_errors_logs_or_repr(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    anthropic_server.add(
        ErrorReply(529, "overloaded_error", f"overloaded; key {KEY} is fine"),
        DisconnectAfter(5),
        ErrorReply(401, "authentication_error", f"invalid x-api-key: {KEY}"),
    )
    seen: list[ModelEvent] = []
    info = await collect_until_error(model, seen)
    assert anthropic_server.requests[0].api_key == KEY  # the key did reach the server
    assert len(notices(seen)) == 2
    texts = [repr(model), str(model), repr(info.value), caplog.text]
    texts += traceback.format_exception(info.value)
    texts += [repr(event) for event in seen]
    assert "[redacted]" in str(info.value)
    for text in texts:
        assert KEY not in text


async def test_api_key_never_appears_in_a_runs_events_or_logs(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    anthropic_server.add(
        ErrorReply(529, "overloaded_error", f"overloaded; key {KEY} is fine"),
        ErrorEventAfter(4, "api_error", f"mid-stream failure for {KEY}"),
        ErrorReply(401, "authentication_error", f"invalid x-api-key: {KEY}"),
    )
    events, result, run = await run_claude(anthropic_server)
    assert anthropic_server.requests[0].api_key == KEY  # the key did reach the server
    terminal = terminal_of(events)
    assert terminal.type == "flow.failed"
    assert "[redacted]" in terminal.data["error"]["message"]
    assert len([e for e in events if e.type == "warning"]) == 2
    texts = [e.to_json() for e in events] + [caplog.text, repr(result), str(run)]
    for text in texts:
        assert KEY not in text


# -- tools ---------------------------------------------------------------------------------


async def test_tool_timeout_becomes_tool_failed(autojump_clock: trio.testing.MockClock) -> None:
    @tool(timeout=2)
    async def hang() -> str:
        """Never returns."""
        await trio.sleep(math.inf)
        return "unreachable"

    model = ScriptedModel([Turn(tool_calls=[("hang", {})]), Turn(text="gave up")])
    async with StreamingFlowExecutor().stream(Agent(model, tools=[hang]), "go") as stream:
        events = [event async for event in stream]
    (failed,) = [e for e in events if e.type == "tool.failed"]
    assert failed.data["error"]["type"] == "ToolTimeout"
    assert failed.data["duration"] == pytest.approx(2)
    assert terminal_of(events).type == "flow.completed"


# -- listeners -----------------------------------------------------------------------------


async def test_crashing_listener_is_isolated_reported_and_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[int] = []
    warnings: list[FlowEvent] = []

    def flaky(event: FlowEvent) -> None:
        if event.data.get("i") == 2:
            raise RuntimeError("listener bug")
        seen.append(event.data["i"])

    subscribed: list[int] = []
    async with open_event_bus() as bus, bus.subscribe(types={"info"}) as sub:
        bus.add_listener(flaky, types={"info"}, name="flaky")
        bus.add_listener(warnings.append, types={"warning"})
        for i in range(5):
            await bus.emit("info", {"i": i})
            await trio.sleep(1)
        stats = bus.statistics()
        async for event in sub:
            subscribed.append(event.data["i"])
            if len(subscribed) == 5:
                break
    assert seen == [0, 1, 3, 4]  # the failing event is skipped, the rest arrive
    assert subscribed == [0, 1, 2, 3, 4]  # a subscriber sees every event, the crash's too
    (listener,) = [s for s in stats.listeners if s.name == "flaky"]
    assert (listener.crashes, listener.restarts, listener.gave_up) == (1, 1, False)
    assert stats.listener_crashes == 1
    assert len(warnings) == 1
    assert warnings[0].data["listener"] == "flaky"
    assert warnings[0].data["error"] == {"type": "RuntimeError", "message": "listener bug"}


async def test_listener_removed_after_too_many_crashes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors: list[FlowEvent] = []

    def always_fails(event: FlowEvent) -> None:
        raise ValueError("nope")

    async with open_event_bus() as bus:
        bus.add_listener(
            always_fails,
            types={"info"},
            restart=RestartPolicy(max_restarts=2, window=60, base_delay=0.1),
            name="broken",
        )
        bus.add_listener(errors.append, types={"error"})
        for _ in range(5):
            await bus.emit("info")
            await trio.sleep(1)
        stats = {s.name: s for s in bus.statistics().listeners}
    assert stats["broken"].gave_up
    assert not stats["broken"].running
    assert stats["broken"].crashes == 3
    assert len(errors) == 1 and "removed" in errors[0].data["message"]
