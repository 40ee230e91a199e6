"""Slow, greedy and silent peers against a real server: nothing holds it, nothing is unbounded.

In process (``start_web_server``: Hypercorn on 127.0.0.1 in the test's
nursery) wherever the fault is the server's business; as a real
``trioflow serve`` process where it is the process's (signals, exit status,
its file-descriptor limit).
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing
from conftest import assert_error, http_client, start_run, talker

from trioflow import Agent, RunStatus, ScriptedModel, StreamingFlowExecutor, Turn
from trioflow.builtin import calculator
from trioflow.recording import EventRecorder
from trioflow.web import WebConfig, create_app, serve

if TYPE_CHECKING:
    from conftest import OpenSSE, StartWebServer, WebServer

TOKEN = "x" * 8192
"""One big token: a few hundred of them fill any socket buffer on loopback."""
TOKENS = 3000


def big_answer(*, then_wait: bool) -> Agent:
    """An agent answering with ``TOKENS`` big tokens; with ``then_wait``, it then waits an hour."""
    turns = [Turn([TOKEN] * TOKENS)]
    if then_wait:
        turns = [
            Turn([TOKEN] * TOKENS, tool_calls=[("calculator", {"expression": "1 + 1"})]),
            Turn("done", delay=3600),
        ]
    return Agent(ScriptedModel(turns, pace=0), tools=[calculator])


@contextmanager
def silent_client(url: str, path: str, *, websocket: bool = False) -> Iterator[socket.socket]:
    """A blocking client socket that sends one request and then never reads."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    if websocket:
        head = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
    else:
        head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
    sock.sendall(head.encode())
    try:
        yield sock
    finally:
        sock.close()


# -- a shutdown is bounded, whatever the clients do --------------------------------------

CLIENTS = ["sse-finished", "sse-live", "ws-finished", "ws-live"]


async def silent_clients_on(
    server: WebServer, kind: str, stack: ExitStack
) -> tuple[str, socket.socket]:
    """Start a run and attach a client of ``kind`` that never reads; wait until the server is stuck."""
    run_id = await start_run(server)
    transport, state = kind.split("-")
    if state == "finished":
        with trio.fail_after(30):
            await server.executor.runs[run_id].wait()
    path = f"/runs/{run_id}/events" if transport == "sse" else f"/runs/{run_id}/ws"
    sock = stack.enter_context(silent_client(server.url, path, websocket=transport == "ws"))
    # Everything blocks once the socket buffers are full: the server's writer
    # on the silent client, the run (finished, or waiting for its model).
    await trio.testing.wait_all_tasks_blocked(cushion=0.2)
    return run_id, sock


@pytest.mark.parametrize("kind", CLIENTS)
async def test_a_client_that_stops_reading_cannot_hold_a_graceful_shutdown(
    start_web_server: StartWebServer, kind: str
) -> None:
    server = await start_web_server(
        agent=big_answer(then_wait=kind.endswith("live")),
        shutdown_timeout=1.0,
        write_timeout=3600,
    )
    with ExitStack() as stack:
        run_id, _ = await silent_clients_on(server, kind, stack)
        start = trio.current_time()
        server.stop.set()
        with trio.fail_after(5):
            await server.stopped.wait()
        assert trio.current_time() - start < 1.0 + 1.0
    run = server.executor.runs[run_id]
    expected = RunStatus.CANCELLED if kind.endswith("live") else RunStatus.COMPLETED
    assert run.status is expected


@pytest.mark.parametrize("kind", CLIENTS)
async def test_cancelling_serve_closes_a_stuck_connection_at_once(
    kind: str, nursery: trio.Nursery
) -> None:
    executor = StreamingFlowExecutor(history=8192)
    config = WebConfig(port=0, write_timeout=3600, shutdown_timeout=3600)
    app = create_app(executor, agent=big_answer(then_wait=kind.endswith("live")), config=config)
    done = trio.Event()
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            with scope:
                await serve(app, task_status=task_status)
        finally:
            done.set()

    urls = await nursery.start(run)
    from conftest import WebServer

    server = WebServer(urls[0], "", executor, app, config, trio.Event(), done)
    with ExitStack() as stack:
        await silent_clients_on(server, kind, stack)
        scope.cancel()
        with trio.fail_after(2):
            await done.wait()


