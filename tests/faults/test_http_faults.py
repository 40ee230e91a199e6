"""Faults of the HTTP API: what a client's bad input gets, against a real Hypercorn server.

Every case here is a client's mistake (or an attack): it must get a clear
JSON error (or Hypercorn's own ``400`` for a request that is not HTTP),
never a ``500``, and leave no traceback in the log. The WebSocket
counterparts are in ``test_ws_faults.py``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
from conftest import assert_error, assert_no_traceback, http_client, start_run

from trioflow import Agent, ScriptedModel, Turn
from trioflow.web import WebConfig

if TYPE_CHECKING:
    from conftest import OpenSSE, StartWebServer, WebServer

TOKEN = "s3cret-t0ken"


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def port_of(server: WebServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def exchange(server: WebServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes as a request; the status, headers (lower-case names) and body of the answer."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(server))
        async with stream:
            await stream.send_all(request)
            data = b""
            while True:
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    lines = head.decode("latin-1").split("\r\n")
                    status = int(lines[0].split()[1])
                    headers: dict[str, str] = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                    length = headers.get("content-length")
                    if status == 101 or (length is not None and len(body) >= int(length)):
                        return status, headers, body
                chunk = await stream.receive_some(65536)
                if not chunk:
                    assert sep, data
                    return status, headers, body
                data += chunk


def ws_handshake(path: str, host: str, **headers: str) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode("latin-1")


# -- bodies of POST /runs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "'task' is required"),
        ({"task": ""}, "must not be empty"),
        ({"task": "   "}, "must not be empty"),
        ({"task": 42}, "'task' must be a string"),
        ({"task": "hi", "timeout": "soon"}, "'timeout' must be a number"),
        ({"task": "hi", "timeout": 0}, "positive"),
        ({"task": "hi", "timeout": True}, "'timeout' must be a number"),
        ({"task": "hi", "max_iterations": 1.5}, "'max_iterations' must be an integer"),
        ({"task": "hi", "max_iterations": 0}, "at least 1"),
        ({"task": "hi", "on_disconnect": "explode"}, "'continue' or 'cancel'"),
        ({"task": "hi", "modle": "gpt"}, "unknown field 'modle'"),
        ([{"task": "hi"}], "expected a JSON object, not an array"),
        ("hi", "expected a JSON object, not a string"),
    ],
)
async def test_post_runs_rejects_invalid_bodies_with_400(
    web_server: WebServer, body: object, fragment: str
) -> None:
    async with http_client(web_server) as http:
        response = await http.post("/runs", json=body)
    error = assert_error(response, 400, "invalid_request")
    assert fragment in str(error["message"])
    assert web_server.executor.runs == {}


@pytest.mark.parametrize("content", [b"{not json", b"", b"   ", b'{"task": NaN}', b"\xff\xfe"])
async def test_post_runs_rejects_non_json_with_400(web_server: WebServer, content: bytes) -> None:
    async with http_client(web_server) as http:
        response = await http.post(
            "/runs", content=content, headers={"Content-Type": "application/json"}
        )
    assert_error(response, 400, "invalid_json")
    assert web_server.executor.runs == {}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
async def test_post_runs_needs_a_json_content_type(
    web_server: WebServer, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with http_client(web_server) as http:
        response = await http.post("/runs", content=b'{"task": "hi"}', headers=headers)
    assert_error(response, 415, "unsupported_media_type")
    assert web_server.executor.runs == {}


async def test_post_runs_rejects_bodies_over_the_limit_with_413(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(max_body=1024)
    big = json.dumps({"task": "x" * 2000}).encode()

    async def chunks() -> object:
        yield big  # no Content-Length: the limit is checked while reading

    async with http_client(server) as http:
        declared = await http.post(
            "/runs", content=big, headers={"Content-Type": "application/json"}
        )
        streamed = await http.post(
            "/runs",
            content=chunks(),  # type: ignore[arg-type]
            headers={"Content-Type": "application/json"},
        )
        fits = await http.post("/runs", json={"task": "x" * 900})
    assert_error(declared, 413, "payload_too_large")
    assert_error(streamed, 413, "payload_too_large")
    assert fits.status_code == 201
    assert len(server.executor.runs) == 1


async def test_unknown_run_is_404(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        responses = [
            await http.get("/runs/run_nope"),
            await http.post("/runs/run_nope/cancel"),
            await http.get("/runs/run_nope/events"),
        ]
    for response in responses:
        assert_error(response, 404, "run_not_found")


async def test_unknown_endpoint_and_method_are_json_errors(web_server: WebServer) -> None:
    async with http_client(web_server) as http:
        missing = await http.get("/nope")
        wrong = await http.put("/runs")
    assert_error(missing, 404, "not_found")
    assert_error(wrong, 405, "method_not_allowed")
    assert "POST" in wrong.headers["allow"]


async def test_invalid_resume_points_are_400(web_server: WebServer) -> None:
    run_id = await start_run(web_server, token=TOKEN)
    async with http_client(web_server) as http:
        await web_server.executor.get_run(run_id).wait()
        responses = [
            await http.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "abc"}),
            await http.get(f"/runs/{run_id}/events", params={"after": "-1"}),
            await http.get(f"/runs/{run_id}/events", params={"after": "999"}),
        ]
    for response in responses:
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_after"


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"task": "hi", "timeout": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        b'{"task": ' + b'{"a":' * 6_000 + b"1" + b"}" * 6_000 + b"}",
    ],
    ids=["array", "member", "objects"],
)
async def test_deeply_nested_json_is_400_invalid_json_not_a_500(
    web_server: WebServer, server_log: pytest.LogCaptureFixture, content: bytes
) -> None:
    assert len(content) < web_server.config.max_body  # the nesting, not the size, is at fault
    async with http_client(web_server) as http:
        response = await http.post(
            "/runs", content=content, headers={"Content-Type": "application/json"}
        )
        healthy = await http.get("/runs")
    error = assert_error(response, 400, "invalid_json")
    assert "nested deeper than" in str(error["message"])
    assert healthy.status_code == 200
    assert web_server.executor.runs == {}
    assert_no_traceback(server_log)


@pytest.mark.parametrize("task", ["hi \ud800", "\udfff", "ok \ud83d then \ude00"])
async def test_a_lone_surrogate_in_the_task_is_400_invalid_request(
    web_server: WebServer, server_log: pytest.LogCaptureFixture, task: str
) -> None:
    content = json.dumps({"task": task}).encode("ascii")  # "\ud800" as a JSON escape
    async with http_client(web_server) as http:
        response = await http.post(
            "/runs", content=content, headers={"Content-Type": "application/json"}
        )
        listing = await http.get("/runs")
    error = assert_error(response, 400, "invalid_request")
    assert str(error["message"]).startswith("task is not valid Unicode")
    assert web_server.executor.runs == {}
    assert listing.status_code == 200
    assert_no_traceback(server_log)


async def test_a_lone_surrogate_elsewhere_in_the_body_is_a_400_not_a_500(
    web_server: WebServer, server_log: pytest.LogCaptureFixture
) -> None:
    bodies = [
        b'{"task": "hi", "\\ud800": 1}',  # an unknown member, named in the message
        b'{"task": "hi", "on_disconnect": "\\ud800"}',
    ]
    async with http_client(web_server) as http:
        responses = [
            await http.post("/runs", content=body, headers={"Content-Type": "application/json"})
            for body in bodies
        ]
    for response in responses:
        assert_error(response, 400, "invalid_request")
    assert web_server.executor.runs == {}
    assert_no_traceback(server_log)


async def test_runs_that_hold_a_lone_surrogate_are_still_listed_and_read(
    web_server: WebServer, nursery: trio.Nursery, server_log: pytest.LogCaptureFixture
) -> None:
    # A run started in-process, not through the API, may hold anything.
    agent = Agent(ScriptedModel([Turn("done")], pace=0))
    run = await web_server.executor.start(agent, "bad \ud800 task", nursery=nursery)
    with trio.fail_after(5):
        await run.wait()
    async with http_client(web_server) as http:
        listing = await http.get("/runs")
        one = await http.get(f"/runs/{run.run_id}")
    assert listing.status_code == 200, listing.text
    assert listing.json()["count"] == 1
    assert one.status_code == 200, one.text
    assert "\ud800" not in one.text
    assert "bad \ufffd task" in json.dumps(one.json(), ensure_ascii=False)
    assert_no_traceback(server_log)


# -- Host: DNS rebinding ------------------------------------------------------------------


async def test_a_dns_rebinding_page_can_neither_start_runs_nor_read_them(
    web_server: WebServer, server_log: pytest.LogCaptureFixture
) -> None:
    # rebind.evil:PORT first resolved to the attacker's server, which served a page;
    # now it resolves to 127.0.0.1, and the page's requests are same-origin to the browser.
    evil = f"rebind.evil:{port_of(web_server)}"
    async with http_client(web_server, Host=evil, Origin=f"http://{evil}") as http:
        post = await http.post("/runs", json={"task": "What is 25 * 4?"})
        listing = await http.get("/runs")
        page = await http.get("/")
    for response in (post, listing, page):
        error = assert_error(response, 403, "forbidden_host")
        assert "rebind.evil" in str(error["message"])
    assert web_server.executor.runs == {}
    assert web_server.hub.running() == 0
    status, _, body = await exchange(web_server, ws_handshake("/ws", evil, Origin=f"http://{evil}"))
    assert status == 403
    assert json.loads(body)["error"]["code"] == "forbidden_host"
    assert web_server.executor.runs == {}
    assert_no_traceback(server_log)


async def test_healthz_answers_any_host(web_server: WebServer) -> None:
    async with http_client(web_server, Host="10.0.0.7:8080") as http:
        health = await http.get("/healthz")
        runs = await http.get("/runs")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert_error(runs, 403, "forbidden_host")


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}", "[::1]:{port}", "localhost:1"],
)
async def test_the_loopback_names_are_allowed_with_any_port(
    web_server: WebServer, host: str
) -> None:
    host = host.format(port=port_of(web_server))
    async with http_client(web_server, Host=host, Origin=f"http://{host}") as http:
        listing = await http.get("/runs")
        post = await http.post("/runs", json={"task": "hi"})
    assert listing.status_code == 200
    assert post.status_code == 201, post.text


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /runs HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs no Host
        b"GET /runs HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        b"GET /runs HTTP/1.1\r\nHost: user@127.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET /runs HTTP/1.1\r\nHost: 127.0.0.1:99999\r\nConnection: close\r\n\r\n",
        b"GET /runs HTTP/1.1\r\nHost: 127.0.0.1.evil\r\nConnection: close\r\n\r\n",
    ],
    ids=["none", "space", "userinfo", "bad-port", "suffix"],
)
async def test_a_missing_or_malformed_host_is_403(
    web_server: WebServer, server_log: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    status, headers, body = await exchange(web_server, request_bytes)
    assert status == 403, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "forbidden_host"
    assert_no_traceback(server_log)


async def test_allowed_hosts_add_names_with_or_without_a_port(
    start_web_server: StartWebServer,
) -> None:
    server = await start_web_server(
        allowed_hosts=frozenset({"agents.example.com", "api.example.com:8443"})
    )
    statuses = {}
    for host in (
        "agents.example.com",
        "Agents.Example.com:443",
        "api.example.com:8443",
        "api.example.com:8444",
        "api.example.com",
        f"localhost:{port_of(server)}",
    ):
        async with http_client(server, Host=host) as http:
            statuses[host] = (await http.get("/runs")).status_code
    assert statuses == {
        "agents.example.com": 200,
        "Agents.Example.com:443": 200,
        "api.example.com:8443": 200,
        "api.example.com:8444": 403,
        "api.example.com": 403,
        f"localhost:{port_of(server)}": 200,
    }
    origin = "http://agents.example.com"
    async with http_client(server, Host="agents.example.com", Origin=origin) as http:
        assert (await http.post("/runs", json={"task": "hi"})).status_code == 201


async def test_any_host_with_a_star(start_web_server: StartWebServer) -> None:
    server = await start_web_server(allowed_hosts=frozenset({"*"}))
    async with http_client(server, Host="whatever.example:1") as http:
        assert (await http.get("/runs")).status_code == 200


@pytest.mark.parametrize("origin", ["http://[::1", "http://[", "null", "http://127.0.0.1:1"])
async def test_a_malformed_or_foreign_origin_is_403_not_500(
    web_server: WebServer, server_log: pytest.LogCaptureFixture, origin: str
) -> None:
    async with http_client(web_server, Origin=origin) as http:
        response = await http.post("/runs", json={"task": "hi"})
    assert_error(response, 403, "forbidden_origin")
    assert web_server.executor.runs == {}
    assert_no_traceback(server_log)


def test_config_checks_hosts_and_tokens() -> None:
    with pytest.raises(ValueError, match="allowed_hosts"):
        WebConfig(host="0.0.0.0")
    with pytest.raises(ValueError, match="allowed_hosts"):
        WebConfig(host="::")
    assert WebConfig(host="0.0.0.0", allowed_hosts=frozenset({"*"})).host_allow_list.any
    wildcard = WebConfig(host="::", allowed_hosts=frozenset({"agents.example.com"}))
    assert wildcard.host_allow_list.allows("agents.example.com:8080")
    assert wildcard.host_allow_list.allows("localhost:8080")
    assert not wildcard.host_allow_list.allows("[::]:8080")
    lan = WebConfig(host="192.168.1.5")
    assert lan.host_allow_list.allows("192.168.1.5:8080")
    assert not lan.host_allow_list.allows("localhost:8080")
    for bad in ("bad host", "a/b", "x:99999", "", "tök.example", "h\r\nx"):
        with pytest.raises(ValueError):
            WebConfig(allowed_hosts=frozenset({bad}))
    with pytest.raises(TypeError):
        WebConfig(allowed_hosts="agents.example.com")  # type: ignore[arg-type]
    for token in ("tökén-123456", "with space 1", "tab\tinside1", "bell\x07char", "\u00a0nbsp"):
        with pytest.raises(ValueError, match="printable ASCII"):
            WebConfig(token=token)
    assert WebConfig(max_body=1000).websocket_message_ceiling == 2000 + 64 * 1024


# -- trioflow serve: tokens and hosts refused at startup ------------------------------------


async def serve_command(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``trioflow serve --port 0 ARGS``; its exit status and stderr (it must exit at once)."""
    unset = ("TRIOFLOW_TOKEN", "ANTHROPIC_API_KEY")
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ.update(env or {})
    command = [sys.executable, "-m", "trioflow", "serve", "--port", "0", "--pace", "0", *args]
    with trio.fail_after(15):  # a server that starts serving instead fails here
        process = await trio.run_process(
            command, env=environ, capture_stdout=True, capture_stderr=True, check=False
        )
    return process.returncode, process.stderr.decode("utf-8", "replace")


