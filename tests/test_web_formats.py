"""One event model, several wire formats of ``GET /runs/{id}/events``, chosen per request by
``?format=`` or ``Accept``; real Hypercorn on 127.0.0.1, on the connection-served path and
through the application."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import assert_no_traceback, http_client, start_run, talker

from trioflow import FlowEvent
from trioflow.web._errors import ApiError
from trioflow.web._formats import FORMATS, choose_format

if TYPE_CHECKING:
    from conftest import StartWebServer


@pytest.mark.parametrize(
    ("query", "accept", "expected"),
    [
        (b"", None, "sse"),
        (b"", "*/*", "sse"),
        (b"", "text/event-stream", "sse"),
        (b"", "application/x-ndjson", "ndjson"),
        (b"", "text/event-stream;q=0.5, application/x-ndjson", "ndjson"),
        (b"", "text/event-stream, application/x-ndjson;q=0.9", "sse"),
        (b"", "application/x-ndjson;q=0, text/event-stream", "sse"),
        (b"", "application/json", "sse"),
        (b"format=agui", "application/x-ndjson", "agui"),
        (b"after=3&format=vercel", None, "vercel"),
        (b"format=ndjson", None, "ndjson"),
        (b"format=sse", "application/x-ndjson", "sse"),
    ],
)
def test_the_format_is_the_querys_else_the_accept_headers(
    query: bytes, accept: str | None, expected: str
) -> None:
    headers = [] if accept is None else [(b"accept", accept.encode())]
    assert choose_format(query, headers) == expected


def test_an_unknown_format_is_a_400_naming_the_formats() -> None:
    with pytest.raises(ApiError) as refused:
        choose_format(b"format=xml", [])
    assert refused.value.status == 400 and refused.value.code == "invalid_format"
    assert FORMATS == ("sse", "ndjson", "agui", "vercel")


def data_lines(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.mark.parametrize("through_asgi", [False, True], ids=["direct", "asgi"])
async def test_every_format_of_one_run_from_the_events_path(
    start_web_server: StartWebServer, through_asgi: bool, server_log: pytest.LogCaptureFixture
) -> None:
    server = await start_web_server(agent=talker(words=12), through_asgi=through_asgi)
    run_id = await start_run(server)
    await server.executor.get_run(run_id).wait()
    path = f"/runs/{run_id}/events"
    with trio.fail_after(10):
        async with http_client(server) as http:
            sse = await http.get(path)
            by_query = await http.get(path, params={"format": "ndjson"})
            by_accept = await http.get(path, headers={"Accept": "application/x-ndjson"})
            ndjson = await http.get(f"{path}.ndjson")
            agui = await http.get(path, params={"format": "agui"})
            agui_path = await http.get(f"{path}.agui")
            vercel = await http.get(path, params={"format": "vercel"})
            vercel_path = await http.get(f"{path}.vercel")
            resumed = await http.get(
                path, params={"format": "ndjson"}, headers={"Last-Event-ID": "5"}
            )
            bad = await http.get(path, params={"format": "xml"})
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [FlowEvent.from_dict(d) for d in data_lines(sse.text)]
    for response in (by_query, by_accept):
        assert response.headers["content-type"] == "application/x-ndjson"
        assert response.text == ndjson.text
    assert [FlowEvent.from_json(line) for line in ndjson.text.splitlines() if line] == events
    assert [json.loads(x)["id"] for x in resumed.text.splitlines() if x] == [
        e.seq for e in events[5:]
    ]
    assert agui.text == agui_path.text
    kinds = [d["type"] for d in data_lines(agui.text)]
    assert kinds[0] == "RUN_STARTED" and kinds[-1] == "RUN_FINISHED"
    assert vercel.text == vercel_path.text
    assert vercel.headers["x-vercel-ai-ui-message-stream"] == "v1"
    chunks = data_lines(vercel.text)
    assert chunks[0]["type"] == "start" and chunks[-1] == "[DONE]"
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_format"
    assert bad.json()["error"]["allowed"] == list(FORMATS)
    assert_no_traceback(server_log)
