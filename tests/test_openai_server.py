"""The local OpenAI Chat Completions server, checked against the real ``openai`` SDK.

The SDK's types (``ChatCompletionChunk``) and its error mapping are the
oracle: what the server sends must read as OpenAI's wire format to them.
Streamed bodies are read whole with ``httpx2`` and parsed into the SDK's
chunk type; the SDK's own stream iterator is not used, as it leaves its
async generators suspended after ``[DONE]`` (Trio warns when the garbage
collector finds them; :class:`~trioflow.models.OpenAIModel` decodes the body
itself for that reason).
"""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
import trio
from conftest import OPENAI_KEY
from openai.types.chat import ChatCompletionChunk

from trioflow.testing import (
    DONE_FRAME,
    ChatDisconnectAfter,
    ChatError,
    ChatErrorAfter,
    ChatReply,
    OpenAIServer,
    RecordedRequest,
    ServerStatistics,
    ToolUse,
    encode_chunk,
    open_openai_server,
)

pytestmark = pytest.mark.usefixtures("no_proxy_for_local_servers")

MESSAGES: list[Any] = [{"role": "user", "content": "Hi"}]


def client_for(server: OpenAIServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=OPENAI_KEY,
        base_url=server.api_url,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(),
    )


async def frames_of(server: OpenAIServer, **params: Any) -> list[bytes]:
    """The ``data:`` payloads of one streamed request's whole body."""
    body = {"model": "gpt-test", "messages": MESSAGES, "stream": True, **params}
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            server.api_url + "/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {OPENAI_KEY}"},
        )
    assert response.status_code == 200
    assert response.content.endswith(b"\n\n")
    frames = response.content.split(b"\n\n")[:-1]
    assert all(f.startswith(b"data: ") for f in frames)
    return [f.removeprefix(b"data: ") for f in frames]


async def chunks_of(server: OpenAIServer, **params: Any) -> list[ChatCompletionChunk]:
    """The chunks of one streamed request, as the SDK's type, after checking the ``[DONE]``."""
    frames = await frames_of(server, **params)
    assert frames[-1] == b"[DONE]"
    return [ChatCompletionChunk.model_validate_json(f) for f in frames[:-1]]


async def test_text_deltas_finish_reason_and_usage_read_as_chunks(
    openai_server: OpenAIServer,
) -> None:
    openai_server.add(ChatReply(text=["Hel", "lo"], prompt_tokens=7, completion_tokens=2))
    chunks = await chunks_of(openai_server, stream_options={"include_usage": True})
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == "gpt-test" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:3]] == ["Hel", "lo"]
    assert chunks[3].choices[0].finish_reason == "stop"
    assert chunks[4].choices == []
    assert chunks[4].usage is not None
    assert (chunks[4].usage.prompt_tokens, chunks[4].usage.completion_tokens) == (7, 2)
    with trio.fail_after(5):
        await openai_server.wait_until(lambda s: s.completed_responses == 1)


async def test_usage_chunk_only_when_asked(openai_server: OpenAIServer) -> None:
    openai_server.add(ChatReply(text=["a"]))
    chunks = await chunks_of(openai_server)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("interleave", [False, True])
async def test_parallel_tool_calls_arrive_in_pieces_told_apart_by_index(
    openai_server: OpenAIServer, interleave: bool
) -> None:
    openai_server.add(
        ChatReply(
            tool_calls=[
                ToolUse("a", {"x": 1, "long": "abcdefgh"}, chunk_size=3),
                ToolUse("b", {"y": [1, 2]}, id="call_b", chunk_size=2),
            ],
            interleave=interleave,
        )
    )
    chunks = await chunks_of(openai_server)
    calls: dict[int, dict[str, Any]] = {}
    indexes = []
    for chunk in chunks:
        for piece in chunk.choices[0].delta.tool_calls or ():
            assert len(chunk.choices[0].delta.tool_calls) == 1
            indexes.append(piece.index)
            entry = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id:
                entry["id"] = piece.id
            if piece.function.name:
                entry["name"] = piece.function.name
            entry["arguments"] += piece.function.arguments or ""
    assert calls == {
        0: {"id": "call_test000100", "name": "a", "arguments": '{"x":1,"long":"abcdefgh"}'},
        1: {"id": "call_b", "name": "b", "arguments": '{"y":[1,2]}'},
    }
    assert (indexes[:2] == [0, 1]) is interleave
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_the_stream_ends_with_done_in_a_chunked_event_stream(
    openai_server: OpenAIServer,
) -> None:
    openai_server.add(ChatReply(text=["a"]))
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            openai_server.api_url + "/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.headers["x-request-id"] == "req_test000001"
    assert response.content.endswith(DONE_FRAME)
    assert response.content.startswith(b"data: {")
    assert encode_chunk({"a": 1}) == b'data: {"a":1}\n\n'


