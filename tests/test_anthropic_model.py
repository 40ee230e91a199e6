"""AnthropicModel: the real ``anthropic`` SDK over real HTTP against the local test server.

Nothing of the SDK or of its HTTP client (httpx2/httpcore2 on anyio) is mocked:
every test talks to an :class:`~trioflow.testing.AnthropicServer` on 127.0.0.1.

Clocks. Tests of backoff delays run on ``autojump_clock``
(``MockClock(autojump_threshold=0)``), which jumps to the next deadline as soon
as every task is blocked. That is exact and reliable here *because* of what
the deadlines are: over loopback a byte written by one task is readable by the
other at once, so while a request is in flight some task is always runnable
and the clock does not move; it moves only when the client sleeps its backoff
(or the server sleeps a ``pace``). Two things would break this, so these tests
avoid them:

- a ``trio.fail_after`` guard: the SDK waits once per client for a worker
  thread (it resolves platform information in one), every task is blocked
  meanwhile, and the clock would jump straight to the guard's deadline;
- a gated reply (``StreamedReply(gate=...)``): while the server waits on the
  gate, the only deadline left is the SDK's read timeout, and the clock would
  jump to it (one test does that on purpose, to time the read out).

Tests that need a gate, or a guard against hanging, run on the real clock
with ``trio.fail_after`` instead, and sleep nowhere.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest
import trio
import trio.testing
from conftest import KEY, MODEL, POLICY, collect, collect_until_error, notices
from hypothesis import given, settings
from hypothesis import strategies as st

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
from trioflow.models._claude import (
    DEFAULT_CLAUDE_MODEL,
    DEFAULT_CLAUDE_RETRY,
    AnthropicModel,
)
from trioflow.sse import SSEDecoder
from trioflow.supervise import RetryPolicy
from trioflow.testing._anthropic_server import (
    AnthropicServer,
    DisconnectAfter,
    ErrorReply,
    StreamedReply,
    ToolUse,
    open_anthropic_server,
)

# The SDK's HTTP client routes through $HTTP(S)_PROXY / $ALL_PROXY when set.
pytestmark = pytest.mark.usefixtures("no_proxy_for_local_servers")


# -- streaming ------------------------------------------------------------------


async def test_model_implements_the_model_protocol(model: AnthropicModel) -> None:
    assert isinstance(model, Model)
    assert model.name == MODEL
    async with AnthropicModel(api_key=KEY) as default:
        assert default.name == DEFAULT_CLAUDE_MODEL
        assert default.retry_policy == DEFAULT_CLAUDE_RETRY


async def test_tool_use_with_streamed_json_input_becomes_one_tool_call_per_block(
    anthropic_server: AnthropicServer, model: AnthropicModel
) -> None:
    weather = {"city": "Paris", "units": "metric", "days": [1, 2, 3]}
    anthropic_server.add(
        StreamedReply(
            text=["Let me check."],
            tool_uses=[
                ToolUse("get_weather", weather, id="toolu_1", chunk_size=4),
                ToolUse("get_time", {"tz": "Europe/Paris"}, id="toolu_2"),
            ],
        )
    )
    streamed = await collect(model)
    events = [e for e in streamed if not isinstance(e, ToolInputDelta)]
    assert events[:3] == [
        TextDelta("Let me check."),
        ToolCall("toolu_1", "get_weather", weather),
        ToolCall("toolu_2", "get_time", {"tz": "Europe/Paris"}),
    ]
    assert isinstance(events[3], TurnEnd)
    assert events[3].stop_reason == StopReason.TOOL_USE
    # Each block's input streams as it arrives: a first empty delta at the
    # block's start (id and name known), then each input_json_delta.
    text = json.dumps(weather, separators=(",", ":"))
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    assert streamed[1 : 2 + len(pieces) + 1] == [
        ToolInputDelta("toolu_1", "get_weather", "", 1, first=True),
        *(ToolInputDelta("toolu_1", "get_weather", p, 1) for p in pieces),
        ToolCall("toolu_1", "get_weather", weather),
    ]
    second = [e for e in streamed if isinstance(e, ToolInputDelta) and e.id == "toolu_2"]
    assert second[0].first and second[0].index == 2
    assert json.loads("".join(d.partial_json for d in second)) == {"tz": "Europe/Paris"}


async def test_tool_use_without_input_has_an_empty_input(
    anthropic_server: AnthropicServer, model: AnthropicModel
) -> None:
    anthropic_server.add(StreamedReply(tool_uses=[ToolUse("now", {}, id="toolu_1")]))
    events = await collect(model)
    assert events[0] == ToolInputDelta("toolu_1", "now", "", 0, first=True)
    assert next(e for e in events if not isinstance(e, ToolInputDelta)) == ToolCall(
        "toolu_1", "now", {}
    )


async def test_turn_ends_once_with_stop_reason_and_usage(
    anthropic_server: AnthropicServer, model: AnthropicModel
) -> None:
    anthropic_server.add(
        StreamedReply(text=["Hi"], input_tokens=42, output_tokens=7, stop_reason="max_tokens")
    )
    events = await collect(model)
    assert events == [TextDelta("Hi"), TurnEnd(StopReason.MAX_TOKENS, Usage(42, 7))]


async def test_tool_input_that_is_not_json_raises_invalid_response(
    anthropic_server: AnthropicServer, model: AnthropicModel
) -> None:
    broken = ToolUse("get_weather", partial_json=['{"city": ', '"Par'])
    anthropic_server.add(StreamedReply(tool_uses=[broken]), StreamedReply(text=["unused"]))
    info = await collect_until_error(model, [])
    assert info.value.kind == "invalid_response"
    assert not info.value.retryable
    assert anthropic_server.statistics().requests == 1


@settings(max_examples=10, deadline=None)
@given(
    texts=st.lists(
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20),
        max_size=6,
    ),
    tool_input=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(st.characters(blacklist_categories=("Cs",))),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
            max_leaves=8,
        ),
        max_size=4,
    ),
    chunk_size=st.integers(1, 16),
)
async def test_text_and_tool_input_arrive_intact_whatever_their_content(
    texts: list[str], tool_input: dict[str, Any], chunk_size: int
) -> None:
    reply = StreamedReply(text=texts, tool_uses=[ToolUse("t", tool_input, chunk_size=chunk_size)])
    async with (
        open_anthropic_server([reply]) as server,
        AnthropicModel(MODEL, api_key=KEY, base_url=server.base_url, retry=POLICY) as model,
    ):
        events = await collect(model)
    assert [e.text for e in events if isinstance(e, TextDelta)] == texts
    (call,) = [e for e in events if isinstance(e, ToolCall)]
    assert call.input == json.loads(json.dumps(tool_input))


@settings(max_examples=50)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["message_start", "content_block_delta", "ping"]),
            st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n")),
        ),
        max_size=5,
    ),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(0, 400), max_size=6),
)
def test_sse_decoder_finds_the_same_events_however_the_bytes_are_split(
    events: list[tuple[str, str]], newline: str, cuts: list[int]
) -> None:
    wire = "".join(f"event: {e}{newline}data: {d}{newline}{newline}" for e, d in events)
    data = wire.encode()
    decoder = SSEDecoder(errors="strict")  # as the model decodes the body
    start = 0
    decoded = []
    for cut in sorted(min(c, len(data)) for c in cuts):
        decoded += decoder.feed(data[start:cut])
        start = cut
    decoded += decoder.feed(data[start:])
    decoded += decoder.close()
    assert [(e.event, e.data) for e in decoded] == events


# -- the request ------------------------------------------------------------------


async def test_request_carries_model_messages_tools_and_system(
    anthropic_server: AnthropicServer, model: AnthropicModel
) -> None:
    anthropic_server.add(StreamedReply(text=["Sunny."]))
    spec = ToolSpec(
        "get_weather",
        "The weather in a city.",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    messages = [
        Message.user("Weather in Paris?"),
        Message(
            "assistant",
            (TextBlock("Checking."), ToolUseBlock("toolu_1", "get_weather", {"city": "Paris"})),
        ),
        Message("user", (ToolResultBlock("toolu_1", "sunny, 21 C"),)),
    ]
    await collect(model, messages, tools=[spec], system="Be brief.")
    (request,) = anthropic_server.requests
    assert request.method == "POST"
    assert request.path == "/v1/messages"
    assert request.api_key == KEY
    assert "anthropic-version" in request.headers
    assert request.body == {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [m.to_dict() for m in messages],
        "tools": [spec.to_dict()],
        "system": "Be brief.",
        "stream": True,
    }


async def test_request_without_tools_or_system_sends_neither(
    anthropic_server: AnthropicServer, model: AnthropicModel
) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"]))
    await collect(model)
    body = anthropic_server.requests[0].body
    assert "tools" not in body
    assert "system" not in body


async def test_max_tokens_is_configurable(anthropic_server: AnthropicServer) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"]))
    async with AnthropicModel(
        "claude-haiku-4-5", api_key=KEY, base_url=anthropic_server.base_url, max_tokens=77
    ) as model:
        await collect(model)
    assert anthropic_server.requests[0].body["max_tokens"] == 77
    assert anthropic_server.requests[0].body["model"] == "claude-haiku-4-5"


# -- retries --------------------------------------------------------------------


async def test_backoff_wins_over_a_shorter_retry_after(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(
        ErrorReply(429, "rate_limit_error", retry_after=0.1), StreamedReply(text=["ok"])
    )
    events = await collect(model)
    assert [n.delay for n in notices(events)] == [0.5]
    first, second = anthropic_server.requests
    assert second.time - first.time == pytest.approx(0.5)


async def test_connection_closed_before_any_response_is_retried(
    autojump_clock: trio.testing.MockClock,
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
) -> None:
    anthropic_server.add(DisconnectAfter(0, headers=False), StreamedReply(text=["ok"]))
    events = await collect(model)
    (notice,) = notices(events)
    assert notice.kind == "connection"
    assert not notice.restarted
    assert notice.error.startswith("APIConnectionError")


async def test_a_server_gone_silent_times_out_and_is_retried(
    autojump_clock: trio.testing.MockClock, anthropic_server: AnthropicServer
) -> None:
    # The gate is never set: the server goes silent after the first delta, and
    # the clock jumps to the SDK's read timeout.
    silent = StreamedReply(text=["a", "b"], gate=trio.Event(), gate_after=4)
    anthropic_server.add(silent, StreamedReply(text=["ok"]))
    async with AnthropicModel(
        MODEL, api_key=KEY, base_url=anthropic_server.base_url, retry=POLICY, timeout=30
    ) as model:
        events = await collect(model)
    assert events[0] == TextDelta("a")
    notice = events[1]
    assert isinstance(notice, RetryNotice)
    assert (notice.kind, notice.restarted) == ("timeout", True)
    assert notice.error.startswith("APITimeoutError")
    assert anthropic_server.requests[1].time == pytest.approx(30 + 0.5)
    assert events[2] == TextDelta("ok")


@pytest.mark.parametrize(
    ("status", "error_type", "kind"),
    [
        (400, "invalid_request_error", "bad_request"),
        (401, "authentication_error", "authentication"),
        (403, "permission_error", "permission"),
        (404, "not_found_error", "not_found"),
    ],
)
async def test_client_errors_are_not_retried(
    anthropic_server: AnthropicServer,
    model: AnthropicModel,
    status: int,
    error_type: str,
    kind: str,
) -> None:
    anthropic_server.add(ErrorReply(status, error_type), StreamedReply(text=["unused"]))
    seen: list[ModelEvent] = []
    info = await collect_until_error(model, seen)
    assert (info.value.kind, info.value.status, info.value.retryable) == (kind, status, False)
    assert error_type in str(info.value)
    assert seen == []
    assert anthropic_server.statistics().script_remaining == 1


async def test_retry_on_narrows_which_failures_are_retried(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(ErrorReply(529, "overloaded_error"), StreamedReply(text=["unused"]))
    policy = RetryPolicy(attempts=4, retry_on=(anthropic.RateLimitError,))
    async with AnthropicModel(
        MODEL, api_key=KEY, base_url=anthropic_server.base_url, retry=policy
    ) as model:
        info = await collect_until_error(model, [])
    assert (info.value.kind, info.value.retryable) == ("overloaded", True)
    assert anthropic_server.statistics().requests == 1


async def test_sdk_retries_are_off_even_on_a_given_client(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(ErrorReply(500, "api_error"), StreamedReply(text=["unused"]))
    client = anthropic.AsyncAnthropic(
        api_key=KEY, base_url=anthropic_server.base_url, max_retries=5
    )
    async with client:
        async with AnthropicModel(MODEL, client=client, retry=RetryPolicy(attempts=1)) as model:
            info = await collect_until_error(model, [])
        assert info.value.kind == "server_error"
        assert anthropic_server.statistics().requests == 1
        assert not client.is_closed()  # the model does not close a client it was given


# -- cancellation and closing: tests/test_sdk_models.py, for both models ------------------


# -- credentials ------------------------------------------------------------------


def test_missing_api_key_raises_an_authentication_error_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ModelError) as info:
        AnthropicModel()
    assert info.value.kind == "authentication"
    assert "ANTHROPIC_API_KEY" in str(info.value)


async def test_api_key_defaults_to_the_environment(
    anthropic_server: AnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY + "-from-env")
    anthropic_server.add(StreamedReply(text=["Hi"]))
    async with AnthropicModel(MODEL, base_url=anthropic_server.base_url) as model:
        assert KEY not in repr(model)
        await collect(model)
    assert anthropic_server.requests[0].api_key == KEY + "-from-env"
