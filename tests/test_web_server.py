"""trioflow.web.serve and ``trioflow serve``: startup, graceful shutdown, the command."""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import subprocess
import sys
import warnings
from typing import TYPE_CHECKING

import pytest
import trio
from conftest import http_client, start_run, talker
from trio_websocket import ConnectionClosed

from trioflow import StreamingFlowExecutor
from trioflow.cli import main as cli_main
from trioflow.web import WebConfig, create_app, serve
from trioflow.web._app import hub_of

if TYPE_CHECKING:
    from conftest import OpenSSE, OpenWS, StartWebServer, WebServer


@pytest.mark.usefixtures("ws_path")
async def test_graceful_shutdown_ends_every_stream_with_flow_cancelled(
    start_web_server: StartWebServer, open_sse: OpenSSE, open_ws: OpenWS
) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100))
    sse_run, ws_run = await start_run(server), await start_run(server)
    async with (
        open_sse(server.url, f"/runs/{sse_run}/events") as stream,
        open_ws(f"{server.ws_url}/runs/{ws_run}/ws") as ws,
        open_ws(f"{server.ws_url}/ws") as idle,
    ):
        await stream.next()  # retry:
        assert (await stream.next() or None) is not None
        assert json.loads(await ws.get_message())["type"] == "flow.started"
        server.stop.set()
        with trio.fail_after(5):
            frames = await stream.events()  # the response ends cleanly
            ws_frames = []
            with pytest.raises(ConnectionClosed) as ws_closed:
                while True:
                    ws_frames.append(json.loads(await ws.get_message()))

            with pytest.raises(ConnectionClosed) as idle_closed:
                await idle.get_message()
            await server.stopped.wait()
    assert frames[-1].event == "flow.cancelled"
    assert frames[-1].json()["data"]["reason"] == "server shutdown"
    assert ws_frames[-1]["type"] == "flow.cancelled"
    assert ws_closed.value.reason.code == 1000
    assert idle_closed.value.reason.code == 1001
    for run in server.executor.runs.values():
        assert run.status == "cancelled"
        assert run.result is not None and run.result.reason == "server shutdown"


async def test_draining_refuses_new_runs_and_reports_unhealthy(web_server: WebServer) -> None:
    await web_server.hub.drain(1)
    async with http_client(web_server.url) as http:
        health = await http.get("/healthz")
        post = await http.post("/runs", json={"task": "hi"})
    assert health.status_code == 503
    assert health.json() == {"status": "shutting_down"}
    assert post.status_code == 503
    assert post.json()["error"]["code"] == "shutting_down"


async def test_serve_accepts_an_executor_and_reports_its_urls(nursery: trio.Nursery) -> None:
    stop = trio.Event()
    executor = StreamingFlowExecutor()
    urls = await nursery.start(
        functools.partial(serve, executor, WebConfig(port=0), shutdown_trigger=stop.wait)
    )
    assert len(urls) == 1 and urls[0].startswith("http://127.0.0.1:")
    async with http_client(urls[0]) as http:
        response = await http.post("/runs", json={"task": "What is 25 * 4?"})
        run = executor.get_run(response.json()["run_id"])
        assert (await run.wait()).output == "25 * 4 = 100."
    stop.set()


async def test_serve_raises_oserror_when_the_port_is_taken(web_server: WebServer) -> None:
    port = int(web_server.url.rsplit(":", 1)[1])
    with warnings.catch_warnings():
        # Hypercorn 0.18 leaves the socket it failed to bind open: collect it here.
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(OSError, match="in use"):
            await serve(StreamingFlowExecutor(), WebConfig(port=port))
        gc.collect()


async def test_serve_rejects_an_app_it_did_not_make() -> None:
    from starlette.applications import Starlette

    with pytest.raises(TypeError, match="create_app"):
        await serve(Starlette(), WebConfig(port=0))  # type: ignore[arg-type]


def test_hub_of_finds_the_hub_of_an_app() -> None:
    executor = StreamingFlowExecutor()
    app = create_app(executor)
    assert hub_of(app).executor is executor


# -- the command --------------------------------------------------------------------------


def test_serve_command_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["serve", "--port", "99999"])
    assert exited.value.code == 2
    assert "0-65535" in capsys.readouterr().err


