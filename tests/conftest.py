"""Shared fixtures. Request ``autojump_clock`` to run a test on a MockClock that
jumps ahead whenever every task is blocked (timeouts and backoff become exact)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from trioflow import Agent, FlowEvent, StreamingFlowExecutor
from trioflow.models._base import Message, Model, ModelError, ModelEvent, RetryNotice
from trioflow.supervise import RetryPolicy
from trioflow.testing._anthropic_server import AnthropicServer, open_anthropic_server
from trioflow.testing._openai_server import OpenAIServer, open_openai_server

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

    import httpx
    from starlette.applications import Starlette
    from trio_websocket import WebSocketConnection

    from trioflow.models._claude import AnthropicModel
    from trioflow.models._openai import OpenAIModel
    from trioflow.web import AgentFactory, WebConfig
    from trioflow.web._fanout import EventFanout
    from trioflow.web._runs import RunHub


# -- external programs ------------------------------------------------------------------

REQUIRED = frozenset(
    name.strip().lower()
    for name in os.environ.get("TRIOFLOW_REQUIRE", "").split(",")
    if name.strip()
)
"""Programs named in ``TRIOFLOW_REQUIRE`` (``chromium,redis,node``; ``all`` for every one):
a test that needs one of them fails when it is missing, instead of skipping."""


def require(name: str, found: bool, install: str) -> None:
    """Skip the calling test (or fixture) when program ``name`` was not ``found``.

    The skip reason is one line saying what to install. When ``TRIOFLOW_REQUIRE``
    names the program (as ``.ci/run`` does), a missing program fails the test.
    """
    if found:
        return
    reason = f"needs {name}: {install}"
    if name in REQUIRED or "all" in REQUIRED:
        pytest.fail(f"{reason} (TRIOFLOW_REQUIRE names it)", pytrace=False)
    pytest.skip(f"{reason} (TRIOFLOW_REQUIRE={name} fails instead)")


def which(program: str, env: str | None = None) -> str | None:
    """The path of ``program`` (``$env`` overrides the lookup when set), or None."""
    path = os.environ.get(env) if env else None
    if path:
        return path if os.access(path, os.X_OK) else None
    return shutil.which(program)


# -- the trioflow command and recordings --------------------------------------------------

MODEL_VARIABLES = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "TRIOFLOW_OPENAI_BASE_URL")
"""The variables by which a real model would be picked or reached."""
CLI_ENV = {k: v for k, v in os.environ.items() if k not in MODEL_VARIABLES}
"""The environment of a ``python -m trioflow`` process: this one without :data:`MODEL_VARIABLES`."""


def trioflow(
    *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m trioflow *args`` as a real process (in :data:`CLI_ENV`).

    For tests whose point is the process; for exit status and output, ``run_cli``.
    """
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "trioflow", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        env=CLI_ENV,
        check=False,
    )


def timed(offsets: list[float], *, t0: float = 1_700_000_000.0) -> list[FlowEvent]:
    """``token.received`` events of run ``r1``, seqs 1, 2, ..., at ``t0`` plus each offset."""
    return [
        FlowEvent("token.received", {"token": str(i)}, t0 + dt, i + 1, "r1")
        for i, dt in enumerate(offsets)
    ]


def write_recording(path: Path, events: list[FlowEvent]) -> Path:
    """Write ``events`` to ``path`` as a recording (one JSON line each); return ``path``."""
    path.write_text("".join(e.to_json() + "\n" for e in events))
    return path


