"""The HTTP endpoints of trioflow.web against a real Hypercorn server on 127.0.0.1."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from conftest import assert_error, http_client, talker

from trioflow import Agent
from trioflow.web import OnDisconnect, RunRequest

if TYPE_CHECKING:
    from conftest import StartWebServer, WebServer


async def test_healthz_is_ok(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_page_is_served_at_root_and_static(web_server: WebServer) -> None:
    index = (web_server.config.static_dir / "index.html").read_bytes()
    async with http_client(web_server) as http:
        page = await http.get("/")
        static = await http.get("/static/index.html")
        missing = await http.get("/static/no-such-file.js")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.content == index
    assert static.content == index
    assert_error(missing, 404, "not_found")


async def test_post_runs_starts_a_run_and_answers_201_with_urls(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        response = await http.post("/runs", json={"task": "What is 25 * 4?"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"run_id", "status", "url", "events_url", "ws_url"}
    run_id = body["run_id"]
    assert body["status"] == "running"
    assert body["url"] == f"{web_server.url}/runs/{run_id}"
    assert response.headers["location"] == body["url"]
    assert body["events_url"] == f"{web_server.url}/runs/{run_id}/events"
    assert body["ws_url"] == f"{web_server.ws_url}/runs/{run_id}/ws"
    run = web_server.executor.get_run(run_id)
    result = await run.wait()
    assert result.output == "25 * 4 = 100."
    assert run.metadata == {"source": "http"}
    assert run.on_disconnect is OnDisconnect.CONTINUE
    assert run.to_dict()["on_disconnect"] == "continue"


async def test_post_runs_passes_options_to_the_run(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        response = await http.post(
            "/runs",
            json={"task": "hi", "timeout": 30, "max_iterations": 3, "on_disconnect": "cancel"},
        )
    assert response.status_code == 201
    run = web_server.executor.get_run(response.json()["run_id"])
    assert run.timeout == 30
    assert run.max_iterations == 3
    assert run.on_disconnect is OnDisconnect.CANCEL


async def test_post_runs_accepts_json_with_a_charset(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        response = await http.post(
            "/runs",
            content=b'{"task": "hi"}',
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
    assert response.status_code == 201


async def test_get_run_reports_status_progress_counts_and_output(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        run_id = (await http.post("/runs", json={"task": "What is 25 * 4?"})).json()["run_id"]
        await web_server.executor.get_run(run_id).wait()
        response = await http.get(f"/runs/{run_id}")
    assert response.status_code == 200
    view = response.json()
    assert view["run_id"] == run_id
    assert view["status"] == "completed"
    assert view["output"] == "25 * 4 = 100."
    assert view["result"]["status"] == "completed"
    assert view["progress"]["is_complete"] is True
    assert view["counts"]["tool_calls"] == 1
    assert view["counts"]["events"] == view["last_seq"]
    assert view["events_url"].endswith(f"/runs/{run_id}/events")


async def test_get_runs_lists_runs_and_filters_by_status(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100))
    async with http_client(server) as http:
        first = (await http.post("/runs", json={"task": "a"})).json()["run_id"]
        second = (await http.post("/runs", json={"task": "b"})).json()["run_id"]
        assert (await http.post(f"/runs/{first}/cancel")).status_code == 202
        await server.executor.get_run(first).wait()
        everything = (await http.get("/runs")).json()
        running = (await http.get("/runs", params={"status": "running"})).json()
        both = (await http.get("/runs?status=running,cancelled")).json()
        bad = await http.get("/runs", params={"status": "sleeping"})
    assert [r["run_id"] for r in everything["runs"]] == [first, second]
    assert everything["count"] == 2
    assert [r["run_id"] for r in running["runs"]] == [second]
    assert both["count"] == 2
    assert_error(bad, 400, "invalid_status")


async def test_cancel_answers_202_and_the_run_ends_cancelled(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100))
    async with http_client(server) as http:
        run_id = (await http.post("/runs", json={"task": "a"})).json()["run_id"]
        response = await http.post(f"/runs/{run_id}/cancel", json={})
        with trio.fail_after(5):
            result = await server.executor.get_run(run_id).wait()
        finished = await http.post(f"/runs/{run_id}/cancel")
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    assert result.status == "cancelled"
    assert result.reason == "cancelled by client"
    error = assert_error(finished, 409, "run_finished")
    assert error["status"] == "cancelled"


async def test_agent_factory_rejecting_a_request_is_400(start_web_server: StartWebServer) -> None:
    def picky(request: RunRequest) -> Agent:
        raise ValueError("this agent only does arithmetic")

    server = await start_web_server(agent=picky)
    async with http_client(server) as http:
        response = await http.post("/runs", json={"task": "hi"})
    error = assert_error(response, 400, "invalid_request")
    assert error["message"] == "this agent only does arithmetic"