@pytest.mark.parametrize(
    ("error", "exc_type", "error_type", "code"),
    [
        (ChatError(429, retry_after=2), openai.RateLimitError, "requests", "rate_limit_exceeded"),
        (ChatError(503, retry_after=0.5), openai.InternalServerError, "server_error", None),
        (ChatError(401), openai.AuthenticationError, "invalid_request_error", "invalid_api_key"),
        (ChatError(404), openai.NotFoundError, "invalid_request_error", "model_not_found"),
    ],
)
async def test_errors_read_as_the_sdk_exceptions_with_retry_after(
    openai_server: OpenAIServer,
    error: ChatError,
    exc_type: type[openai.APIStatusError],
    error_type: str,
    code: str | None,
) -> None:
    openai_server.add(error)
    with pytest.raises(exc_type) as info:
        async with client_for(openai_server) as client:
            # raises for the status, before any stream is made
            await client.chat.completions.create(model="nope", messages=MESSAGES, stream=True)
    assert info.value.status_code == error.status
    assert info.value.type == error_type
    assert info.value.code == code
    assert info.value.response.headers.get("x-request-id") == "req_test000001"
    if error.retry_after is not None:
        assert float(info.value.response.headers["retry-after"]) == error.retry_after
    if error.status == 404:
        assert "The model `nope` does not exist" in info.value.message


async def test_an_error_chunk_mid_stream_follows_the_first_chunks(
    openai_server: OpenAIServer,
) -> None:
    openai_server.add(ChatErrorAfter(2, "overloaded now"))
    frames = await frames_of(openai_server)
    assert len(frames) == 3
    assert [ChatCompletionChunk.model_validate_json(f).id for f in frames[:2]] == [
        "chatcmpl-test000001"
    ] * 2
    assert frames[2] == (
        b'{"error":{"message":"overloaded now","type":"server_error","param":null,"code":null}}'
    )


@pytest.mark.parametrize("complete_body", [False, True])
async def test_a_disconnect_cuts_the_stream_before_done(
    openai_server: OpenAIServer, complete_body: bool
) -> None:
    openai_server.add(ChatDisconnectAfter(2, complete_body=complete_body))
    async with httpx2.AsyncClient() as http:
        request = http.build_request(
            "POST",
            openai_server.api_url + "/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
        )
        response = await http.send(request, stream=True)
        body = b""
        try:
            async for data in response.aiter_bytes():
                body += data
        except httpx2.TransportError:
            assert not complete_body
        else:
            assert complete_body
        finally:
            await response.aclose()
    assert body.count(b"data: ") == 2
    assert DONE_FRAME not in body
    stats = await openai_server.wait_until(lambda s: s.dropped == 1)
    assert stats.completed_responses == 0


async def test_a_disconnect_without_headers_sends_nothing(openai_server: OpenAIServer) -> None:
    openai_server.add(ChatDisconnectAfter(0, headers=False))
    with pytest.raises(httpx2.TransportError):
        await frames_of(openai_server)
    assert openai_server.statistics().dropped == 1


async def test_non_streaming_requests_unknown_paths_and_an_empty_script_get_errors(
    openai_server: OpenAIServer,
) -> None:
    openai_server.add(ChatReply(text=["unused"]))
    async with client_for(openai_server) as client:
        with pytest.raises(openai.BadRequestError, match="only streamed requests"):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="m", input="x")
        with pytest.raises(openai.InternalServerError, match="script exhausted"):
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    stats = openai_server.statistics()
    assert isinstance(stats, ServerStatistics)
    assert (stats.requests, stats.unscripted, stats.script_remaining) == (3, 1, 0)


async def test_requests_are_recorded_with_key_body_and_reply(
    openai_server: OpenAIServer,
) -> None:
    reply = ChatReply(text=["a"])
    openai_server.add(reply)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    await chunks_of(openai_server, model="m1", tools=tools, max_tokens=5)
    (request,) = openai_server.requests
    assert isinstance(request, RecordedRequest)
    assert (request.method, request.path, request.reply) == ("POST", "/v1/chat/completions", reply)
    assert request.api_key == OPENAI_KEY
    assert request.body["model"] == "m1"
    assert request.body["messages"] == MESSAGES
    assert request.body["tools"] == tools
    assert request.body["max_tokens"] == 5


async def test_a_gated_reply_holds_the_stream_and_repr_names_the_server() -> None:
    gate = trio.Event()
    async with open_openai_server([ChatReply(text=["a", "b"], gate=gate, gate_after=2)]) as server:
        assert server.base_url in repr(server)
        assert repr(server).startswith("<OpenAIServer")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(chunks_of, server)
            with trio.fail_after(5):
                stats = await server.wait_until(lambda s: s.active_responses == 1)
                assert stats.completed_responses == 0
                gate.set()
                await server.wait_until(lambda s: s.completed_responses == 1)
    assert repr(OpenAIServer()) == "<OpenAIServer not started>"
    with pytest.raises(RuntimeError):
        OpenAIServer().api_url  # noqa: B018


def test_script_items_check_their_arguments() -> None:
    with pytest.raises(ValueError):
        ToolUse("f", chunk_size=0)
    with pytest.raises(ValueError):
        ChatReply(raw=[(-1, b"")])
    assert ToolUse("f", partial_json=["{", "}"]).json_pieces() == ["{", "}"]
