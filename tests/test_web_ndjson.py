"""``GET /runs/{id}/events.ndjson``: a run's events as newline-delimited JSON, with the event
stream's decision (access, resume, 204) and flow control; real Hypercorn on 127.0.0.1."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import trio
from conftest import http_client, start_run, talker

from trioflow import FlowEvent

if TYPE_CHECKING:
    from conftest import StartWebServer


async def lines_of(server: object, path: str, **headers: str) -> tuple[int, str, list[str]]:
    async with http_client(server) as http:  # type: ignore[arg-type]
        response = await http.get(path, headers=headers)
    return response.status_code, response.headers.get("content-type", ""), response.text.split("\n")


async def test_a_run_as_ndjson_one_event_per_line(start_web_server: StartWebServer) -> None:
    server = await start_web_server(agent=talker(words=20, pace=200))
    run_id = await start_run(server)
    with trio.fail_after(10):
        status, media, lines = await lines_of(server, f"/runs/{run_id}/events.ndjson")
    assert (status, media) == (200, "application/x-ndjson")
    assert lines[-1] == ""  # every line ends with a newline
    events = [FlowEvent.from_json(line) for line in lines if line]
    run = server.executor.get_run(run_id)
    assert [e.seq for e in events] == list(range(1, run.last_seq + 1))
    assert events[0].type == "flow.started" and events[-1].type == "flow.completed"
    assert [e.to_json() for e in events] == [line for line in lines if line]


async def test_ndjson_resumes_after_a_seq_and_answers_204_when_nothing_is_left(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=10))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    await run.wait()
    path = f"/runs/{run_id}/events.ndjson"
    _, _, after = await lines_of(server, f"{path}?after=5")
    _, _, header = await lines_of(server, path, **{"Last-Event-ID": "5"})
    assert after == header
    assert [json.loads(line)["id"] for line in after if line] == list(range(6, run.last_seq + 1))
    status, _, _ = await lines_of(server, f"{path}?after={run.last_seq}")
    assert status == 204


async def test_ndjson_errors_are_json(start_web_server: StartWebServer) -> None:
    server = await start_web_server(history=8, agent=talker(words=20))
    run_id = await start_run(server)
    await server.executor.get_run(run_id).wait()
    status, media, body = await lines_of(server, "/runs/run_nope/events.ndjson")
    assert status == 404 and "json" in media
    assert json.loads("\n".join(body))["error"]["code"] == "run_not_found"
    status, _, lines = await lines_of(server, f"/runs/{run_id}/events.ndjson?after=1")
    assert status == 200
    (line,) = [line for line in lines if line]
    error = json.loads(line)["error"]
    assert error["code"] == "history_expired"
    assert (error["requested"], error["first_available"]) == (1, error["first_available"])
    assert "id" not in json.loads(line)
