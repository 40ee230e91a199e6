"""OpenAIModel: the real ``openai`` SDK over real HTTP against the local test server.

Nothing of the SDK or of its HTTP client (httpx2/httpcore2 on anyio, under
Trio) is mocked: every test talks to an :class:`~trioflow.testing.OpenAIServer`
on 127.0.0.1. Clocks as in ``test_anthropic_model.py``: backoff is timed on
``autojump_clock`` without ``fail_after`` guards or gates; tests with a gate
run on the real clock under ``trio.fail_after``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, cast

import openai
import pytest
import trio
import trio.testing
from conftest import (
    CLI_ENV,
    OPENAI_KEY,
    OPENAI_MODEL,
    POLICY,
    RunCli,
    collect,
    collect_until_error,
    notices,
)

from trioflow import Agent, FlowEvent, StreamingFlowExecutor, tool
from trioflow.models import open_model
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
from trioflow.models._openai import (
    BASE_URL_VARIABLE,
    DEFAULT_OPENAI_MODEL,
    DEFAULT_OPENAI_RETRY,
    OpenAIModel,
    _ChunkParser,
    chat_messages,
)
from trioflow.supervise import RetryPolicy
from trioflow.testing._openai_server import (
    ChatDisconnectAfter,
    ChatError,
    ChatErrorAfter,
    ChatReply,
    OpenAIServer,
    ToolUse,
)

pytestmark = pytest.mark.usefixtures("no_proxy_for_local_servers")


def model_for(server: OpenAIServer, **kwargs: Any) -> OpenAIModel:
    options: dict[str, Any] = {
        "model": OPENAI_MODEL,
        "api_key": OPENAI_KEY,
        "base_url": server.api_url,
        "retry": POLICY,
    }
    options.update(kwargs)
    return OpenAIModel(**options)


# -- streaming ------------------------------------------------------------------


async def test_model_implements_the_model_protocol(openai_model: OpenAIModel) -> None:
    assert isinstance(openai_model, Model)
    assert openai_model.name == OPENAI_MODEL
    async with OpenAIModel(api_key=OPENAI_KEY) as default:
        assert default.name == DEFAULT_OPENAI_MODEL
        assert default.retry_policy == DEFAULT_OPENAI_RETRY
        assert "api.openai.com" in repr(default)


@pytest.mark.parametrize("interleave", [False, True])
async def test_parallel_tool_calls_split_across_chunks_become_one_call_each(
    openai_server: OpenAIServer, openai_model: OpenAIModel, interleave: bool
) -> None:
    weather = {"city": "Paris", "units": "metric", "days": [1, 2, 3]}
    openai_server.add(
        ChatReply(
            text=["Let me check."],
            tool_calls=[
                ToolUse("get_weather", weather, id="call_1", chunk_size=3),
                ToolUse("get_time", {"tz": "Europe/Paris"}, id="call_2", chunk_size=5),
                ToolUse("now", id="call_3"),
            ],
            interleave=interleave,
            prompt_tokens=40,
            completion_tokens=17,
        )
    )
    streamed = await collect(openai_model)
    events = [e for e in streamed if not isinstance(e, ToolInputDelta)]
    assert events == [
        TextDelta("Let me check."),
        ToolCall("call_1", "get_weather", weather),
        ToolCall("call_2", "get_time", {"tz": "Europe/Paris"}),
        ToolCall("call_3", "now", {}),
        TurnEnd(StopReason.TOOL_USE, Usage(40, 17)),
    ]
    # The arguments stream as they arrive, before the calls (complete at the finish_reason).
    deltas = [e for e in streamed if isinstance(e, ToolInputDelta)]
    assert streamed.index(events[1]) == 1 + len(deltas)
    for index, call in enumerate(events[1:4]):
        assert isinstance(call, ToolCall)
        mine = [d for d in deltas if d.id == call.id]
        assert mine[0] == ToolInputDelta(call.id, call.name, "", index, first=True)
        assert all(d.index == index and d.name == call.name and d.partial_json for d in mine[1:])
        assert json.loads("".join(d.partial_json for d in mine) or "{}") == call.input
    if interleave:  # the calls' deltas interleave as their chunks did
        assert [d.id for d in deltas[:3]] == ["call_1", "call_2", "call_3"]


def test_tool_call_fragments_before_the_id_and_name_stream_once_both_are_known() -> None:
    parser = _ChunkParser(cast("Any", None))

    def chunk(*calls: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "choices": [{"index": 0, "delta": {"tool_calls": list(calls)}, "finish_reason": finish}]
        }

    assert parser.handle(chunk({"index": 0, "function": {"arguments": '{"a"'}})) == []
    assert parser.handle(chunk({"index": 0, "function": {"name": "f"}})) == []
    assert parser.handle(chunk({"index": 0, "id": "c1", "function": {"arguments": ":1"}})) == [
        ToolInputDelta("c1", "f", "", 0, first=True),
        ToolInputDelta("c1", "f", '{"a"', 0),
        ToolInputDelta("c1", "f", ":1", 0),
    ]
    # a later id does not rename a streamed call; a call that never got an id is call_<index>
    assert parser.handle(
        chunk(
            {"index": 0, "id": "other", "function": {"arguments": "}"}},
            {"index": 1, "function": {"name": "g", "arguments": "{}"}},
            finish="tool_calls",
        )
    ) == [
        ToolInputDelta("c1", "f", "}", 0),
        ToolCall("c1", "f", {"a": 1}),
        ToolInputDelta("call_1", "g", "", 1, first=True),
        ToolInputDelta("call_1", "g", "{}", 1),
        ToolCall("call_1", "g", {}),
    ]


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [
        ("stop", StopReason.END_TURN),
        ("length", StopReason.MAX_TOKENS),
        ("content_filter", StopReason.REFUSAL),
        ("something_new", "something_new"),
    ],
)
async def test_finish_reason_becomes_the_stop_reason(
    openai_server: OpenAIServer,
    openai_model: OpenAIModel,
    finish_reason: str,
    stop_reason: str,
) -> None:
    openai_server.add(ChatReply(text=["a"], finish_reason=finish_reason))
    *_, end = await collect(openai_model)
    assert end == TurnEnd(stop_reason, Usage(25, 1))


async def test_tool_calls_with_finish_reason_stop_still_end_in_tool_use(
    openai_server: OpenAIServer, openai_model: OpenAIModel
) -> None:
    # Some compatible servers say "stop" after tool calls.
    openai_server.add(ChatReply(tool_calls=[ToolUse("now", id="c")], finish_reason="stop"))
    events = [e for e in await collect(openai_model) if not isinstance(e, ToolInputDelta)]
    assert events[0] == ToolCall("c", "now", {})
    assert isinstance(events[1], TurnEnd)
    assert events[1].stop_reason == StopReason.TOOL_USE


async def test_tool_arguments_that_are_not_a_json_object_raise_invalid_response(
    openai_server: OpenAIServer, openai_model: OpenAIModel
) -> None:
    openai_server.add(
        ChatReply(tool_calls=[ToolUse("calc", id="c1", partial_json=['{"x": ', "1"])])
    )
    info = await collect_until_error(openai_model, [])
    assert (info.value.kind, info.value.retryable) == ("invalid_response", False)
    assert "c1" in str(info.value)
    assert openai_server.statistics().requests == 1


async def test_request_carries_model_messages_tool_results_tools_and_usage_option(
    openai_server: OpenAIServer, openai_model: OpenAIModel
) -> None:
    openai_server.add(ChatReply(text=["It is sunny."]))
    spec = ToolSpec(
        "get_weather",
        "The weather in a city.",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    conversation = [
        Message.user("Weather in Paris and Rome?"),
        Message(
            "assistant",
            (
                TextBlock("Checking."),
                ToolUseBlock("call_1", "get_weather", {"city": "Paris"}),
                ToolUseBlock("call_2", "get_weather", {"city": "Rome"}),
            ),
        ),
        Message(
            "user",
            (
                ToolResultBlock("call_1", "sunny"),
                ToolResultBlock("call_2", "no such city", is_error=True),
            ),
        ),
    ]
    await collect(openai_model, conversation, tools=[spec], system="Be brief.")
    (request,) = openai_server.requests
    assert request.path == "/v1/chat/completions"
    assert request.api_key == OPENAI_KEY
    body = request.body
    assert body["model"] == OPENAI_MODEL
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 1024
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "error: no such city"},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": dict(spec.input_schema),
            },
        }
    ]


async def test_max_tokens_field_is_configurable(openai_server: OpenAIServer) -> None:
    openai_server.add(ChatReply(text=["ok"]))
    async with model_for(
        openai_server, max_tokens=77, max_tokens_field="max_completion_tokens"
    ) as model:
        await collect(model)
    body = openai_server.requests[0].body
    assert body["max_completion_tokens"] == 77
    assert "max_tokens" not in body
    assert "tools" not in body
    with pytest.raises(ValueError, match="max_tokens_field"):
        OpenAIModel(api_key=OPENAI_KEY, max_tokens_field="tokens")  # type: ignore[arg-type]


def test_chat_messages_keeps_a_plain_assistant_reply_and_user_text_after_results() -> None:
    conversation = [
        Message("assistant", (TextBlock("Hello"),)),
        Message("user", (ToolResultBlock("c", "42"), TextBlock("and now?"))),
    ]
    assert chat_messages(conversation) == [
        {"role": "assistant", "content": "Hello"},
        {"role": "tool", "tool_call_id": "c", "content": "42"},
        {"role": "user", "content": "and now?"},
    ]


# -- retries ----------------------------------------------------------------------


async def test_429_and_503_are_retried_honouring_retry_after(
    autojump_clock: trio.testing.MockClock,
    openai_server: OpenAIServer,
    openai_model: OpenAIModel,
) -> None:
    openai_server.add(
        ChatError(429, retry_after=3), ChatError(503, retry_after=0.2), ChatReply(text=["ok"])
    )
    events = await collect(openai_model)
    first, second = notices(events)
    assert (first.kind, first.delay, first.attempt) == ("rate_limit", 3, 1)
    assert first.error.startswith("RateLimitError: 429 requests: Rate limit reached")
    assert "x-request-id req_test000001" in first.error
    assert (second.kind, second.delay) == ("server_error", 1.0)  # the backoff wins
    assert events[-2:] == [TextDelta("ok"), TurnEnd(StopReason.END_TURN, Usage(25, 1))]
    times = [r.time for r in openai_server.requests]
    assert times[1] - times[0] == pytest.approx(3)
    assert times[2] - times[1] == pytest.approx(1.0)


async def test_retries_give_up_after_the_policy_attempts(
    autojump_clock: trio.testing.MockClock,
    openai_server: OpenAIServer,
    openai_model: OpenAIModel,
) -> None:
    openai_server.add(*[ChatError(500)] * 4, ChatReply(text=["unused"]))
    seen: list[ModelEvent] = []
    info = await collect_until_error(openai_model, seen)
    assert (info.value.kind, info.value.status, info.value.retryable) == ("server_error", 500, True)
    assert "after 4 attempt(s)" in str(info.value)
    assert [n.delay for n in notices(seen)] == [0.5, 1.0, 2.0]


async def test_a_retry_after_beyond_the_cap_fails_at_once(
    openai_server: OpenAIServer,
) -> None:
    openai_server.add(ChatError(429, retry_after=120), ChatReply(text=["unused"]))
    async with model_for(openai_server, retry=RetryPolicy(attempts=4, max_retry_after=30)) as model:
        info = await collect_until_error(model, [])
    assert (info.value.kind, info.value.retry_after) == ("rate_limit", 120)
    assert "max_retry_after of 30 s" in str(info.value)
    assert openai_server.statistics().requests == 1


@pytest.mark.parametrize("complete_body", [False, True])
async def test_a_stream_cut_before_done_is_retried_from_the_start(
    autojump_clock: trio.testing.MockClock,
    openai_server: OpenAIServer,
    openai_model: OpenAIModel,
    complete_body: bool,
) -> None:
    cut = ChatDisconnectAfter(3, ChatReply(text=["a", "b", "c"]), complete_body=complete_body)
    openai_server.add(cut, ChatReply(text=["a", "b", "c"]))
    events = await collect(openai_model)
    assert events[:2] == [TextDelta("a"), TextDelta("b")]
    notice = events[2]
    assert isinstance(notice, RetryNotice)
    assert (notice.kind, notice.restarted) == ("connection", True)
    assert notice.error.startswith("APIConnectionError")
    if complete_body:
        assert "[DONE]" in notice.error
    assert events[3:] == [
        TextDelta("a"),
        TextDelta("b"),
        TextDelta("c"),
        TurnEnd(StopReason.END_TURN, Usage(25, 3)),
    ]


async def test_an_error_chunk_mid_stream_is_retried(
    autojump_clock: trio.testing.MockClock,
    openai_server: OpenAIServer,
    openai_model: OpenAIModel,
) -> None:
    openai_server.add(ChatErrorAfter(2, "The engine is overloaded."), ChatReply(text=["ok"]))
    events = await collect(openai_model)
    (notice,) = notices(events)
    assert (notice.kind, notice.restarted) == ("server_error", True)
    assert "mid-stream server_error: The engine is overloaded." in notice.error


async def test_an_error_chunk_with_a_client_error_code_is_not_retried(
    openai_server: OpenAIServer, openai_model: OpenAIModel
) -> None:
    # vLLM reports a request it cannot serve mid-stream with the status as the code.
    error = ChatErrorAfter(
        1, "This model's maximum context length is 8 tokens.", "BadRequestError", 400
    )
    openai_server.add(error, ChatReply(text=["unused"]))
    info = await collect_until_error(openai_model, [])
    assert (info.value.kind, info.value.status, info.value.retryable) == (
        "bad_request",
        None,
        False,
    )
    assert "maximum context length" in str(info.value)
    assert openai_server.statistics().requests == 1


async def test_invalid_data_in_the_stream_is_retried(
    autojump_clock: trio.testing.MockClock,
    openai_server: OpenAIServer,
    openai_model: OpenAIModel,
) -> None:
    openai_server.add(ChatReply(text=["a"], raw=[(1, b"data: {not json\n\n")]), ChatReply())
    events = await collect(openai_model)
    (notice,) = notices(events)
    assert notice.kind == "invalid_response"
    assert "not JSON" in notice.error


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "bad_request"), (401, "authentication"), (403, "permission"), (404, "not_found")],
)
async def test_client_errors_are_not_retried(
    openai_server: OpenAIServer, openai_model: OpenAIModel, status: int, kind: str
) -> None:
    openai_server.add(ChatError(status), ChatReply(text=["unused"]))
    seen: list[ModelEvent] = []
    info = await collect_until_error(openai_model, seen)
    assert (info.value.kind, info.value.status, info.value.retryable) == (kind, status, False)
    assert str(info.value).startswith("OpenAI request failed: ")
    assert seen == []
    assert openai_server.statistics().script_remaining == 1


async def test_an_unknown_model_is_a_clear_not_found_error(
    openai_server: OpenAIServer,
) -> None:
    openai_server.add(ChatError(404))
    async with model_for(openai_server, model="no-such-model") as model:
        info = await collect_until_error(model, [])
    assert info.value.kind == "not_found"
    assert "The model `no-such-model` does not exist" in str(info.value)


async def test_a_model_the_key_may_not_use_is_a_clear_permission_error(
    openai_server: OpenAIServer, openai_model: OpenAIModel
) -> None:
    message = f"Project does not have access to model `{OPENAI_MODEL}`."
    openai_server.add(ChatError(403, message, code="model_not_found"))
    info = await collect_until_error(openai_model, [])
    assert (info.value.kind, info.value.status, info.value.retryable) == ("permission", 403, False)
    assert message in str(info.value)


async def test_retry_on_narrows_which_failures_are_retried(openai_server: OpenAIServer) -> None:
    openai_server.add(ChatError(500), ChatReply(text=["unused"]))
    policy = RetryPolicy(attempts=4, retry_on=(openai.RateLimitError,))
    async with model_for(openai_server, retry=policy) as model:
        info = await collect_until_error(model, [])
    assert (info.value.kind, info.value.retryable) == ("server_error", True)
    assert openai_server.statistics().requests == 1


async def test_sdk_retries_are_off_even_on_a_given_client(openai_server: OpenAIServer) -> None:
    openai_server.add(ChatError(500), ChatReply(text=["unused"]))
    client = openai.AsyncOpenAI(
        api_key=OPENAI_KEY,
        base_url=openai_server.api_url,
        max_retries=5,
        http_client=openai.DefaultAsyncHttpxClient(),
    )
    async with client:
        async with OpenAIModel(OPENAI_MODEL, client=client, retry=RetryPolicy(attempts=1)) as model:
            info = await collect_until_error(model, [])
        assert info.value.kind == "server_error"
        assert openai_server.statistics().requests == 1
        assert not client.is_closed()  # the model does not close a client it was given


# -- cancellation and closing (the rest: tests/test_sdk_models.py, for both models) ----


async def test_cancelling_during_a_backoff_makes_no_further_attempt(
    openai_server: OpenAIServer, openai_model: OpenAIModel
) -> None:
    openai_server.add(ChatError(429, retry_after=10), ChatReply(text=["unused"]))
    seen: list[ModelEvent] = []
    noticed = trio.Event()

    async def consume() -> None:
        async with openai_model.stream([Message.user("Hi")]) as events:
            async for event in events:
                seen.append(event)
                noticed.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await noticed.wait()
            await trio.testing.wait_all_tasks_blocked()  # the consumer sleeps its backoff
            nursery.cancel_scope.cancel()
    assert [type(e) for e in seen] == [RetryNotice]
    assert openai_server.statistics().requests == 1


# -- credentials ------------------------------------------------------------------


def test_missing_api_key_raises_an_authentication_error_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelError) as info:
        OpenAIModel()
    assert info.value.kind == "authentication"
    assert "OPENAI_API_KEY" in str(info.value)


async def test_key_and_base_url_default_to_the_environment(
    openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY + "-from-env")
    monkeypatch.setenv(BASE_URL_VARIABLE, openai_server.api_url)
    openai_server.add(ChatReply(text=["Hi"]))
    async with OpenAIModel(OPENAI_MODEL) as model:
        assert OPENAI_KEY not in repr(model)
        assert openai_server.api_url in repr(model)
        await collect(model)
    assert openai_server.requests[0].api_key == OPENAI_KEY + "-from-env"


async def test_the_key_is_never_in_an_event_an_error_or_a_log(
    autojump_clock: trio.testing.MockClock,
    openai_server: OpenAIServer,
    openai_model: OpenAIModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Servers echo what they received; a key in an error message is redacted.
    echo = f"Incorrect API key provided: {OPENAI_KEY}."
    openai_server.add(
        ChatError(500, echo),
        ChatErrorAfter(1, echo),
        ChatError(401, echo),
    )
    caplog.set_level(logging.DEBUG)
    seen: list[ModelEvent] = []
    info = await collect_until_error(openai_model, seen)
    assert info.value.kind == "authentication"
    texts = [repr(e) for e in seen] + [str(info.value), repr(info.value), repr(openai_model)]
    texts += [r.getMessage() for r in caplog.records]
    loggers = {r.name.split(".")[0] for r in caplog.records}
    assert {"openai", "httpcore2"} <= loggers, loggers  # the SDK's debug logs were seen
    assert len(notices(seen)) == 2
    assert all("[redacted]" in n.error for n in notices(seen))
    assert "[redacted]" in str(info.value)
    assert [t for t in texts if OPENAI_KEY in t] == []
    assert openai_server.requests[0].api_key == OPENAI_KEY  # it was sent, all the same


# -- the agent over the model ---------------------------------------------------------


async def run_events(agent: Agent, task: str) -> list[FlowEvent]:
    executor = StreamingFlowExecutor()
    events: list[FlowEvent] = []
    async with trio.open_nursery() as nursery:
        run = await executor.start(agent, task, nursery=nursery)
        async with run.subscribe(after=0) as stream:
            async for event in stream:
                events.append(event)
                if event.is_terminal():
                    break
    return events


async def test_an_agent_runs_parallel_tool_calls_and_sends_their_results_back(
    openai_server: OpenAIServer, openai_model: OpenAIModel
) -> None:
    both_started = trio.Event()
    started: list[str] = []

    @tool
    async def get_weather(city: str) -> str:
        """The weather in a city."""
        started.append(city)
        if len(started) == 2:
            both_started.set()
        with trio.fail_after(5):
            await both_started.wait()  # each call waits for the other: they run concurrently
        return f"sunny in {city}"

    openai_server.add(
        ChatReply(
            tool_calls=[
                ToolUse("get_weather", {"city": "Paris"}, id="call_p", chunk_size=4),
                ToolUse("get_weather", {"city": "Rome"}, id="call_r", chunk_size=4),
            ],
            interleave=True,
        ),
        ChatReply(text=["Sunny ", "in both."]),
    )
    agent = Agent(openai_model, tools=[get_weather])
    events = await run_events(agent, "Weather in Paris and Rome?")
    assert events[-1].type == "flow.completed", events[-1]
    assert sorted(started) == ["Paris", "Rome"]
    second = openai_server.requests[1].body
    assert second["messages"][-2:] == [
        {"role": "tool", "tool_call_id": "call_p", "content": "sunny in Paris"},
        {"role": "tool", "tool_call_id": "call_r", "content": "sunny in Rome"},
    ]
    assert second["messages"][-3]["tool_calls"][1]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Rome"}',
    }
    assert [t["function"]["name"] for t in second["tools"]] == ["get_weather"]
    assert OPENAI_KEY not in json.dumps([e.to_json() for e in events])


async def test_a_failed_run_names_the_error_without_the_key(
    openai_server: OpenAIServer, openai_model: OpenAIModel
) -> None:
    openai_server.add(ChatError(401, f"Incorrect API key provided: {OPENAI_KEY}."))
    events = await run_events(Agent(openai_model), "Hi")
    assert events[-1].type == "flow.failed"
    assert "[redacted]" in json.dumps(events[-1].data)
    assert OPENAI_KEY not in json.dumps([e.to_json() for e in events])


# -- choosing the model ---------------------------------------------------------------


async def test_open_model_opens_openai_models_by_name(
    openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv(BASE_URL_VARIABLE, openai_server.api_url)
    openai_server.add(ChatReply(text=["Hi"]))
    async with open_model("openai:llama3.1:8b") as model:
        assert isinstance(model, OpenAIModel)
        assert model.name == "llama3.1:8b"
        await collect(model)
    assert openai_server.requests[0].body["model"] == "llama3.1:8b"
    async with open_model("openai") as model:
        assert model.name == DEFAULT_OPENAI_MODEL


@pytest.mark.parametrize("name", ["gpt-4o", "openai:", "openai: ", "anthropic:claude", "vllm:x"])
async def test_an_unknown_model_name_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="unknown model") as info:
        async with open_model(name):
            pass
    assert "'openai:NAME'" in str(info.value)


def test_cli_refuses_an_unknown_model_and_an_openai_model_without_key(run_cli: RunCli) -> None:
    proc = run_cli("run", "x", "--model", "gpt-4o")
    assert proc.returncode == 2
    assert "openai:NAME" in proc.stderr
    proc = run_cli("run", "x", "--model", "openai:gpt-4o")
    assert proc.returncode == 1
    assert "OPENAI_API_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_cli_runs_an_openai_model_from_the_environment(
    openai_server: OpenAIServer,
) -> None:
    openai_server.add(ChatReply(text=["Hello", " from", " vLLM"]))
    env = {**CLI_ENV, "OPENAI_API_KEY": OPENAI_KEY, BASE_URL_VARIABLE: openai_server.api_url}
    env["NO_PROXY"] = os.environ.get("NO_PROXY", "")  # the fixture's, with 127.0.0.1
    command = [sys.executable, "-m", "trioflow", "run", "Hi", "--model", "openai:served-model"]
    with trio.fail_after(60):
        proc = await trio.run_process(
            [*command, "--json"], capture_stdout=True, capture_stderr=True, env=env, check=False
        )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    tokens = [e["data"]["token"] for e in lines if e["type"] == "token.received"]
    assert "".join(tokens) == "Hello from vLLM"
    assert openai_server.requests[0].body["model"] == "served-model"
    assert OPENAI_KEY not in out + err
