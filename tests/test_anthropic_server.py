"""The local Anthropic Messages API server: its wire protocol, its script and its counters.

The protocol is checked two ways: byte for byte with a bare HTTP/1.1 client
(a Trio socket and ``h11``), and by the real ``anthropic`` SDK, whose own
stream accumulator and error classes must understand what the server sends.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trioflow.testing._anthropic_server import (
    AnthropicServer,
    DisconnectAfter,
    ErrorEventAfter,
    ErrorReply,
    StreamedReply,
    ToolUse,
    encode_sse,
    open_anthropic_server,
)

KEY = "sk-ant-test-server-key-0001"
REQUEST = {
    "model": "claude-sonnet-5-5",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Hi"}],
    "stream": True,
}


@pytest.fixture(autouse=True)
def _no_proxy_for_the_local_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's HTTP client routes through $HTTP(S)_PROXY / $ALL_PROXY when set.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))


class RawClient:
    """A bare HTTP/1.1 client, to see exactly what the server sends."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)
        self.raw = bytearray()
        self._buffer = b""
        self._ended = False

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(65536)
            self.raw += data
            self.conn.receive_data(data)

    async def request(
        self,
        method: str = "POST",
        path: str = "/v1/messages",
        body: Any = REQUEST,
        headers: Sequence[tuple[str, str]] = (("x-api-key", KEY),),
    ) -> h11.Response:
        self._buffer, self._ended = b"", False
        payload = b"" if body is None else json.dumps(body).encode()
        all_headers = [
            ("host", self.host),
            ("content-type", "application/json"),
            ("content-length", str(len(payload))),
            *headers,
        ]
        data = self.conn.send(h11.Request(method=method, target=path, headers=all_headers))
        if payload:
            data += self.conn.send(h11.Data(data=payload))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        response = await self._next_event()
        assert isinstance(response, h11.Response)
        return response

    async def next_frame(self) -> bytes | None:
        """The next SSE frame, blank line included; ``None`` at the end of the body."""
        while b"\n\n" not in self._buffer:
            if self._ended:
                assert self._buffer == b""
                return None
            event = await self._next_event()
            if isinstance(event, h11.Data):
                self._buffer += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._ended = True
        frame, _, self._buffer = self._buffer.partition(b"\n\n")
        return frame + b"\n\n"

    async def frames(self) -> list[bytes]:
        frames = []
        while (frame := await self.next_frame()) is not None:
            frames.append(frame)
        return frames

    async def body(self) -> bytes:
        body = b""
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data)
            body += event.data
        return body


@asynccontextmanager
async def open_raw(server: AnthropicServer) -> AsyncIterator[RawClient]:
    host, _, port = server.base_url.removeprefix("http://").rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        yield RawClient(stream, f"{host}:{port}")


def headers_of(response: h11.Response) -> dict[str, str]:
    return {name.decode(): value.decode() for name, value in response.headers}


def parse_frame(frame: bytes) -> tuple[str, dict[str, Any]]:
    """Check one frame is exactly ``event: ...\\ndata: <json>\\n\\n`` and decode it."""
    event_line, data_line, blank, end = frame.decode().split("\n")
    assert (blank, end) == ("", "")
    assert event_line.startswith("event: ")
    assert data_line.startswith("data: ")
    data = json.loads(data_line.removeprefix("data: "))
    assert data["type"] == event_line.removeprefix("event: ")
    return event_line.removeprefix("event: "), data


@asynccontextmanager
async def sdk_client(server: AnthropicServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        api_key=KEY,
        base_url=server.base_url,
        max_retries=0,
        http_client=anthropic.DefaultAsyncHttpxClient(),
    ) as client:
        yield client


# -- the streaming protocol -------------------------------------------------------