BAD_TOKENS = ["x", "short7!", "tökén-123456", "with space 1", "bell\x07char1", "trailing-tab\t"]


@pytest.mark.parametrize("source", ["--token", "TRIOFLOW_TOKEN"])
@pytest.mark.parametrize("token", BAD_TOKENS, ids=lambda t: ascii(t))
async def test_serve_refuses_a_bad_token_from_either_source(source: str, token: str) -> None:
    if source == "--token":
        status, err = await serve_command("--token", token)
    else:
        status, err = await serve_command(env={"TRIOFLOW_TOKEN": token})
    assert status == 2, err
    assert f"{source} must be 8 to 4096 printable ASCII characters without white space" in err
    assert "(value hidden)" in err
    if len(token.strip()) >= 6:
        assert token.strip() not in err  # a secret is never echoed
    assert "Traceback" not in err


async def test_serve_refuses_a_wildcard_address_without_allowed_hosts() -> None:
    status, err = await serve_command("--host", "0.0.0.0")
    assert status == 2, err
    assert "allowed_hosts" in err and "--allowed-host" in err
    assert "Traceback" not in err
    status, err = await serve_command("--allowed-host", "bad host")
    assert status == 2, err
    assert "'bad host' is not a host name" in err


# -- paths, queries and headers ------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/static/../config.py",
        "/static/%2e%2e/config.py",
        "/static/..%2fconfig.py",
        "/static/%2e%2e%2fconfig.py",
        "/static/..%5cconfig.py",
        "/static/....//config.py",
        "/static//etc/passwd",
        "/static/%2fetc%2fpasswd",
        "/static/index.html%00.py",
        "/static/../../../../../../etc/passwd",
    ],
)
async def test_paths_under_static_cannot_leave_the_static_folder(
    web_server: WebServer, server_log: pytest.LogCaptureFixture, target: str
) -> None:
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    status, headers, body = await exchange(web_server, request.encode())
    assert status in (400, 404), (status, body[:200])
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] in ("not_found", "bad_request")
    assert b"WebConfig" not in body and b"root:" not in body
    assert_no_traceback(server_log)