RunCli = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> RunCli:
    """``run_cli(*args, stdin=None)`` runs ``trioflow *args`` in this process (``trioflow.cli.main``)
    without ``$ANTHROPIC_API_KEY``; it returns the exit status and the captured output as
    ``subprocess.run`` would. For exit status and output; a test whose point is the process
    (signals, ``python -m``, start-up imports) runs ``python -m trioflow`` instead."""
    import io
    import subprocess
    import sys

    from trioflow.cli import main

    for name in MODEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        if stdin is not None:
            buffer = io.BytesIO(stdin.encode())
            buffer.name = "<stdin>"  # as the real one is called
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(buffer))
        capsys.readouterr()
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse: --version, usage errors
            status = int(exc.code or 0)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["trioflow", *args], status, out, err)

    return run


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def socket_clock() -> trio.testing.MockClock:
    """A MockClock for tests with real sockets: it jumps once every task has been blocked
    for 0.1 s of real time, not at once, so that data still on its way through the
    loopback interface (delayed by a loaded machine) is never taken for a silent peer."""
    return trio.testing.MockClock(autojump_threshold=0.1)


@pytest.fixture
def no_proxy_for_local_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the SDK's HTTP client off ``$HTTP(S)_PROXY`` / ``$ALL_PROXY`` for 127.0.0.1."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))


@pytest.fixture
async def anthropic_server(no_proxy_for_local_servers: None) -> AsyncIterator[AnthropicServer]:
    """A local Anthropic Messages API server on 127.0.0.1 with an empty script.

    Add replies with ``anthropic_server.add(...)``; point the SDK at its ``base_url``
    (``$NO_PROXY`` covers 127.0.0.1 for the test).
    """
    async with open_anthropic_server() as server:
        yield server


# -- AnthropicModel against the local server -------------------------------------------

KEY = "sk-ant-api03-TRIOFLOW-FAKE-KEY-7f3a9c1e5b"
"""A well-formed but fake API key: the local server accepts it, Anthropic would not."""
MODEL = "claude-sonnet-5-5"
POLICY = RetryPolicy(attempts=4, base_delay=0.5, jitter=0)
"""The ``model`` fixture's retry policy: four attempts, backoff 0.5, 1, 2 s, no jitter."""


@pytest.fixture
async def model(anthropic_server: AnthropicServer) -> AsyncIterator[AnthropicModel]:
    """An :class:`AnthropicModel` (the real SDK) talking to ``anthropic_server``, with ``POLICY``."""
    from trioflow.models._claude import AnthropicModel

    async with AnthropicModel(
        MODEL, api_key=KEY, base_url=anthropic_server.base_url, retry=POLICY
    ) as model:
        yield model


async def collect(
    model: Model,
    messages: Sequence[Message] = (Message.user("Hi"),),
    **kwargs: Any,
) -> list[ModelEvent]:
    """Every event of one ``model.stream(messages, **kwargs)``."""
    async with model.stream(messages, **kwargs) as events:
        return [event async for event in events]


async def collect_until_error(
    model: Model, seen: list[ModelEvent]
) -> pytest.ExceptionInfo[ModelError]:
    """Stream ``Hi`` into ``seen`` until the :class:`ModelError` it must end with."""
    with pytest.raises(ModelError) as info:
        async with model.stream([Message.user("Hi")]) as events:
            async for event in events:
                seen.append(event)
    return info


def notices(events: Sequence[ModelEvent]) -> list[RetryNotice]:
    """The retry notices among ``events``."""
    return [e for e in events if isinstance(e, RetryNotice)]


# -- OpenAIModel against the local server ----------------------------------------------

OPENAI_KEY = "sk-proj-TRIOFLOW-FAKE-OPENAI-KEY-3c9d0e7a21"
"""A well-formed but fake OpenAI API key."""
OPENAI_MODEL = "gpt-test-mini"


@pytest.fixture
async def openai_server(no_proxy_for_local_servers: None) -> AsyncIterator[OpenAIServer]:
    """A local OpenAI Chat Completions server on 127.0.0.1 with an empty script.

    Add replies with ``openai_server.add(...)``; point the SDK at its ``api_url``.
    """
    async with open_openai_server() as server:
        yield server


@pytest.fixture
async def openai_model(openai_server: OpenAIServer) -> AsyncIterator[OpenAIModel]:
    """An :class:`OpenAIModel` (the real SDK) talking to ``openai_server``, with ``POLICY``."""
    from trioflow.models._openai import OpenAIModel

    async with OpenAIModel(
        OPENAI_MODEL, api_key=OPENAI_KEY, base_url=openai_server.api_url, retry=POLICY
    ) as model:
        yield model


