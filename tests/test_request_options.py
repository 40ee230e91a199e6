"""Per-request options of ``POST /runs`` (and a thread's runs): model, system prompt,
max_tokens, temperature, metadata; which models a request may name is the server's choice."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import OPENAI_KEY, OPENAI_MODEL, http_client

from trioflow import Agent, ScriptedModel, Turn
from trioflow.models import ModelOptions
from trioflow.models._openai import BASE_URL_VARIABLE
from trioflow.testing import ChatReply

if TYPE_CHECKING:
    from conftest import OpenSSE, StartWebServer

    from trioflow.testing import OpenAIServer


async def test_a_run_with_an_allowed_model_and_its_options_reaches_the_real_sdk(
    start_web_server: StartWebServer,
    openai_server: OpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv(BASE_URL_VARIABLE, openai_server.api_url)
    openai_server.add(ChatReply(text=["Bonjour"]))
    server = await start_web_server(allowed_models=(f"openai:{OPENAI_MODEL}",))
    async with http_client(server) as http:
        answer = await http.post(
            "/runs",
            json={
                "task": "say hi",
                "model": f"openai:{OPENAI_MODEL}",
                "system": "answer in French",
                "max_tokens": 50,
                "temperature": 0.2,
            },
        )
        assert answer.status_code == 201, answer.text
        run = server.executor.get_run(answer.json()["run_id"])
        with trio.fail_after(10):
            result = await run.wait()
    assert result.output == "Bonjour"
    (request,) = openai_server.requests
    body = request.body
    assert (body["model"], body["max_tokens"], body["temperature"]) == (OPENAI_MODEL, 50, 0.2)
    assert body["messages"][0] == {"role": "system", "content": "answer in French"}
    assert run.agent.model.name == OPENAI_MODEL


async def test_a_model_the_server_does_not_allow_is_refused(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(allowed_models=("scripted",))
    async with http_client(server) as http:
        refused = await http.post("/runs", json={"task": "hi", "model": "claude-opus-4"})
        allowed = await http.post("/runs", json={"task": "What is 2 + 2?", "model": "scripted"})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["code"], error["allowed"]) == ("model_not_allowed", ["scripted"])
    assert allowed.status_code == 201
    assert len(server.executor.runs) == 1  # the refused one never started


async def test_system_and_options_without_a_model_apply_to_the_servers_own(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=lambda request: Agent(ScriptedModel([Turn("ok")])))
    async with http_client(server) as http:
        answer = await http.post(
            "/runs", json={"task": "hi", "system": "be brief", "temperature": 1}
        )
    run = server.executor.get_run(answer.json()["run_id"])
    await run.wait()
    assert run.agent.system == "be brief"
    assert run.agent.options == ModelOptions(temperature=1.0)


async def test_metadata_is_kept_and_echoed_on_flow_started(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server()
    async with http_client(server) as http:
        answer = await http.post(
            "/runs", json={"task": "What is 2 + 2?", "metadata": {"user": "ann", "n": [1, 2]}}
        )
        run_id = answer.json()["run_id"]
        view = (await http.get(f"/runs/{run_id}")).json()
    async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
        frames = await stream.events()
    started = frames[0].json()
    assert started["type"] == "flow.started"
    assert started["data"]["metadata"] == {"user": "ann", "n": [1, 2], "source": "http"}
    assert view["metadata"] == {"user": "ann", "n": [1, 2], "source": "http"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": ""}, "'model' must be"),
        ({"model": 3}, "'model' must be"),
        ({"system": 5}, "'system' must be a string"),
        ({"max_tokens": 0}, "'max_tokens' must be an integer of at least 1"),
        ({"max_tokens": True}, "'max_tokens' must be"),
        ({"temperature": 2.5}, "'temperature' must be a number from 0 to 2"),
        ({"temperature": "hot"}, "'temperature' must be"),
        ({"metadata": ["a"]}, "'metadata' must be an object"),
        ({"metadata": {"source": "me"}}, "'metadata' may not set 'source'"),
        ({"metadata": {"thread_id": "t"}}, "'metadata' may not set 'thread_id'"),
    ],
)
async def test_bad_options_are_400s(
    start_web_server: StartWebServer, fields: dict[str, Any], message: str
) -> None:
    server = await start_web_server()
    async with http_client(server) as http:
        answer = await http.post("/runs", json={"task": "hi", **fields})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_request"
    assert message in answer.json()["error"]["message"]
    assert not server.executor.runs


async def test_an_allowed_model_that_cannot_open_is_a_503(
    start_web_server: StartWebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = await start_web_server(allowed_models=("openai:gpt-x",))
    async with http_client(server) as http:
        answer = await http.post("/runs", json={"task": "hi", "model": "openai:gpt-x"})
        health = await http.get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_unavailable"
    assert "OPENAI_API_KEY" in answer.json()["error"]["message"]
    assert health.status_code == 200
    assert not server.executor.runs


def test_model_options_are_checked() -> None:
    assert not ModelOptions()
    assert ModelOptions(max_tokens=5)
    with pytest.raises(ValueError, match="max_tokens"):
        ModelOptions(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        ModelOptions(temperature=-0.1)


def test_a_request_round_trips_through_its_json() -> None:
    from trioflow.web import RunRequest

    full = RunRequest.parse(
        {
            "task": "hi",
            "timeout": 5,
            "max_iterations": 2,
            "on_disconnect": "cancel",
            "model": "scripted",
            "system": "Be brief.",
            "max_tokens": 9,
            "temperature": 0.5,
            "metadata": {"k": [1]},
        }
    )
    assert RunRequest.parse(full.to_json()) == full
    assert RunRequest("hi").to_json() == {"task": "hi"}


async def test_request_agent_is_the_one_rule_of_server_and_worker() -> None:
    from trioflow.demo import default_agent_factory
    from trioflow.web import ModelNotAllowed, RunRequest, open_request_agent, request_agent

    factory = default_agent_factory()
    plain = request_agent(factory, RunRequest("hi", system="Terse.", max_tokens=7))
    assert plain.system == "Terse." and plain.options == ModelOptions(7, None)
    with pytest.raises(ModelNotAllowed, match="does not run model 'scripted'") as caught:
        request_agent(factory, RunRequest("hi", model="scripted"), ("claude-x",))
    assert isinstance(caught.value, ValueError) and caught.value.allowed == ("claude-x",)
    async with open_request_agent(
        factory, RunRequest("hi", model="scripted"), ("scripted",)
    ) as agent:
        assert agent.model.name == "scripted"