INJECTED = "%0D%0ASet-Cookie:%20injected=1%0D%0A"


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        (f"/runs/run_x{INJECTED}", 404, "run_not_found"),
        (f"/runs/run_x{INJECTED}/events", 404, "run_not_found"),
        (f"/runs?status=running{INJECTED}", 400, "invalid_status"),
        (f"/runs/{{run_id}}/events?after=1{INJECTED}", 400, "invalid_after"),
        (f"/runs/{{run_id}}/events?token=x{INJECTED}", 401, "invalid_token"),
        (f"/nope{INJECTED}", 404, "not_found"),
    ],
)
async def test_cr_lf_in_paths_and_query_values_is_never_reflected_into_headers(
    start_web_server: StartWebServer,
    server_log: pytest.LogCaptureFixture,
    target: str,
    status: int,
    code: str,
) -> None:
    server = await start_web_server(token=TOKEN if "token=" in target else None)
    run_id = await start_run(server, token=TOKEN)
    target = target.format(run_id=run_id)
    auth = "" if "token=" in target else f"Authorization: Bearer {TOKEN}\r\n"
    request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    answer, headers, body = await exchange(server, request.encode())
    assert (answer, json.loads(body)["error"]["code"]) == (status, code)
    assert "set-cookie" not in headers
    assert b"\r\n" not in body
    assert_no_traceback(server_log)


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (b"Last-Event-ID: 1\rSet-Cookie: injected=1", 400),  # a bare CR inside a value
        (b"Last-Event-ID: 1\x00", 400),
        (b"Bad Name: 1", 400),
        (b"Last-Event-ID: 1\nSet-Cookie: injected=1", 200),  # a bare LF ends the line:
        (b"Last-Event-ID:\r\n 1", 200),  # obsolete line folding joins the lines
    ],
)
async def test_cr_lf_and_control_characters_in_headers_never_reach_the_response(
    web_server: WebServer, server_log: pytest.LogCaptureFixture, header: bytes, status: int
) -> None:
    # Hypercorn (h11) refuses what HTTP forbids, and reads a bare LF or a folded line
    # as HTTP allows; no request header is ever copied into the response.
    run_id = await start_run(web_server, token=TOKEN)
    await web_server.executor.get_run(run_id).wait()
    request = (
        f"GET /runs/{run_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
        + header
        + b"\r\nConnection: close\r\n\r\n"
    )
    answer, headers, body = await exchange(web_server, request)
    assert answer == status, body[:300]
    assert "set-cookie" not in headers
    assert "injected" not in str(headers)
    assert_no_traceback(server_log)