async def test_serve_command_serves_until_sigint_then_stops_cleanly() -> None:
    env = {**os.environ, "TRIOFLOW_TOKEN": "from-env", "PYTHONUNBUFFERED": "1"}
    env.pop("ANTHROPIC_API_KEY", None)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, "-m", "trioflow", "serve", "--port", "0", "--pace", "0"],
                stderr=subprocess.PIPE,
                env=env,
                check=False,
            )
        )
        assert process.stderr is not None
        output = b""
        with trio.fail_after(20):
            while b"Ctrl-C to stop" not in output:
                chunk = await process.stderr.receive_some()
                assert chunk, output
                output += chunk
        url = output.decode().split("serving on ", 1)[1].split()[0]
        async with http_client(url) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/runs")).status_code == 401  # the token from the env
            authorized = await http.get("/runs", headers={"Authorization": "Bearer from-env"})
            assert authorized.status_code == 200
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            while chunk := await process.stderr.receive_some():
                output += chunk
            await process.wait()
    assert process.returncode == 0, output.decode()
    assert b"with the scripted model" in output
    assert b"trioflow: stopped" in output


# -- the Hypercorn names trioflow depends on ------------------------------------------

HYPERCORN_NAMES = {
    "hypercorn.config.Config",
    "hypercorn.trio.lifespan.Lifespan",
    "hypercorn.trio.tcp_server.TCPServer",
    "hypercorn.trio.worker_context.WorkerContext",
    "hypercorn.typing.ConnectionState",
    "hypercorn.typing.LifespanState",
    "hypercorn.utils.repr_socket_addr",
    "hypercorn.utils.wrap_app",
}
"""Every ``hypercorn`` name ``trioflow/web/*.py`` imports; most are internal (not
``hypercorn.trio.serve``): an upgrade that moves one fails here, in CI."""


def test_the_hypercorn_names_trioflow_imports_are_exactly_the_pinned_ones() -> None:
    import ast
    import importlib
    from pathlib import Path

    import trioflow.web

    found: set[str] = set()
    for path in Path(trioflow.web.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hypercorn"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                assert not [a for a in node.names if a.name.startswith("hypercorn")], path
    assert found == HYPERCORN_NAMES
    for name in sorted(found):
        module, _, attribute = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attribute), name


def test_the_hypercorn_internals_the_connection_server_overrides_are_there() -> None:
    # _server._Connection overrides TCPServer._read_data and stops its idle_task.
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.trio.worker_context import TrioSingleTask

    from trioflow.web._server import _Connection

    assert callable(TCPServer._read_data)
    assert "idle_task" in TCPServer.__init__.__code__.co_names
    assert callable(TrioSingleTask.stop)
    assert issubclass(_Connection, TCPServer)


async def test_a_graceful_shutdown_closes_connections_that_sent_nothing_at_once(
    start_web_server: StartWebServer,
) -> None:
    # A connection that has sent no request yet (the server is reading its
    # first bytes itself) and an idle keep-alive one (Hypercorn's) both close
    # when the shutdown begins, not after the header timeout.
    server = await start_web_server(header_timeout=30, shutdown_timeout=30)
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    async with (
        await trio.open_tcp_stream(host, int(port)) as silent,
        await trio.open_tcp_stream(host, int(port)) as kept,
    ):
        await kept.send_all(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            answer += await kept.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        server.stop.set()
        with trio.fail_after(3):
            assert await silent.receive_some(4096) == b""
            assert await kept.receive_some(4096) == b""
            await server.stopped.wait()


# -- the guarded stream's writes ---------------------------------------------------------------


async def test_a_guarded_write_the_kernel_takes_at_once_and_one_it_does_not() -> None:
    import socket

    from trioflow.web._connections import Connections

    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    registry = Connections(max_connections=10, write_timeout=5)
    stream = registry.guard(trio.SocketStream(trio.socket.from_stdlib_socket(left)))
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(right))
    # Small: one write, all taken.
    await stream.send_all(b"hello")
    assert await peer.receive_some(5) == b"hello"
    # Far more than the buffers hold: the rest waits until the peer reads.
    big = os.urandom(4 * 1024 * 1024)
    got = bytearray()

    async def read() -> None:
        while len(got) < len(big):
            got.extend(await peer.receive_some(1 << 16))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await stream.send_all(big)
    assert bytes(got) == big
    # The peer gone: broken; closed by the server: closed.
    await peer.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(10):  # the first write after the close may still be taken
            await stream.send_all(b"x" * 65536)
    stream.abort()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    a, b = socket.socketpair()
    closed = registry.guard(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    await closed.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await closed.send_all(b"x")
    b.close()
    assert len(registry) == 0
