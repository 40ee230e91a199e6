"""What AnthropicModel and OpenAIModel guarantee alike, from their shared code (``models/_sdk.py``).

Each test runs against both models, each on the real SDK talking to its
local protocol server: text deltas arrive as they are streamed, the HTTP
response is closed when a consumer is
cancelled or leaves early, nothing is left for the garbage collector, an
unclosed model never reaches for asyncio, a closed model refuses streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from conftest import KEY, OPENAI_KEY

from trioflow.models._base import Message, TextDelta
from trioflow.models._sdk import SDKModel
from trioflow.testing import AnthropicServer, ChatReply, OpenAIServer, StreamedReply

pytestmark = pytest.mark.usefixtures("no_proxy_for_local_servers")


@dataclasses.dataclass
class Api:
    """One model on its local server."""

    server: AnthropicServer | OpenAIServer
    model: SDKModel
    held: Callable[[list[str], int], Any]
    """``held(text, extra)``: a reply whose server holds the stream, for ever,
    ``extra`` frames after the first text delta."""
    new_model: Callable[[], SDKModel]
    """A new model on this server, not yet closed."""


@pytest.fixture(params=["anthropic", "openai"])
async def api(
    request: pytest.FixtureRequest,
    anthropic_server: AnthropicServer,
    model: SDKModel,
    openai_server: OpenAIServer,
    openai_model: SDKModel,
) -> Api:
    from trioflow.models._claude import AnthropicModel
    from trioflow.models._openai import OpenAIModel

    if request.param == "anthropic":
        # message_start, ping, content_block_start and the first delta come before the gate
        return Api(
            anthropic_server,
            model,
            lambda text, extra: StreamedReply(text=text, gate=trio.Event(), gate_after=4 + extra),
            lambda: AnthropicModel(api_key=KEY, base_url=anthropic_server.base_url),
        )
    # the role chunk and the first delta come before the gate
    return Api(
        openai_server,
        openai_model,
        lambda text, extra: ChatReply(text=text, gate=trio.Event(), gate_after=2 + extra),
        lambda: OpenAIModel(api_key=OPENAI_KEY, base_url=openai_server.api_url),
    )


async def test_text_deltas_arrive_in_order_as_they_are_streamed(api: Api) -> None:
    # The server holds the rest of the stream until the consumer has seen the first delta.
    reply = api.held(["Hel", "lo", " wor", "ld"], 0)
    api.server.add(reply)
    texts = []
    with trio.fail_after(5):
        async with api.model.stream([Message.user("Hi")]) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    texts.append(event.text)
                    if not reply.gate.is_set():
                        assert api.server.statistics().completed_responses == 0
                        reply.gate.set()
    assert texts == ["Hel", "lo", " wor", "ld"]


async def test_cancelling_mid_stream_closes_the_http_response_promptly(api: Api) -> None:
    api.server.add(api.held(["a", "b"], 0))
    first_delta = trio.Event()

    async def consume() -> None:
        async with api.model.stream([Message.user("Hi")]) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    first_delta.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await first_delta.wait()
            await trio.testing.wait_all_tasks_blocked()  # the consumer awaits the next bytes
            nursery.cancel_scope.cancel()
    with trio.fail_after(1):
        stats = await api.server.wait_until(lambda s: s.disconnects == 1)
    assert stats.active_responses == 0
    assert stats.completed_responses == 0


async def test_leaving_the_block_early_closes_the_response_and_leaves_nothing_to_gc(
    api: Api,
) -> None:
    api.server.add(api.held(["a", "b", "c"], 1))
    gc.collect()  # earlier tests' garbage (this worker ran others) is not this test's
    with warnings.catch_warnings(record=True) as caught, trio.fail_after(5):
        warnings.simplefilter("always")
        async with api.model.stream([Message.user("Hi")]) as events:
            async for _ in events:
                break
        gc.collect()
        stats = await api.server.wait_until(lambda s: s.disconnects == 1)
    assert stats.active_responses == 0
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_an_unclosed_model_is_collected_without_reaching_for_asyncio(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(asyncio, "get_running_loop", lambda: calls.append(1))
    model = api.new_model()
    del model
    gc.collect()
    assert calls == []


async def test_iterating_after_the_block_raises_closed_resource_error(api: Api) -> None:
    api.server.add(api.held(["a", "b"], 0))
    with trio.fail_after(5):
        async with api.model.stream([Message.user("Hi")]) as events:
            await events.__anext__()
    with pytest.raises(trio.ClosedResourceError):
        await events.__anext__()


async def test_a_closed_model_refuses_new_streams(api: Api) -> None:
    model = api.new_model()
    await model.aclose()
    await model.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        async with model.stream([Message.user("Hi")]):
            pass
    assert "closed" in repr(model)