async def test_a_last_event_id_with_trailing_junk_is_400_invalid_after(
    web_server: WebServer, server_log: pytest.LogCaptureFixture
) -> None:
    run_id = await start_run(web_server, token=TOKEN)
    values = ["1 2", "0x10", "1e3", "+1", "\u0661", "99999999999999999999999"]
    async with http_client(web_server) as http:
        responses = [
            await http.get(
                f"/runs/{run_id}/events", headers={"Last-Event-ID": value.encode("utf-8")}
            )
            for value in values
        ]
    for response in responses:
        assert_error(response, 400, "invalid_after")
    assert_no_traceback(server_log)


# -- authentication on every endpoint ---------------------------------------------------------


async def test_health_and_the_page_need_no_token(start_web_server: StartWebServer) -> None:
    server = await start_web_server(token=TOKEN)
    async with http_client(server) as http:
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
    async with http_client(server, **headers) as http:
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


async def test_token_query_parameter_is_for_event_streams_and_sockets_only(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(token=TOKEN)
    run_id = await start_run(server, token=TOKEN)
    async with http_client(server) as http:
        post = await http.post("/runs", params={"token": TOKEN}, json={"task": "hi"})
        listing = await http.get("/runs", params={"token": TOKEN})
    assert post.status_code == listing.status_code == 401
    async with open_sse(server.url, f"/runs/{run_id}/events?token={TOKEN}") as stream:
        assert stream.status == 200
        frames = await stream.events()
    assert frames[-1].event == "flow.completed"
    async with open_sse(server.url, f"/runs/{run_id}/events?token=wrong") as stream:
        assert stream.status == 401


async def test_posts_from_a_foreign_origin_are_403_but_reads_pass(web_server: WebServer) -> None:
    async with http_client(web_server, Origin="https://evil.example") as http:
        post = await http.post("/runs", json={"task": "hi"})
        cancel = await http.post("/runs/run_x/cancel")
        listing = await http.get("/runs")
    assert post.status_code == cancel.status_code == 403
    assert error_code(post) == "forbidden_origin"
    assert listing.status_code == 200
    assert web_server.executor.runs == {}


async def test_every_route_but_the_public_ones_needs_the_token(
    start_web_server: StartWebServer, server_log: pytest.LogCaptureFixture
) -> None:
    from starlette.routing import Mount, Route, WebSocketRoute

    server = await start_web_server(token=TOKEN)
    checked = []
    for route in server.app.routes:
        if isinstance(route, Mount):
            continue  # /static: public
        assert isinstance(route, (Route, WebSocketRoute)), route
        path = route.path.replace("{run_id}", "run_x")
        if isinstance(route, WebSocketRoute):
            request = ws_handshake(path, "127.0.0.1")
            methods = ["WEBSOCKET"]
        else:
            methods = sorted((route.methods or set()) - {"HEAD"})
        for method in methods:
            if method != "WEBSOCKET":
                request = (
                    f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Content-Type: application/json\r\nContent-Length: 2\r\n"
                    "Connection: close\r\n\r\n{}"
                ).encode()
            status, headers, body = await exchange(server, request)
            public = path in ("/", "/healthz")
            checked.append((method, path, public))
            if public:
                assert status == 200, (method, path)
            else:
                assert status == 401, (method, path, status)
                assert json.loads(body)["error"]["code"] == "unauthorized"
                assert headers["www-authenticate"].startswith('Bearer realm="trioflow"')
    assert len(checked) >= 9, checked
    assert server.executor.runs == {}
    assert_no_traceback(server_log)