# -- the web server (trioflow.web) ------------------------------------------------------


@dataclasses.dataclass
class WebServer:
    """A trioflow web server running on 127.0.0.1 in the test's nursery."""

    url: str
    """``http://127.0.0.1:<port>``."""
    ws_url: str
    """``ws://127.0.0.1:<port>``."""
    executor: StreamingFlowExecutor
    app: Starlette
    config: WebConfig
    stop: trio.Event
    """Set it to shut the server down gracefully."""
    stopped: trio.Event
    """Set once ``serve`` has returned."""

    @property
    def hub(self) -> RunHub:
        from trioflow.web._app import hub_of

        return hub_of(self.app)


StartWebServer = Callable[..., Awaitable[WebServer]]


async def joined_fanout(
    hub: RunHub, run_id: str, targets: int, name: str = "sse"
) -> EventFanout[Any, Any]:
    """The run's fan-out for the encoding ``name`` once ``targets`` connections have joined it."""
    with trio.fail_after(5):
        return await hub.wait_joined(run_id, targets, name)


class PassThrough:
    """ASGI middleware that changes nothing: an application with it added is served
    entirely through the ASGI path (no event stream served on the connection itself)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@pytest.fixture(params=["direct", "asgi"])
def ws_path(request: pytest.FixtureRequest) -> str:
    """Both ways a WebSocket is served: ``"direct"`` (on the connection itself, under
    ``serve()``) and ``"asgi"`` (Hypercorn, wsproto and Starlette, as with middleware).

    A test (or module: ``pytestmark = pytest.mark.usefixtures("ws_path")``) using it runs
    once for each; :func:`start_web_server` then adds :class:`PassThrough` for ``"asgi"``.
    """
    return str(request.param)


@pytest.fixture
def ws_fanout(ws_path: str) -> str:
    """The name of a run's WebSocket fan-out (and frame cache) on the ``ws_path`` taken."""
    return "ws-frames" if ws_path == "direct" else "ws"