async def test_a_write_that_makes_no_progress_closes_the_connection_and_the_client_resumes(
    start_web_server: StartWebServer, socket_clock: trio.testing.MockClock
) -> None:
    server = await start_web_server(agent=big_answer(then_wait=False), write_timeout=30)
    run_id = await start_run(server)
    await server.executor.runs[run_id].wait()
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    await sock.send(f"GET /runs/{run_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    start = trio.current_time()
    await trio.sleep(29)  # the server's write is stuck, but not for long enough yet
    assert server.hub.watchers(run_id) == 1
    await trio.sleep(2)
    assert server.hub.watchers(run_id) == 0  # closed by the write timeout
    assert 30 <= trio.current_time() - start < 32
    # What the client got before the server closed is whole up to some event:
    received = bytearray()
    with trio.fail_after(10):
        while True:
            try:
                data = await sock.recv(1 << 20)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    sock.close()
    ids = [int(i) for i in re.findall(rb"\nid: (\d+)\n", bytes(received))]
    assert ids and ids == list(range(ids[0], ids[0] + len(ids)))
    last = ids[-1]
    assert last < TOKENS
    # ... and the client resumes from there with no gap.
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": str(last)})
    resumed = [int(i) for i in re.findall(r"(?m)^id: (\d+)$", response.text)]
    assert resumed[0] == last + 1
    assert resumed[-1] == server.executor.runs[run_id].last_seq


# -- slow request bodies -------------------------------------------------------------------


async def test_a_thousand_half_sent_bodies_are_answered_408_and_closed(
    start_web_server: StartWebServer, socket_clock: trio.testing.MockClock
) -> None:
    server = await start_web_server(body_timeout=10)
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    body = b'{"task": "What is 25 * 4?"}'
    head = (
        f"POST /runs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answers: list[bytes] = []

    async def half_body() -> None:
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(head + body[:10])
            received = bytearray()
            while data := await stream.receive_some():
                received += data
            answers.append(bytes(received))  # the server closed the connection

    start = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(half_body)
    assert len(answers) == 1000
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    assert b'"code":"request_timeout"' in answers[0]
    assert 10 <= trio.current_time() - start < 15
    assert not server.executor.runs


async def test_a_client_leaving_mid_body_costs_one_log_line_and_no_traceback(
    start_web_server: StartWebServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_web_server()
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    caplog.set_level(logging.DEBUG)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(
            f"POST /runs HTTP/1.1\r\nHost: {host}:{port}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"ta'.encode()
        )
        await trio.testing.wait_all_tasks_blocked()
    await trio.testing.wait_all_tasks_blocked()
    async with http_client(server) as client:  # the server is fine
        assert (await client.get("/healthz")).status_code == 200
    records = [r for r in caplog.records if r.name.startswith(("trioflow", "hypercorn"))]
    assert [r.getMessage() for r in records if "left" in r.getMessage()] == [
        "POST /runs: the client left before sending its whole body"
    ]
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert not server.executor.runs


async def test_a_slowloris_head_is_closed_after_the_header_timeout(
    start_web_server: StartWebServer, socket_clock: trio.testing.MockClock
) -> None:
    server = await start_web_server(header_timeout=5)
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        start = trio.current_time()
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        with trio.fail_after(60):
            assert await stream.receive_some() == b""
        assert 5 <= trio.current_time() - start < 6


# -- the connection cap --------------------------------------------------------------------


async def test_beyond_max_connections_new_connections_get_503_and_healthz_answers(
    start_web_server: StartWebServer,
    socket_clock: trio.testing.MockClock,
    server_log: pytest.LogCaptureFixture,
) -> None:
    server = await start_web_server(max_connections=5)
    host, port = server.url.split("://", 1)[1].rsplit(":", 1)
    async with trio.open_nursery() as nursery:
        held = [await trio.open_tcp_stream(host, int(port)) for _ in range(5)]
        await trio.testing.wait_all_tasks_blocked()

        async def ask(path: str) -> bytes:
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                received = bytearray()
                while data := await stream.receive_some():
                    received += data
                return bytes(received)

        refused = await ask("/runs")
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert b"retry-after: 1" in refused.lower()
        body = json.loads(refused.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "too_many_connections"
        health = await ask("/healthz")
        assert health.startswith(b"HTTP/1.1 200 ")
        assert json.loads(health.split(b"\r\n\r\n", 1)[1]) == {"status": "ok"}
        for stream in held:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    await trio.sleep(server.config.header_timeout)  # Hypercorn closes after its idle timeout
    async with http_client(server) as client:  # room again
        assert (await client.get("/runs")).status_code == 200
    # One warning when the limit is reached (not one per refused connection), one when it is not.
    warnings = [r.getMessage() for r in server_log.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == [
        "5 connections are open, the limit (max_connections)",
        "below the connection limit again",
    ]


def test_web_config_rejects_bad_connection_limits() -> None:
    for options in (
        {"write_timeout": 0},
        {"header_timeout": -1},
        {"body_timeout": float("inf")},
        {"max_connections": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(options))):
            WebConfig(**options)  # type: ignore[arg-type]


# -- the trioflow serve process --------------------------------------------------------------


class ServeProcess:
    """``python -m trioflow serve --port 0 ...`` with its stderr read line by line."""

    def __init__(self, *args: str, nofile: int | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("ANTHROPIC_API_KEY", None)

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trioflow",
                "serve",
                "--port",
                "0",
                "--model",
                "scripted",
                *args,
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            preexec_fn=limit,
        )
        self.lines: list[str] = []
        line = self.wait_for("serving on ")
        self.url = re.search(r"serving on (http://[\d.]+:\d+)", line).group(1)  # type: ignore[union-attr]

    def wait_for(self, text: str) -> str:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"the server ended without saying {text!r}: {self.lines}")

    def stop(self, *signums: int) -> tuple[int, float]:
        """Send the signals (the second after the first is acknowledged); return (status, seconds)."""
        start = time.monotonic()
        for i, signum in enumerate(signums):
            self.proc.send_signal(signum)
            self.wait_for("shutting down" if i == 0 else "stopping at once")
        assert self.proc.stderr is not None
        self.lines.extend(self.proc.stderr)
        status = self.proc.wait(timeout=30)
        return status, time.monotonic() - start

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def big_recording(tmp_path: Path) -> Path:
    """A recording of a finished run with ``TOKENS`` big token events."""
    path = tmp_path / "big.jsonl"

    async def record() -> None:
        from trioflow import open_event_bus
        from trioflow.bus import Overflow

        with EventRecorder(path) as recorder:
            async with open_event_bus(history=0) as bus:
                bus.add_listener(recorder, overflow=Overflow.BLOCK)
                await StreamingFlowExecutor(bus=bus).run(big_answer(then_wait=False), "talk")

    trio.run(record)
    return path


@pytest.mark.parametrize("signals", [1, 2], ids=["one-signal", "two-signals"])
def test_serve_exits_0_within_the_shutdown_timeout_with_silent_clients(
    big_recording: Path, signals: int
) -> None:
    """Silent SSE and WebSocket clients on a finished run (the replay) and a live one."""
    server = ServeProcess(
        "--replay", str(big_recording), "--speed", "inf", "--shutdown-timeout", "1", "--pace", "1"
    )
    try:
        run_id = json.loads(big_recording.read_text().split("\n", 1)[0])["run_id"]
        live = httpx.post(f"{server.url}/runs", json={"task": "What is 25 * 4?"}).json()
        with ExitStack() as stack:
            for path, websocket in [
                (f"/runs/{run_id}/events", False),
                (f"/runs/{run_id}/ws", True),
                (f"/runs/{live['run_id']}/events", False),
                (f"/runs/{live['run_id']}/ws", True),
            ]:
                sock = stack.enter_context(silent_client(server.url, path, websocket=websocket))
                sock.recv(1)  # the response has begun: the server is writing to it
            signums = [signal.SIGTERM, signal.SIGINT][:signals]
            status, seconds = server.stop(*signums)
        assert status == 0, server.lines
        assert seconds < 1.0 + 1.0, (seconds, server.lines)
        assert server.lines[-1] == "trioflow: stopped\n"
        assert not [line for line in server.lines if "Traceback" in line]
    finally:
        server.kill()


def test_serve_under_ulimit_1024_serves_1000_event_streams_and_healthz(tmp_path: Path) -> None:
    # One descriptor per connection: 1,000 event streams fit under 1,024
    # descriptors (with two each, 480 did), under the default cap (1,008
    # there). Beyond the cap: 503, and the health check still gets its answer.
    server = ServeProcess("--pace", "1", nofile=1024)
    try:
        host, port = server.url.split("://", 1)[1].rsplit(":", 1)
        run = httpx.post(f"{server.url}/runs", json={"task": "What is 25 * 4?"}).json()
        request = f"GET /runs/{run['run_id']}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        statuses: list[bytes] = []
        with ExitStack() as stack:
            for _ in range(1050):
                sock = socket.create_connection((host, int(port)))
                stack.callback(sock.close)
                sock.sendall(request)
                sock.settimeout(10)
                statuses.append(sock.recv(12)[9:12])
            health = httpx.get(f"{server.url}/healthz")
            assert health.status_code == 200, health.text
            assert health.json() == {"status": "ok"}
        served, refused = statuses.count(b"200"), statuses.count(b"503")
        assert served + refused == 1050, set(statuses)
        # 1,008, or 1,007 while the server has yet to see the POST's connection close.
        assert 1007 <= served <= 1008
        status, _ = server.stop(signal.SIGTERM)
        assert status == 0
        assert not [line for line in server.lines if "Traceback" in line]
        assert not [line for line in server.lines if "cannot accept" in line]
    finally:
        server.kill()


def test_the_default_connection_cap_leaves_a_64th_of_the_descriptors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trioflow.web._config import default_max_connections

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    assert default_max_connections() == 1008  # 1,000 clients fit under ulimit -n 1024
    monkeypatch.setattr(resource, "getrlimit", lambda which: (4096, 4096))
    assert default_max_connections() == 4096 - 64
    monkeypatch.setattr(resource, "getrlimit", lambda which: (64, 4096))
    assert default_max_connections() == 48
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20, 4096))
    assert default_max_connections() == 16


def test_serve_out_of_file_descriptors_logs_once_and_recovers(tmp_path: Path) -> None:
    server = ServeProcess("--max-connections", "5000", nofile=256)
    try:
        host, port = server.url.split("://", 1)[1].rsplit(":", 1)
        with ExitStack() as stack:
            for _ in range(300):  # idle connections: the server runs out of descriptors
                sock = socket.create_connection((host, int(port)))
                stack.callback(sock.close)
            server.wait_for("cannot accept connections")
        # The idle connections are gone: the server accepts again.
        health = httpx.get(f"{server.url}/healthz", timeout=10)
        assert health.status_code == 200
        server.wait_for("accepting connections again")
        status, _ = server.stop(signal.SIGTERM)
        assert status == 0
        # One warning per episode, not one per attempt (every 0.1 s): the closed
        # connections still queued in the backlog can start a second episode.
        starved = sum("cannot accept" in line for line in server.lines)
        assert 1 <= starved <= 3, server.lines
        assert not [line for line in server.lines if "Traceback" in line]
    finally:
        server.kill()


def test_serve_runs_have_a_default_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from trioflow.cli._serve import DEFAULT_RUN_TIMEOUT, add_arguments

    monkeypatch.delenv("TRIOFLOW_TIMEOUT", raising=False)

    def parse(*argv: str) -> Any:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args(argv)

    assert DEFAULT_RUN_TIMEOUT == 900
    assert parse().timeout == 900
    assert parse("--timeout", "0").timeout == 0  # none
    monkeypatch.setenv("TRIOFLOW_TIMEOUT", "60")
    assert parse().timeout == 60


# -- floods and disconnects ------------------------------------------------------------------


async def wait_for_watchers(server: WebServer, run_id: str, count: int) -> None:
    """Wait (with a deadline) until ``count`` connections watch the run.

    For a disconnect, which the server learns of from its socket; woken by
    every attach and release (``RunHub.wait_watchers``), not polled.
    """
    with trio.fail_after(5):
        await server.hub.wait_watchers(run_id, count)


async def test_too_many_running_runs_is_429(start_web_server: StartWebServer) -> None:
    server = await start_web_server(agent=talker(words=400, pace=100), max_running=1)
    async with http_client(server) as http:
        assert (await http.post("/runs", json={"task": "a"})).status_code == 201
        response = await http.post("/runs", json={"task": "b"})
    assert_error(response, 429, "too_many_runs")
    assert response.headers["retry-after"] == "1"


async def test_a_client_that_disconnects_releases_its_subscription_and_the_run_goes_on(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=100, pace=100))
    run_id = await start_run(server)
    run = server.executor.get_run(run_id)
    async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
        await stream.next()
        await stream.next()
        assert [s.name for s in run.bus.statistics().subscribers] == [f"sse {run_id}"]
        assert server.hub.watchers(run_id) == 1
    await wait_for_watchers(server, run_id, 0)
    assert run.bus.statistics().subscribers == ()
    assert not run.done
    run.cancel()


async def test_on_disconnect_cancel_cancels_the_run_when_its_client_leaves(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=100, pace=100))
    run_id = await start_run(server, on_disconnect="cancel")
    run = server.executor.get_run(run_id)
    async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
        await stream.next()
        await stream.next()
    with trio.fail_after(5):
        result = await run.wait()
    assert result.status == "cancelled"
    assert result.reason == "client disconnected"


async def test_on_disconnect_cancel_waits_for_the_last_client(
    start_web_server: StartWebServer, open_sse: OpenSSE
) -> None:
    server = await start_web_server(agent=talker(words=50, pace=100))
    run_id = await start_run(server, on_disconnect="cancel")
    run = server.executor.get_run(run_id)
    path = f"/runs/{run_id}/events"
    async with open_sse(server.url, path) as staying:
        async with open_sse(server.url, path) as leaving:
            await leaving.next()
            # A connection is counted before its response begins: no wait needed.
            assert server.hub.watchers(run_id) == 2
        await wait_for_watchers(server, run_id, 1)
        assert not run.done
        frames = await staying.events()
    assert frames[-1].event == "flow.completed"
