"""Structured output: an agent's ``output_schema``: the answer parsed and checked, the model
told so, a mismatch a clear ``flow.failed``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from conftest import OPENAI_KEY, OPENAI_MODEL

from trioflow import Agent, FlowEvent, ScriptedModel, StreamingFlowExecutor, Turn
from trioflow.agent import OutputSchemaError
from trioflow.models import OpenAIModel
from trioflow.testing import ChatReply

if TYPE_CHECKING:
    from trioflow.testing import OpenAIServer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["m", "s"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


async def events_of(agent: Agent) -> list[FlowEvent]:
    async with StreamingFlowExecutor().stream(agent, "how much?") as events:
        return [event async for event in events]


@pytest.mark.parametrize(
    "text", ['{"answer": 4, "unit": "m"}', '```json\n{"answer": 4, "unit": "m"}\n```']
)
async def test_a_matching_answer_is_parsed_into_structured(text: str) -> None:
    events = await events_of(Agent(ScriptedModel([Turn([text])]), output_schema=SCHEMA))
    completed = events[-1]
    assert completed.type == "flow.completed"
    assert completed.data["structured"] == {"answer": 4, "unit": "m"}
    assert completed.data["output"] == text


@pytest.mark.parametrize(
    ("text", "message", "path"),
    [
        ("four", "the answer is not JSON", ""),
        ('{"answer": "four"}', "at /answer: 'four' is not of type 'integer'", "/answer"),
        ('{"answer": 4, "unit": "km"}', "at /unit:", "/unit"),
        ('{"unit": "m"}', "at the top: 'answer' is a required property", ""),
    ],
)
async def test_an_answer_that_does_not_match_fails_the_run_clearly(
    text: str, message: str, path: str
) -> None:
    events = await events_of(Agent(ScriptedModel([Turn([text])]), output_schema=SCHEMA))
    failed = events[-1]
    assert failed.type == "flow.failed"
    assert failed.data["error"]["type"] == "OutputSchemaError"
    assert message in failed.data["error"]["message"]
    model = ScriptedModel([Turn([text])])
    with pytest.raises(OutputSchemaError) as info:
        await Agent(model, output_schema=SCHEMA).run("how much?", _ignore)
    assert (info.value.output, info.value.path) == (text, path)


async def _ignore(type: str, data: object) -> None:
    pass


def test_an_invalid_schema_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        Agent(output_schema={"type": "nonsense"})


async def test_the_model_is_told_the_schema_after_the_system_prompt(
    openai_server: OpenAIServer,
) -> None:
    openai_server.add(ChatReply(text=['{"answer": 42}']))
    async with OpenAIModel(OPENAI_MODEL, api_key=OPENAI_KEY, base_url=openai_server.api_url) as m:
        agent = Agent(m, system="be exact", output_schema=SCHEMA)
        events = await events_of(agent)
    assert events[-1].data["structured"] == {"answer": 42}
    (request,) = openai_server.requests
    system = request.body["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("be exact\n\nGive your final answer as a single JSON value")
    assert '"required": ["answer"]' in system["content"]
    assert agent.replace(system="other").output_schema is SCHEMA