@pytest.fixture
async def start_web_server(nursery: trio.Nursery, request: pytest.FixtureRequest) -> StartWebServer:
    """Start servers with ``await start_web_server(agent=..., history=..., **WebConfig options)``.

    Each listens on an ephemeral 127.0.0.1 port, is started with ``nursery.start``
    and is stopped (cancelled) when the test ends. ``through_asgi=True`` adds a
    :class:`PassThrough` middleware: every request then goes through Hypercorn and
    Starlette (event streams included), the way an application with middleware is served.
    Its default is ``False``, or the ``ws_path`` parameter when the test uses that fixture.
    """
    asgi = "ws_path" in request.fixturenames and request.getfixturevalue("ws_path") == "asgi"

    async def start(
        *,
        agent: Agent | AgentFactory | None = None,
        history: int = 4096,
        through_asgi: bool = asgi,
        **options: Any,
    ) -> WebServer:
        from trioflow.web import WebConfig, create_app, serve

        config = WebConfig(port=0, **options)
        executor = StreamingFlowExecutor(history=history)
        app = create_app(executor, agent=agent, config=config)
        if through_asgi:
            app.add_middleware(PassThrough)
        stop, stopped = trio.Event(), trio.Event()

        async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(app, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                stopped.set()

        urls: list[str] = await nursery.start(run)
        url = urls[0]
        return WebServer(url, "ws" + url[4:], executor, app, config, stop, stopped)

    return start


def talker(words: int = 20, pace: float = 0.0, delay: float = 0.0) -> AgentFactory:
    """An agent factory: each run says ``words`` words at ``pace`` words per second."""
    from trioflow import ScriptedModel, Turn

    text = " ".join(f"w{i}" for i in range(words))

    def make(request: Any) -> Agent:
        return Agent(ScriptedModel([Turn(text, delay=delay)], pace=pace))

    return make


def flood(events: int = 400, size: int = 32 * 1024, delay: float = 0.2) -> AgentFactory:
    """An agent factory: each run says ``events`` tokens of ``size`` bytes after ``delay`` s,
    far more than the socket buffers hold, to play a client that does not keep up."""
    from trioflow import ScriptedModel, Turn

    big = "x" * size

    def make(request: Any) -> Agent:
        return Agent(ScriptedModel([Turn([big] * events, delay=delay)]))

    return make


def http_client(server: WebServer | str, **headers: str) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for ``server`` (a :class:`WebServer` or its URL), with ``headers``.

    The servers speak plain HTTP: ``verify=False`` only skips loading the CA bundle
    (half a second per client); no certificate is ever presented to check.
    """
    import httpx

    url = server if isinstance(server, str) else server.url
    return httpx.AsyncClient(base_url=url, timeout=10, verify=False, headers=headers)


async def post_run(
    server: WebServer | str, task: str = "What is 25 * 4?", *, token: str | None = None, **body: Any
) -> httpx.Response:
    """``POST /runs`` to ``server`` (with the bearer ``token``, by default the one the server
    is configured with); assert the run was created (201) and return the response."""
    if token is None and not isinstance(server, str):
        token = server.config.token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http_client(server, **headers) as http:
        response = await http.post("/runs", json={"task": task, **body})
    assert response.status_code == 201, response.text
    return response


async def start_run(
    server: WebServer | str, task: str = "What is 25 * 4?", *, token: str | None = None, **body: Any
) -> str:
    """``POST /runs`` to ``server`` (see :func:`post_run`); return the run id."""
    response = await post_run(server, task, token=token, **body)
    return str(response.json()["run_id"])


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The records of the ``trioflow.web`` and ``hypercorn`` loggers (the server's errors)."""
    caplog.set_level(logging.DEBUG, logger="trioflow.web")
    caplog.set_level(logging.DEBUG, logger="hypercorn")
    return caplog


def assert_error(response: Any, status: int, code: str) -> dict[str, object]:
    """The response is the JSON error ``{"error": {"code", "message"}}`` with ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def assert_no_traceback(log: pytest.LogCaptureFixture) -> None:
    """A client's mistake is not the server's error: nothing logged with a traceback."""
    bad = [r for r in log.records if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]
    assert "Traceback" not in log.text


@pytest.fixture
async def web_server(start_web_server: StartWebServer) -> WebServer:
    """A web server with the default options and the offline calculator agent."""
    return await start_web_server()


@dataclasses.dataclass
class SSEFrame:
    """One block of an event stream: its fields, or only comments."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: str | None = None
    comments: list[str] = dataclasses.field(default_factory=list)

    def json(self) -> Any:
        import json

        assert self.data is not None
        return json.loads(self.data)


class SSEStream:
    """A raw HTTP/1.1 event-stream reader (h11 over a Trio socket), keeping comments.

    Unlike httpx's streaming iterators, it leaves no async generator behind
    when a test stops reading mid-stream, and it can use a small receive
    buffer to play a slow client.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        import h11

        from trioflow.sse import SSELineDecoder

        self._h11 = h11
        self._stream = stream
        self._conn = h11.Connection(h11.CLIENT)
        self._lines = SSELineDecoder()
        self._block: list[str] = []  # the lines of the block being received
        self._blocks: collections.deque[list[str]] = collections.deque()
        self._raw: list[str] = []
        self.status = 0
        self.headers: dict[str, str] = {}

    async def _event(self) -> Any:
        while True:
            event = self._conn.next_event()
            if event is self._h11.NEED_DATA:
                self._conn.receive_data(await self._stream.receive_some(65536))
                continue
            return event

    async def _start(self, host: str, path: str, headers: dict[str, str]) -> None:
        h11 = self._h11
        request = h11.Request(
            method="GET",
            target=path,
            headers=[("Host", host), ("Accept", "text/event-stream"), *headers.items()],
        )
        await self._stream.send_all(self._conn.send(request) + self._conn.send(h11.EndOfMessage()))
        response = await self._event()
        assert isinstance(response, h11.Response), response
        self.status = response.status_code
        self.headers = {k.decode(): v.decode() for k, v in response.headers}

    async def next(self) -> SSEFrame | None:
        """The next block, or None once the server ended the response."""
        from trioflow.sse import parse_line

        h11 = self._h11
        while not self._blocks:
            event = await self._event()
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                self._raw.append(data.decode("ascii"))
                for line in self._lines.feed(data):
                    if line:
                        self._block.append(line)
                    elif self._block:
                        self._blocks.append(self._block)
                        self._block = []
            else:
                assert isinstance(event, h11.EndOfMessage), event
                pending = (self._block, self._lines.pending)
                assert pending == ([], False), f"stream ended inside a frame: {pending!r}"
                return None
        block = self._blocks.popleft()
        frame = SSEFrame()
        for line in block:
            name, value = parse_line(line)
            if not name:
                frame.comments.append(value.strip())
                continue
            assert line.startswith(f"{name}: "), line
            assert name in ("id", "event", "data", "retry"), line
            assert getattr(frame, name) is None, f"repeated field in {block!r}"
            setattr(frame, name, value)
        return frame

    @property
    def raw(self) -> str:
        """Everything received so far, as sent."""
        return "".join(self._raw)

    async def events(self) -> list[SSEFrame]:
        """Every remaining block with data, up to the end of the response."""
        frames = []
        while (frame := await self.next()) is not None:
            if frame.data is not None:
                frames.append(frame)
        return frames


OpenSSE = Callable[..., AbstractAsyncContextManager[SSEStream]]


@pytest.fixture
def open_sse() -> OpenSSE:
    """``async with open_sse(url, path, headers={...}, rcvbuf=None) as stream:`` (a :class:`SSEStream`).

    Leaving the block closes the connection: a forced disconnect, mid-stream if need be.
    """

    @asynccontextmanager
    async def connect(
        url: str, path: str, *, headers: dict[str, str] | None = None, rcvbuf: int | None = None
    ) -> AsyncIterator[SSEStream]:
        import socket

        host = url.split("://", 1)[1]
        address, port = host.rsplit(":", 1)
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((address, int(port)))
        async with trio.SocketStream(sock) as stream:
            reader = SSEStream(stream)
            await reader._start(host, path, headers or {})
            yield reader

    return connect


OpenWS = Callable[..., AbstractAsyncContextManager["WebSocketConnection"]]


@pytest.fixture
def open_ws() -> OpenWS:
    """``async with open_ws(url, headers={...}, rcvbuf=None) as ws:`` a trio-websocket client.

    Like ``trio_websocket.open_websocket_url``, but over a TCP stream the
    fixture owns and always closes: trio-websocket 0.12 leaves the client's
    socket open when the server closes the connection first.
    """
    from trio_websocket import wrap_client_stream

    from trioflow._util import collapse_single_group

    @asynccontextmanager
    async def connect(
        url: str, *, headers: dict[str, str] | None = None, rcvbuf: int | None = None
    ) -> AsyncIterator[WebSocketConnection]:
        import socket

        rest = url.split("://", 1)[1]
        netloc, _, path = rest.partition("/")
        host, port = netloc.rsplit(":", 1)
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, int(port)))
        with collapse_single_group():
            async with trio.SocketStream(sock) as stream:
                async with trio.open_nursery() as nursery:
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        netloc,
                        "/" + path,
                        extra_headers=extra,
                        max_message_size=2**26,
                    )
                    try:
                        yield ws
                    finally:
                        with trio.move_on_after(5) as scope:
                            scope.shield = True
                            await ws.aclose()

    return connect


async def all_events(executor: StreamingFlowExecutor, run_id: str) -> list[FlowEvent]:
    """Every event of run ``run_id`` once it has finished, from the executor's own bus."""
    run = executor.get_run(run_id)
    await run.wait()
    async with run.subscribe(after=0) as sub:
        return [event async for event in sub]


# -- WebSocket frames --------------------------------------------------------------------


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    """The next frame (a text frame holding a JSON object), within 5 s."""
    import json

    with trio.fail_after(5):
        message = await ws.get_message()
    assert isinstance(message, str)  # every frame is a text frame
    frame: dict[str, Any] = json.loads(message)
    return frame


async def send(ws: WebSocketConnection, message: Any) -> None:
    """Send ``message``: a str or bytes as it is, anything else as JSON."""
    import json

    await ws.send_message(message if isinstance(message, (str, bytes)) else json.dumps(message))


async def until_terminal(
    ws: WebSocketConnection, run_id: str | None = None
) -> list[dict[str, Any]]:
    """Frames up to the terminal event (of ``run_id``, if given)."""
    frames = []
    while True:
        frame = await receive(ws)
        frames.append(frame)
        if frame.get("type") in ("flow.completed", "flow.failed", "flow.cancelled") and (
            run_id is None or frame["run_id"] == run_id
        ):
            return frames


# -- a private redis-server ------------------------------------------------------------


@dataclasses.dataclass
class RedisServer:
    """A ``redis-server`` of the tests': a Unix socket only (``--port 0``), files in ``directory``.

    ``aof=True`` persists every write before acknowledging it (``appendonly
    yes``, ``appendfsync always``), so :meth:`kill` then :meth:`start` again
    comes back with every acknowledged write; else nothing is persisted.
    """

    program: str
    directory: Path
    aof: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.directory / "redis.sock")

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING (having loaded its AOF)."""
        import subprocess
        import time

        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.aof
            else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            [
                self.program,
                "--port", "0",
                "--unixsocket", self.socket,
                "--unixsocketperm", "700",
                "--save", "",
                *persistence,
                "--dir", str(self.directory),
                "--logfile", "redis.log",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == b"+PONG":
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                pytest.fail(f"redis-server did not start:\n{log}", pytrace=False)
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """Send one command over a plain socket; the first line of the reply (``+OK``, ``:3``, ...)."""
        import socket

        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.socket)
            sock.sendall(b"".join(parts))
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict (the whole bulk reply, read with a sync socket)."""
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(self.socket)
            sock.sendall(f"INFO {section}\r\n".encode())
            data = b""
            while True:
                data += sock.recv(65536)
                head, _, body = data.partition(b"\r\n")
                if head.startswith(b"$") and len(body) >= int(head[1:]):
                    break
        lines = body.decode().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def pause(self) -> None:
        """``SIGSTOP`` the server: connections stay open, nothing is answered."""
        import signal

        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """``SIGCONT`` the server after :meth:`pause`."""
        import signal

        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """``kill -9`` the server (no shutdown, no final save)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()  # a paused server does not handle SIGTERM
            self.process.terminate()
            try:
                self.process.wait(5)
            except Exception:
                self.process.kill()
                self.process.wait(5)


def redis_server_program() -> str:
    """The ``redis-server`` to run (``$TRIOFLOW_REDIS_SERVER`` or ``PATH``), or skip/fail as ``require``."""
    program = which("redis-server", "TRIOFLOW_REDIS_SERVER")
    require("redis", program is not None, "apt-get install redis-server")
    assert program is not None
    return program


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private server per session (per xdist worker), without persistence."""
    server = RedisServer(redis_server_program(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's server, emptied (``FLUSHALL``, statistics reset) and set to ``noeviction``."""
    redis_server.command("FLUSHALL")
    redis_server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    redis_server.command("CONFIG", "RESETSTAT")
    return redis_server.url


@pytest.fixture
def redis_aof_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server of the test's own with AOF (``appendfsync always``), to kill and restart."""
    server = RedisServer(redis_server_program(), tmp_path_factory.mktemp("redis-aof"), aof=True)
    server.start()
    yield server
    server.stop()


# -- real trioflow processes -------------------------------------------------------------------


class CliProcess:
    """A ``python -m trioflow ...`` process, its standard error collected as it comes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.err = b""
        self._more = trio.Event()

    async def _collect(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.err += chunk
            self._more.set()
            self._more = trio.Event()
        self._more.set()

    async def wait_for(self, text: str) -> None:
        """Return once ``text`` was written on standard error (AssertionError if it exits first)."""
        while text.encode() not in self.err:
            if self.process.returncode is not None and self.process.stderr is None:
                raise AssertionError(self.err.decode())
            await self._more.wait()

    def url(self) -> str:
        """The first URL a ``trioflow serve`` process printed (``serving on URL``)."""
        import re

        found = re.search(rb"serving on (http\S+?)[,; ]", self.err)
        assert found is not None, self.err.decode()
        return found.group(1).decode()


@asynccontextmanager
async def cli_process(
    *args: str, ready: str, env: dict[str, str] | None = None
) -> AsyncIterator[CliProcess]:
    """``python -m trioflow *args`` (in :data:`CLI_ENV`), once its standard error said ``ready``.

    Killed (``SIGKILL``) on leaving the block if it is still running.
    """
    import subprocess
    import sys
    from pathlib import Path

    import trioflow

    root = str(Path(trioflow.__file__).parent.parent)  # this checkout, whatever is installed
    path = os.pathsep.join([root, CLI_ENV.get("PYTHONPATH", "")])
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioflow", *args],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env={**CLI_ENV, "PYTHONPATH": path, **(env or {})},
    )
    cli = CliProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cli._collect)
            await cli.wait_for(ready)
            yield cli
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


# -- the real JavaScript clients (Node) ----------------------------------------------------------

JS_DIR = __import__("pathlib").Path(__file__).parent / "js"
"""``tests/js``: ``package.json`` and the committed ``package-lock.json`` of the JavaScript
client libraries the protocol tests run (``@ag-ui/client``, ``ai``), and their scripts."""


def _install_js_clients() -> None:
    """``npm ci`` into ``tests/js/node_modules`` unless it already holds this lockfile.

    A stamp (the lockfile's SHA-256) marks a finished install; a file lock makes
    the xdist workers of one session install once.
    """
    import hashlib
    import subprocess

    import filelock

    lock = JS_DIR / "package-lock.json"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    stamp = JS_DIR / "node_modules" / ".trioflow-lock-sha256"
    with filelock.FileLock(str(JS_DIR / ".npm-ci.lock"), timeout=300):
        if stamp.exists() and stamp.read_text() == digest:
            return
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=280,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci in {JS_DIR} failed:\n{done.stderr[-4000:]}", pytrace=False)
        stamp.write_text(digest)


@pytest.fixture(scope="session")
def js_clients() -> Path:
    """``tests/js`` with its ``node_modules`` installed (``npm ci`` from the lockfile, once).

    Skips (or fails, when ``TRIOFLOW_REQUIRE`` names ``node``) without ``node`` and ``npm``.
    """
    found = which("node") is not None and which("npm") is not None
    require("node", found, "install Node.js 18+ with npm")
    _install_js_clients()
    return JS_DIR


async def run_node(js_dir: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``node tests/js/<script> *args`` without blocking Trio; fail on a non-zero exit.

    Bound it with the caller's ``trio.fail_after``.

    The script's standard output is the test's evidence (scripts print JSON);
    its standard error is in the failure message.
    """
    import subprocess

    done = await trio.run_process(
        ["node", str(js_dir / script), *args],
        cwd=js_dir,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = done.stdout.decode()
    err = done.stderr.decode()
    if done.returncode != 0:
        pytest.fail(f"node {script} exited {done.returncode}:\n{err[-4000:]}\n{out[-2000:]}")
    return subprocess.CompletedProcess(done.args, done.returncode, out, err)
