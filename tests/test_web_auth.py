"""Access control of trioflow.web: the bearer token and the Origin allow-list."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from trio_websocket import ConnectionRejected

if TYPE_CHECKING:
    from conftest import OpenSSE, OpenWS, StartWebServer, WebServer

TOKEN = "s3cret-t0ken"


def client(server: WebServer, **headers: str) -> httpx.AsyncClient:
    # Plain HTTP: verify=False only skips loading the CA bundle (half a second per client).
    return httpx.AsyncClient(base_url=server.url, timeout=5, verify=False, headers=headers)


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


async def start_run(server: WebServer) -> str:
    async with client(server, Authorization=f"Bearer {TOKEN}") as http:
        response = await http.post("/runs", json={"task": "What is 25 * 4?"})
    assert response.status_code == 201, response.text
    return str(response.json()["run_id"])


async def test_without_a_token_configured_everything_is_open(web_server: WebServer) -> None:
    async with client(web_server) as http:
        assert (await http.get("/runs")).status_code == 200
        assert (await http.post("/runs", json={"task": "hi"})).status_code == 201


async def test_health_and_the_page_need_no_token(start_web_server: StartWebServer) -> None:
    server = await start_web_server(token=TOKEN)
    async with client(server) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/static/index.html")).status_code == 200


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "unauthorized"),
        ({"Authorization": "Basic czNjcmV0"}, "unauthorized"),
        ({"Authorization": "Bearer"}, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, "invalid_token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "invalid_token"),
    ],
)
async def test_api_without_the_right_token_is_401(
    start_web_server: StartWebServer, headers: dict[str, str], code: str
) -> None:
    server = await start_web_server(token=TOKEN)
    async with client(server, **headers) as http:
        responses = [
            await http.get("/runs"),
            await http.post("/runs", json={"task": "hi"}),
            await http.get("/runs/run_x"),
            await http.post("/runs/run_x/cancel"),
            await http.get("/runs/run_x/events"),
            await http.get("/nope"),
        ]
    for response in responses:
        assert response.status_code == 401
        assert error_code(response) == code
        assert response.headers["www-authenticate"].startswith('Bearer realm="trioflow"')
    assert server.executor.runs == {}


async def test_api_with_the_token_works(start_web_server: StartWebServer) -> None:
    server = await start_web_server(token=TOKEN)
    async with client(server, Authorization=f"bearer {TOKEN}") as http:
        assert (await http.post("/runs", json={"task": "hi"})).status_code == 201
        assert (await http.get("/runs")).json()["count"] == 1


async def test_token_query_parameter_is_for_event_streams_and_sockets_only(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(token=TOKEN)
    run_id = await start_run(server)
    async with client(server) as http:
        post = await http.post("/runs", params={"token": TOKEN}, json={"task": "hi"})
        listing = await http.get("/runs", params={"token": TOKEN})
    assert post.status_code == listing.status_code == 401
    async with open_sse(server.url, f"/runs/{run_id}/events?token={TOKEN}") as stream:
        assert stream.status == 200
        frames = await stream.events()
    assert frames[-1].event == "flow.completed"
    async with open_sse(server.url, f"/runs/{run_id}/events?token=wrong") as stream:
        assert stream.status == 401


async def test_websockets_need_the_token_in_a_header_or_the_query(
    start_web_server: StartWebServer, open_ws: OpenWS
) -> None:
    server = await start_web_server(token=TOKEN)
    run_id = await start_run(server)
    for url in (f"{server.ws_url}/ws", f"{server.ws_url}/runs/{run_id}/ws"):
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_ws(url):
                pass
        assert rejected.value.status_code == 401
        assert json.loads(rejected.value.body or b"")["error"]["code"] == "unauthorized"
    async with open_ws(f"{server.ws_url}/runs/{run_id}/ws?token={TOKEN}") as ws:
        assert json.loads(await ws.get_message())["id"] == 1
    async with open_ws(f"{server.ws_url}/ws", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        await ws.send_message(json.dumps({"action": "start", "task": "hi"}))
        assert json.loads(await ws.get_message())["type"] == "accepted"


async def test_websockets_from_a_foreign_origin_are_403(
    web_server: WebServer, open_ws: OpenWS
) -> None:
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_ws(f"{web_server.ws_url}/ws", headers={"Origin": "https://evil.example"}):
            pass
    assert rejected.value.status_code == 403
    assert json.loads(rejected.value.body or b"")["error"]["code"] == "forbidden_origin"


async def test_websockets_from_the_servers_own_origin_are_allowed(
    web_server: WebServer, open_ws: OpenWS
) -> None:
    async with open_ws(f"{web_server.ws_url}/ws", headers={"Origin": web_server.url}) as ws:
        await ws.send_message(json.dumps({"action": "start", "task": "hi"}))
        assert json.loads(await ws.get_message())["type"] == "accepted"


@pytest.mark.parametrize("allowed", [{"https://app.example"}, {"https://app.example/"}, {"*"}])
async def test_configured_origins_are_allowed(
    start_web_server: StartWebServer, open_ws: OpenWS, allowed: set[str]
) -> None:
    server = await start_web_server(allowed_origins=frozenset(allowed))
    async with open_ws(f"{server.ws_url}/ws", headers={"Origin": "https://app.example"}) as ws:
        await ws.send_message(json.dumps({"action": "start", "task": "hi"}))
        assert json.loads(await ws.get_message())["type"] == "accepted"
    async with client(server, Origin="https://app.example") as http:
        assert (await http.post("/runs", json={"task": "hi"})).status_code == 201


async def test_posts_from_a_foreign_origin_are_403_but_reads_pass(web_server: WebServer) -> None:
    async with client(web_server, Origin="https://evil.example") as http:
        post = await http.post("/runs", json={"task": "hi"})
        cancel = await http.post("/runs/run_x/cancel")
        listing = await http.get("/runs")
    assert post.status_code == cancel.status_code == 403
    assert error_code(post) == "forbidden_origin"
    assert listing.status_code == 200
    assert web_server.executor.runs == {}


async def test_posts_from_the_page_itself_pass(web_server: WebServer) -> None:
    async with client(web_server, Origin=web_server.url) as http:
        response = await http.post("/runs", json={"task": "hi"})
    assert response.status_code == 201


def test_config_rejects_bad_options() -> None:
    from trioflow.web import WebConfig

    bad: list[dict[str, Any]] = [
        {"port": 70000},
        {"port": -1},
        {"token": ""},
        {"token": "  "},
        {"max_body": 0},
        {"keepalive": 0},
        {"keepalive": float("inf")},
        {"buffer": 0},
        {"host": ""},
    ]
    for options in bad:
        with pytest.raises(ValueError):
            WebConfig(**options)
    with pytest.raises(TypeError):
        WebConfig(allowed_origins="https://app.example")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        WebConfig(buffer=True)
