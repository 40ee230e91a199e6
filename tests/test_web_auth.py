"""Access control of trioflow.web: the bearer token and the Origin allow-list."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from conftest import http_client

if TYPE_CHECKING:
    from conftest import OpenWS, StartWebServer, WebServer

TOKEN = "s3cret-t0ken"


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


async def test_without_a_token_configured_everything_is_open(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        assert (await http.get("/runs")).status_code == 200
        assert (await http.post("/runs", json={"task": "hi"})).status_code == 201


async def test_api_with_the_token_works(start_web_server: StartWebServer) -> None:
    server = await start_web_server(token=TOKEN)
    async with http_client(server, Authorization=f"bearer {TOKEN}") as http:
        assert (await http.post("/runs", json={"task": "hi"})).status_code == 201
        assert (await http.get("/runs")).json()["count"] == 1


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
    async with http_client(server, Origin="https://app.example") as http:
        assert (await http.post("/runs", json={"task": "hi"})).status_code == 201


async def test_posts_from_the_page_itself_pass(web_server: WebServer) -> None:
    async with http_client(web_server, Origin=web_server.url) as http:
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