async def test_streamed_reply_is_a_chunked_event_stream_with_a_request_id(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"]))
    async with open_raw(anthropic_server) as client:
        response = await client.request()
        await client.frames()
    headers = headers_of(response)
    assert response.status_code == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["request-id"].startswith("req_")
    assert "content-length" not in headers


async def test_streamed_reply_sends_the_messages_api_events_in_order(
    anthropic_server: AnthropicServer,
) -> None:
    reply = StreamedReply(text=["Hel", "lo"], tool_uses=[ToolUse("get", {"q": 1}, id="toolu_9")])
    anthropic_server.add(reply)
    async with open_raw(anthropic_server) as client:
        await client.request()
        frames = await client.frames()
    events = [parse_frame(frame) for frame in frames]
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    expected = reply.sse_events(model="claude-sonnet-5-5", message_id="msg_test000001", request=1)
    assert frames == [encode_sse(name, data) for name, data in expected]


async def test_message_start_carries_the_message_object(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"], input_tokens=12))
    async with open_raw(anthropic_server) as client:
        await client.request()
        _, start = parse_frame(await client.next_frame() or b"")
    message = start["message"]
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == (
        "message",
        "assistant",
        "claude-sonnet-5-5",
    )
    assert (message["content"], message["stop_reason"]) == ([], None)
    assert message["usage"]["input_tokens"] == 12
    assert "output_tokens" in message["usage"]


async def test_message_delta_carries_stop_reason_and_output_tokens(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"], output_tokens=9, stop_reason="max_tokens"))
    async with open_raw(anthropic_server) as client:
        await client.request()
        events = dict(parse_frame(frame) for frame in await client.frames())
    assert events["message_delta"]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events["message_delta"]["usage"] == {"output_tokens": 9}


@settings(max_examples=50)
@given(
    tool_input=st.dictionaries(st.text(), st.integers() | st.text(), max_size=5),
    chunk_size=st.integers(1, 12),
)
def test_tool_input_json_is_cut_into_pieces_of_chunk_size(
    tool_input: dict[str, Any], chunk_size: int
) -> None:
    tool = ToolUse("t", tool_input, chunk_size=chunk_size)
    pieces = tool.json_pieces()
    assert json.loads("".join(pieces)) == tool_input
    assert all(len(piece) <= chunk_size for piece in pieces)
    assert len(pieces) == math.ceil(len("".join(pieces)) / chunk_size)


async def test_tool_use_input_is_streamed_as_input_json_delta_events(
    anthropic_server: AnthropicServer,
) -> None:
    tool = ToolUse("get_weather", {"city": "Paris", "days": 3}, id="toolu_1", chunk_size=5)
    anthropic_server.add(StreamedReply(tool_uses=[tool]))
    async with open_raw(anthropic_server) as client:
        await client.request()
        events = [parse_frame(frame) for frame in await client.frames()]
    (start,) = [data for name, data in events if name == "content_block_start"]
    assert start["content_block"] == {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "get_weather",
        "input": {},
    }
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert {delta["type"] for delta in deltas} == {"input_json_delta"}
    assert [delta["partial_json"] for delta in deltas] == tool.json_pieces()
    assert len(deltas) > 1


async def test_sdk_accumulates_the_streamed_message(anthropic_server: AnthropicServer) -> None:
    weather = {"city": "Paris", "days": [1, 2]}
    anthropic_server.add(
        StreamedReply(
            text=["Let me ", "check."],
            tool_uses=[ToolUse("get_weather", weather, id="toolu_1", chunk_size=3)],
            input_tokens=30,
            output_tokens=11,
        )
    )
    async with (
        sdk_client(anthropic_server) as client,
        client.messages.stream(
            model="claude-sonnet-5-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        ) as stream,
    ):
        message = await stream.get_final_message()
    text, tool = message.content
    assert text.type == "text"
    assert text.text == "Let me check."
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == ("toolu_1", "get_weather", weather)
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (30, 11)


async def test_sdk_parses_the_whole_message_of_a_request_without_stream(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["Hel", "lo"], output_tokens=2))
    async with sdk_client(anthropic_server) as client:
        message = await client.messages.create(
            model="claude-sonnet-5-5", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        )
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello"
    assert (message.stop_reason, message.usage.output_tokens) == ("end_turn", 2)


# -- errors -------------------------------------------------------------------------


async def test_error_reply_is_a_json_error_with_status_request_id_and_retry_after(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(ErrorReply(429, "rate_limit_error", "slow down", retry_after=7))
    async with open_raw(anthropic_server) as client:
        response = await client.request()
        body = json.loads(await client.body())
    headers = headers_of(response)
    assert response.status_code == 429
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"] == "7"
    assert body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
        "request_id": headers["request-id"],
    }


@pytest.mark.parametrize(
    ("status", "error_type", "exception"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (403, "permission_error", anthropic.PermissionDeniedError),
        (404, "not_found_error", anthropic.NotFoundError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (529, "overloaded_error", anthropic.OverloadedError),
    ],
)
async def test_sdk_raises_its_status_error_for_an_error_reply(
    anthropic_server: AnthropicServer,
    status: int,
    error_type: str,
    exception: type[anthropic.APIStatusError],
) -> None:
    anthropic_server.add(ErrorReply(status, error_type))
    async with sdk_client(anthropic_server) as client:
        with pytest.raises(exception) as info:
            await client.messages.create(**REQUEST)
    assert info.value.status_code == status
    assert info.value.request_id == "req_test000001"
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == error_type


async def test_error_event_after_n_events_ends_the_stream_with_an_error_event(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(ErrorEventAfter(4, "overloaded_error"))
    async with open_raw(anthropic_server) as client:
        response = await client.request()
        frames = await client.frames()
    assert response.status_code == 200
    assert len(frames) == 5
    assert frames[-1] == (
        b'event: error\ndata: {"type":"error","error":'
        b'{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )


async def test_sdk_raises_a_status_error_for_an_error_event(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(ErrorEventAfter(4, "api_error"))
    async with sdk_client(anthropic_server) as client:
        stream = await client.messages.create(**REQUEST)
        with pytest.raises(anthropic.APIStatusError) as info:
            async for _ in stream:
                pass
    assert info.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "Internal server error"},
    }


async def test_unknown_path_gets_a_404_json_error_and_keeps_the_script(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"]))
    async with open_raw(anthropic_server) as client:
        response = await client.request("GET", "/v1/models", body=None)
        body = json.loads(await client.body())
    assert response.status_code == 404
    assert body["error"]["type"] == "not_found_error"
    assert anthropic_server.statistics().script_remaining == 1
    assert anthropic_server.requests[0].path == "/v1/models"


async def test_body_that_is_not_json_gets_a_400_and_keeps_the_script(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"]))
    async with open_raw(anthropic_server) as client:
        response = await client.request(body="not an object")
        body = json.loads(await client.body())
    assert response.status_code == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert anthropic_server.statistics().script_remaining == 1


async def test_exhausted_script_gets_a_500_api_error_and_is_counted(
    anthropic_server: AnthropicServer,
) -> None:
    async with open_raw(anthropic_server) as client:
        response = await client.request()
        body = json.loads(await client.body())
    assert response.status_code == 500
    assert body["error"]["type"] == "api_error"
    assert "script exhausted" in body["error"]["message"]
    assert anthropic_server.statistics().unscripted == 1
    assert anthropic_server.requests[0].unscripted


# -- disconnects ------------------------------------------------------------------


async def test_disconnect_after_n_events_cuts_the_body_short(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(DisconnectAfter(3))
    async with open_raw(anthropic_server) as client:
        await client.request()
        frames = [await client.next_frame() for _ in range(3)]
        with pytest.raises(h11.RemoteProtocolError):
            await client.next_frame()
    assert [parse_frame(f or b"")[0] for f in frames] == [
        "message_start",
        "ping",
        "content_block_start",
    ]
    stats = await anthropic_server.wait_until(lambda s: s.open_connections == 0)
    assert (stats.dropped, stats.disconnects, stats.completed_responses) == (1, 0, 0)


async def test_disconnect_with_a_complete_body_ends_the_stream_early(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(DisconnectAfter(3, complete_body=True))
    async with open_raw(anthropic_server) as client:
        await client.request()
        frames = await client.frames()
    assert len(frames) == 3
    stats = await anthropic_server.wait_until(lambda s: s.active_responses == 0)
    assert (stats.dropped, stats.completed_responses) == (1, 0)


async def test_disconnect_without_headers_sends_no_response(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(DisconnectAfter(0, headers=False))
    async with open_raw(anthropic_server) as client:
        with pytest.raises(h11.RemoteProtocolError):
            await client.request()
        assert client.raw == b""


async def test_client_closing_mid_stream_is_counted_as_a_disconnect(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["a", "b"], gate=trio.Event(), gate_after=4))
    with trio.fail_after(5):
        async with open_raw(anthropic_server) as client:
            await client.request()
            for _ in range(4):
                await client.next_frame()
            assert anthropic_server.statistics().active_responses == 1
        stats = await anthropic_server.wait_until(lambda s: s.open_connections == 0)
    assert (stats.disconnects, stats.active_responses, stats.completed_responses) == (1, 0, 0)


# -- pacing and gates ---------------------------------------------------------------


async def test_pace_spaces_the_events_on_trios_clock(
    autojump_clock: trio.testing.MockClock, anthropic_server: AnthropicServer
) -> None:
    reply = StreamedReply(text=["a", "b"], pace=0.25)
    anthropic_server.add(reply)
    times = []
    async with open_raw(anthropic_server) as client:
        await client.request()
        start = trio.current_time()
        while await client.next_frame() is not None:
            times.append(trio.current_time() - start)
    assert times == pytest.approx([0.25 * (i + 1) for i in range(len(reply.sse_events()))])


async def test_gate_holds_the_stream_until_it_is_set(anthropic_server: AnthropicServer) -> None:
    gate = trio.Event()
    anthropic_server.add(StreamedReply(text=["a", "b"], gate=gate, gate_after=4))
    with trio.fail_after(5):
        async with open_raw(anthropic_server) as client:
            await client.request()
            for _ in range(4):
                await client.next_frame()
            await trio.testing.wait_all_tasks_blocked()
            assert b"message_stop" not in client.raw
            gate.set()
            rest = await client.frames()
    assert parse_frame(rest[-1])[0] == "message_stop"


# -- records and counters -------------------------------------------------------------


async def test_requests_are_recorded_with_headers_and_json_body(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"]))
    async with open_raw(anthropic_server) as client:
        await client.request(headers=[("x-api-key", KEY), ("anthropic-version", "2023-06-01")])
        await client.frames()
    (request,) = anthropic_server.requests
    assert (request.method, request.path, request.body) == ("POST", "/v1/messages", REQUEST)
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.api_key == KEY
    assert isinstance(request.reply, StreamedReply)


async def test_sdk_credentials_are_recorded_as_the_api_key(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["Hi"]))
    async with sdk_client(anthropic_server) as client:
        stream = await client.messages.create(**REQUEST)
        async for _ in stream:
            pass
    assert anthropic_server.requests[0].api_key == KEY


async def test_connection_is_kept_alive_across_requests(
    anthropic_server: AnthropicServer,
) -> None:
    anthropic_server.add(StreamedReply(text=["a"]), ErrorReply(529, "overloaded_error"))
    anthropic_server.add(StreamedReply(text=["b"]))
    async with open_raw(anthropic_server) as client:
        await client.request()
        await client.frames()
        client.conn.start_next_cycle()
        assert (await client.request()).status_code == 529
        await client.body()
        client.conn.start_next_cycle()
        await client.request()
        assert parse_frame((await client.frames())[-1])[0] == "message_stop"
        stats = anthropic_server.statistics()
    assert (stats.requests, stats.open_connections, stats.script_remaining) == (3, 1, 0)


async def test_server_starts_with_nursery_start_and_reports_its_url() -> None:
    server = AnthropicServer([StreamedReply(text=["Hi"])])
    with pytest.raises(RuntimeError):
        _ = server.base_url
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve)
        assert url == server.base_url
        assert url.startswith("http://127.0.0.1:")
        assert url in repr(server)
        nursery.cancel_scope.cancel()


async def test_open_anthropic_server_serves_its_script_in_order() -> None:
    script = [ErrorReply(529, "overloaded_error"), StreamedReply(text=["Hi"])]
    async with open_anthropic_server(script) as server, open_raw(server) as client:
        assert (await client.request()).status_code == 529
        await client.body()
        client.conn.start_next_cycle()
        assert (await client.request()).status_code == 200
        await client.frames()
    assert [r.reply for r in server.requests] == script


def test_raw_bytes_go_out_verbatim_before_the_event_they_precede() -> None:
    reply = StreamedReply(text=["a"], raw=[(3, b"data: not json\n\n"), (99, b"\xff\n\n")])
    events = reply.sse_events()
    frames = reply.sse_frames()
    assert len(frames) == len(events)
    assert frames[3] == b"data: not json\n\n" + encode_sse(*events[3])
    assert frames[-1] == encode_sse(*events[-1]) + b"\xff\n\n"
    assert [f for i, f in enumerate(frames) if i not in (3, len(frames) - 1)] == [
        encode_sse(*e) for i, e in enumerate(events) if i not in (3, len(events) - 1)
    ]
    with pytest.raises(ValueError, match="raw indexes"):
        StreamedReply(raw=[(-1, b"data: x\n\n")])
