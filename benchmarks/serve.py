"""Many concurrent SSE clients on one server process, against an asyncio baseline.

Run with ``python benchmarks/serve.py [--quick] [--json]``: a full run (100 and
1,000 clients, 5 and 20 tokens/s per run, 10 s of tokens each) takes about four
minutes, ``--quick`` (3 s of tokens) about one. The baseline
needs ``uvicorn`` (``pip install uvicorn``).

Each scenario starts one server process, creates ``--runs`` runs with
``POST /runs``, connects N SSE clients (``GET /runs/{id}/events``, spread
evenly over the runs), then sends the start signal: every run emits
``rate * duration`` ``token.received`` events at ``rate`` per second on an
absolute schedule (no drift), then ``flow.completed``. The runs are staggered
evenly (run k starts ``k / (rate * runs)`` s after the signal), as
independent runs would be, rather than all emitting at the same instants.

Servers (each in its own subprocess, so its RSS and CPU are its own):

* ``trioflow``: :func:`trioflow.web.create_app` on Hypercorn's Trio worker
  (:func:`trioflow.web.serve`), the runs driven by a benchmark model that
  streams the tokens through the real agent loop, executor and event bus.
* ``baseline``: a minimal Starlette app on uvicorn (asyncio): ``POST /runs``
  starts a producer task that publishes pre-encoded SSE frames into one
  unbounded ``asyncio.Queue`` per client (after a replay of the run's
  history); ``GET /runs/{id}/events`` is a ``StreamingResponse`` reading that
  queue. This is the shape most Python SSE services have. The same JSON
  event shape as :meth:`FlowEvent.to_json` is sent.
* ``hypercorn`` (only with ``--servers ...,hypercorn``): the baseline's design
  as a raw ASGI app on Hypercorn's Trio worker (Trio memory channels, no
  Starlette, no trioflow): the floor that trioflow's transport sets, to tell
  trioflow's own cost per event from Hypercorn's and Trio's.
* ``trio`` (only with ``--servers ...,trio``): the same on raw Trio sockets,
  HTTP/1.1 written by hand: what a Trio server could reach with a transport
  of its own for the event stream.

The clients are the same for both: one Trio process of lightweight raw-socket
HTTP/1.1 readers (chunked decoding and SSE framing by hand, so the client is
not the bottleneck). Every client checks that it got every seq once, in order.

Figures:

* ``delivered ev/s``: token events received by all clients, divided by the
  time from the start signal to the last client's terminal event (a server
  that falls behind its runs' schedule takes longer, so delivers less).
* ``p50`` / ``p99`` latency: from the event's ``timestamp`` (set by the
  server when the event is emitted) to the client's receipt (the same
  machine's clock), over every token event at every client.
* ``RSS/conn``: server RSS growth from before the clients connected to its
  peak while streaming, divided by the number of clients.
* ``server CPU``: the server process's CPU time over the same period (100%
  is one core).

Diagnostics for the trioflow server: ``BENCH_TRACE=1`` prints Trio scheduler
figures per task at exit; ``BENCH_PROFILE=path`` writes a cProfile of it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import itertools
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

HOST = "127.0.0.1"
CONNECT_CONCURRENCY = 64
"""Clients that may be connecting at once (the rest wait), so the listen backlog never overflows."""


# -- the servers (run in subprocesses) ------------------------------------------------


def _event_json(seq: int, run_id: str, type: str, data: dict[str, Any], ts: float) -> str:
    # The shape and encoding of FlowEvent.to_json().
    return json.dumps(
        {"id": seq, "run_id": run_id, "type": type, "data": data, "timestamp": ts},
        separators=(",", ":"),
    )


def _offset(index: int, rate: float, runs: int) -> float:
    """Run ``index``'s first token comes ``index / (rate * runs)`` s after the start signal.

    The runs' tokens interleave evenly instead of all landing at the same instant.
    """
    return (index % runs) / (rate * runs)


def serve_baseline(rate: float, tokens: int, runs_count: int) -> None:
    """A minimal Starlette + uvicorn SSE server; prints ``PORT <n>`` when listening."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    class BaselineRun:
        def __init__(self, run_id: str) -> None:
            self.run_id = run_id
            self.history: list[bytes] = []
            self.queues: set[asyncio.Queue[bytes | None]] = set()
            self.done = False

        def publish(self, type: str, data: dict[str, Any]) -> None:
            seq = len(self.history) + 1
            body = _event_json(seq, self.run_id, type, data, time.time())
            frame = f"id: {seq}\nevent: {type}\ndata: {body}\n\n".encode()
            self.history.append(frame)
            for queue in self.queues:
                queue.put_nowait(frame)

    runs: dict[str, BaselineRun] = {}
    go = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    async def produce(run: BaselineRun, index: int) -> None:
        run.publish("flow.started", {"task": "bench"})
        await go.wait()
        loop = asyncio.get_running_loop()
        start = loop.time() + _offset(index, rate, runs_count)
        for i in range(tokens):
            await asyncio.sleep(max(0.0, start + (i + 1) / rate - loop.time()))
            run.publish("token.received", {"token": f" w{i}"})
        run.publish("flow.completed", {"output": "done", "iterations": 1})
        run.done = True
        for queue in run.queues:
            queue.put_nowait(None)

    async def create_run(request: Request) -> Response:
        run_id = f"run_{len(runs) + 1:04d}"
        run = runs[run_id] = BaselineRun(run_id)
        task = asyncio.create_task(produce(run, len(runs) - 1))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return JSONResponse(
            {"run_id": run_id, "status": "running", "events_url": f"/runs/{run_id}/events"},
            status_code=201,
        )

    async def events(request: Request) -> Response:
        run = runs[request.path_params["run_id"]]

        async def frames() -> AsyncIterator[bytes]:
            queue: asyncio.Queue[bytes | None] = asyncio.Queue()
            backlog = list(run.history)
            done = run.done
            run.queues.add(queue)
            try:
                for frame in backlog:
                    yield frame
                if done:
                    return
                while (frame := await queue.get()) is not None:
                    yield frame
            finally:
                run.queues.discard(queue)

        return StreamingResponse(frames(), media_type="text/event-stream")

    async def start(request: Request) -> Response:
        go.set()
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/runs", create_run, methods=["POST"]),
            Route("/runs/{run_id}/events", events),
            Route("/bench/go", start, methods=["POST"]),
        ]
    )
    sock = _listen()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))


def serve_trioflow(rate: float, tokens: int, runs_count: int) -> None:
    """trioflow's server with a model that streams ``tokens`` deltas at ``rate``; prints ``PORT``."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from trioflow import Agent, StreamingFlowExecutor
    from trioflow.models._base import Message, ModelEvent, TextDelta, ToolSpec, TurnEnd, Usage
    from trioflow.web import RunRequest, WebConfig, create_app, serve

    go = trio.Event()

    class BenchModel:
        """Streams ``tokens`` text deltas at ``rate`` per second once the start signal came."""

        name = "bench"

        def __init__(self, index: int) -> None:
            self.offset = _offset(index, rate, runs_count)

        @asynccontextmanager
        async def stream(
            self,
            messages: Sequence[Message],
            *,
            tools: Sequence[ToolSpec] = (),
            system: str | None = None,
        ) -> AsyncIterator[AsyncIterator[ModelEvent]]:
            async def deltas() -> AsyncIterator[ModelEvent]:
                await go.wait()
                start = trio.current_time() + self.offset
                for i in range(tokens):
                    await trio.sleep_until(start + (i + 1) / rate)
                    yield TextDelta(f" w{i}")
                yield TurnEnd("end_turn", Usage(1, tokens))

            gen = deltas()
            try:
                yield gen
            finally:
                await gen.aclose()

    created = itertools.count()

    def agent(request: RunRequest) -> Agent:
        return Agent(BenchModel(next(created)))

    async def start(request: Request) -> Response:
        go.set()
        return JSONResponse({"ok": True})

    async def main() -> None:
        executor = StreamingFlowExecutor(history=tokens + 64)
        app = create_app(executor, agent=agent, config=WebConfig(port=0))
        app.router.routes.insert(0, Route("/bench/go", start, methods=["POST"]))
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve, app)
            print(f"PORT {urls[0].rsplit(':', 1)[1]}", flush=True)

    instruments = [_Trace()] if os.environ.get("BENCH_TRACE") else []
    profile_to = os.environ.get("BENCH_PROFILE")
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        trio.run(main, instruments=instruments)
    except* KeyboardInterrupt:
        pass
    finally:
        if profile_to:
            profiler.disable()
            profiler.dump_stats(profile_to)


def serve_hypercorn(rate: float, tokens: int, runs_count: int) -> None:
    """The floor under trioflow's server: a raw ASGI SSE app on Hypercorn's Trio worker.

    No Starlette, no bus, no agent: the baseline's design (pre-encoded frames
    into one channel per client) on the server trioflow uses. It tells how much
    of trioflow's cost per event is the transport's.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve

    go = trio.Event()
    runs: dict[str, dict[str, Any]] = {}

    def publish(run: dict[str, Any], type: str, data: dict[str, Any]) -> None:
        seq = len(run["history"]) + 1
        body = _event_json(seq, run["id"], type, data, time.time())
        frame = f"id: {seq}\nevent: {type}\ndata: {body}\n\n".encode()
        run["history"].append(frame)
        for channel in run["channels"]:
            channel.send_nowait(frame)

    async def produce(run: dict[str, Any], index: int) -> None:
        publish(run, "flow.started", {"task": "bench"})
        await go.wait()
        start = trio.current_time() + _offset(index, rate, runs_count)
        for i in range(tokens):
            await trio.sleep_until(start + (i + 1) / rate)
            publish(run, "token.received", {"token": f" w{i}"})
        publish(run, "flow.completed", {"output": "done", "iterations": 1})
        run["done"] = True
        for channel in run["channels"]:
            channel.close()

    async def respond(send: Any, status: int, body: dict[str, Any]) -> None:
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def app(scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] == "lifespan":
                    while (await receive())["type"] != "lifespan.shutdown":
                        await send({"type": "lifespan.startup.complete"})
                    await send({"type": "lifespan.shutdown.complete"})
                    return
                path = scope["path"]
                if path == "/runs":
                    run_id = f"run_{len(runs) + 1:04d}"
                    run = runs[run_id] = {"id": run_id, "history": [], "channels": set()}
                    run["done"] = False
                    nursery.start_soon(produce, run, len(runs) - 1)
                    await respond(send, 201, {"run_id": run_id})
                elif path == "/bench/go":
                    go.set()
                    await respond(send, 200, {"ok": True})
                else:
                    run = runs[path.split("/")[2]]
                    headers = [(b"content-type", b"text/event-stream")]
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    sender, receiver = trio.open_memory_channel[bytes](100_000)
                    backlog, done = list(run["history"]), run["done"]
                    run["channels"].add(sender)
                    try:
                        for frame in backlog:
                            await send(
                                {"type": "http.response.body", "body": frame, "more_body": True}
                            )
                        if not done:
                            async for frame in receiver:
                                await send(
                                    {"type": "http.response.body", "body": frame, "more_body": True}
                                )
                        await send({"type": "http.response.body", "body": b""})
                    finally:
                        run["channels"].discard(sender)

            config = Config()
            config.bind = [f"{HOST}:0"]
            config.accesslog = None
            binds = await nursery.start(serve, app, config)
            print(f"PORT {binds[0].rsplit(':', 1)[1]}", flush=True)

    try:
        trio.run(main)
    except* KeyboardInterrupt:
        pass


def serve_trio(rate: float, tokens: int, runs_count: int) -> None:
    """The floor under any Trio server: the baseline's design on raw Trio sockets.

    HTTP/1.1 by hand (no HTTP library, no ASGI): one task per connection
    writes each frame as one chunk with ``send_all``. What a server on Trio
    could reach with a transport of its own for the event stream.
    """
    go = trio.Event()
    runs: dict[str, dict[str, Any]] = {}

    def publish(run: dict[str, Any], type: str, data: dict[str, Any]) -> None:
        seq = len(run["history"]) + 1
        body = _event_json(seq, run["id"], type, data, time.time())
        frame = f"id: {seq}\nevent: {type}\ndata: {body}\n\n".encode()
        run["history"].append(frame)
        for channel in run["channels"]:
            channel.send_nowait(frame)

    async def produce(run: dict[str, Any], index: int) -> None:
        publish(run, "flow.started", {"task": "bench"})
        await go.wait()
        start = trio.current_time() + _offset(index, rate, runs_count)
        for i in range(tokens):
            await trio.sleep_until(start + (i + 1) / rate)
            publish(run, "token.received", {"token": f" w{i}"})
        publish(run, "flow.completed", {"output": "done", "iterations": 1})
        run["done"] = True
        for channel in run["channels"]:
            channel.close()

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def handle(stream: trio.SocketStream) -> None:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    head += data
                request = head.split(b"\r\n", 1)[0].split()
                path = request[1].decode()
                if path in ("/runs", "/bench/go"):
                    if path == "/runs":
                        run_id = f"run_{len(runs) + 1:04d}"
                        run = runs[run_id] = {"id": run_id, "history": [], "channels": set()}
                        run["done"] = False
                        nursery.start_soon(produce, run, len(runs) - 1)
                        body = json.dumps({"run_id": run_id}).encode()
                    else:
                        go.set()
                        body = b"{}"
                    await stream.send_all(
                        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    await stream.aclose()
                    return
                run = runs[path.split("/")[2]]
                sender, receiver = trio.open_memory_channel[bytes](100_000)
                backlog, done = list(run["history"]), run["done"]
                run["channels"].add(sender)
                try:
                    await stream.send_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(map(chunk, backlog))
                    )
                    if not done:
                        async for frame in receiver:
                            await stream.send_all(chunk(frame))
                    await stream.send_all(b"0\r\n\r\n")
                except trio.BrokenResourceError:
                    pass
                finally:
                    run["channels"].discard(sender)
                    await stream.aclose()

            listeners = await trio.open_tcp_listeners(0, host=HOST, backlog=4096)
            print(f"PORT {listeners[0].socket.getsockname()[1]}", flush=True)
            await trio.serve_listeners(handle, listeners)

    try:
        trio.run(main)
    except* KeyboardInterrupt:
        pass


class _Trace(trio.abc.Instrument):
    """Scheduler figures for diagnosis (``BENCH_TRACE=1``), printed to stderr at exit."""

    def __init__(self) -> None:
        self.io_wait = 0.0
        self.steps: collections.Counter[str] = collections.Counter()
        self.busy: collections.Counter[str] = collections.Counter()
        self._t0 = time.perf_counter()
        self._mark = 0.0

    def before_io_wait(self, timeout: float) -> None:
        self._mark = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        self.io_wait += time.perf_counter() - self._mark

    def before_task_step(self, task: Any) -> None:
        self._mark = time.perf_counter()

    def after_task_step(self, task: Any) -> None:
        self.steps[task.name] += 1
        self.busy[task.name] += time.perf_counter() - self._mark

    def after_run(self) -> None:
        total = time.perf_counter() - self._t0
        print(f"trace: {total:.1f} s, {self.io_wait:.1f} s waiting for I/O", file=sys.stderr)
        for name, busy in self.busy.most_common(12):
            print(
                f"trace: {busy:7.2f} s in {self.steps[name]:8} steps "
                f"({busy / self.steps[name] * 1e6:5.1f} us each): {name[:90]}",
                file=sys.stderr,
            )


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(4096)
    return sock


# -- the clients -----------------------------------------------------------------------


@dataclass
class ClientStats:
    events: int = 0
    tokens: int = 0
    done: bool = False
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_ts: float = 0.0
    last_ts: float = 0.0


class Dechunker:
    """Incremental ``Transfer-Encoding: chunked`` decoder."""

    def __init__(self) -> None:
        self.buf = b""
        self.remaining = 0
        self.skip = 0

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data
        out: list[bytes] = []
        while buf:
            if self.remaining:
                piece = buf[: self.remaining]
                out.append(piece)
                self.remaining -= len(piece)
                buf = buf[len(piece) :]
                if not self.remaining:
                    self.skip = 2
            elif self.skip:
                n = min(self.skip, len(buf))
                buf = buf[n:]
                self.skip -= n
            else:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                size = int(buf[:end].split(b";")[0], 16)
                buf = buf[end + 2 :]
                if size == 0:
                    buf = b""
                    break
                self.remaining = size
        self.buf = buf
        return b"".join(out)


class Counter:
    """Counts up to ``target``; ``reached`` is set when it gets there."""

    def __init__(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.reached = trio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


async def sse_client(
    port: int,
    path: str,
    stats: ClientStats,
    connecting: trio.Semaphore,
    ready: Counter,
    finished: Counter,
) -> None:
    """Read one run's SSE stream until its terminal event, recording latencies."""
    try:
        await _read_stream(port, path, stats, connecting, ready)
    except (OSError, ConnectionError, ValueError, trio.BrokenResourceError) as exc:
        stats.errors.append(repr(exc))
    finally:
        finished.add()


async def _read_stream(
    port: int, path: str, stats: ClientStats, connecting: trio.Semaphore, ready: Counter
) -> None:
    async with connecting:
        stream = await trio.open_tcp_stream(HOST, port)
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed before the response headers")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n")[0].decode())
        ready.add()
    chunked = b"transfer-encoding: chunked" in head.lower()
    dechunk = Dechunker() if chunked else None
    pending = b""
    last_seq = 0
    latencies = stats.latencies
    data = rest
    async with stream:
        while True:
            now = time.time()
            if dechunk is not None:
                data = dechunk.feed(data)
            pending += data
            *frames, pending = pending.split(b"\n\n")
            for frame in frames:
                start = frame.find(b"data: ")
                if start < 0:
                    continue
                body = frame[start + 6 :]
                seq = int(frame[4 : frame.index(b"\n")]) if frame.startswith(b"id: ") else 0
                if seq != last_seq + 1:
                    stats.errors.append(f"seq {seq} after {last_seq}")
                last_seq = seq
                stats.events += 1
                if b'"type":"token.received"' in body:
                    stats.tokens += 1
                    ts = float(body[body.rindex(b'"timestamp":') + 12 : -1])
                    latencies.append(now - ts)
                    if not stats.first_ts:
                        stats.first_ts = ts
                    stats.last_ts = ts
                elif b'"type":"flow.' in body and b'"type":"flow.started"' not in body:
                    stats.done = True
                    return
            data = await stream.receive_some(65536)
            if not data:
                stats.errors.append("closed before the terminal event")
                return


# -- one scenario -------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    clients: int
    runs: int
    rate: float
    tokens_expected: int
    tokens_delivered: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    rss_idle_mb: float
    rss_peak_mb: float
    errors: int
    server_cpu: float
    client_cpu: float
    emit_s: float
    """How long the runs took to emit their tokens (median over clients)."""

    @property
    def delivered_per_s(self) -> float:
        return self.tokens_delivered / self.seconds if self.seconds else 0.0

    @property
    def rss_per_conn_kb(self) -> float:
        return (self.rss_peak_mb - self.rss_idle_mb) * 1024 / self.clients


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


async def _http(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    payload = json.dumps(body).encode() if body is not None else b""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        rest = Dechunker().feed(rest)
    status = int(head.split()[1])
    if status >= 300:
        raise RuntimeError(f"{method} {path}: {head.splitlines()[0]!r} {rest[:200]!r}")
    return json.loads(rest) if rest else None


async def run_scenario(server: str, clients: int, runs: int, rate: float, seconds: float) -> Result:
    """Measure ``server`` with ``clients`` clients on ``runs`` runs emitting ``rate`` tokens/s."""
    tokens = max(1, round(rate * seconds))
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            __file__,
            "--serve",
            server,
            "--rates",
            str(rate),
            "--duration",
            str(seconds),
            "--runs",
            str(runs),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                if not chunk:
                    raise RuntimeError(f"the {server} server did not start")
                line += chunk
        port = int(line.split()[1])
        run_ids = []
        for _ in range(runs):
            created = await _http(port, "POST", "/runs", {"task": "bench"})
            run_ids.append(created["run_id"])
        await trio.sleep(0.5)
        rss_idle = _rss_mb(proc.pid)
        stats = [ClientStats() for _ in range(clients)]
        ready, finished = Counter(clients), Counter(clients)
        peak = [rss_idle]
        connecting = trio.Semaphore(CONNECT_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            for i, st in enumerate(stats):
                path = f"/runs/{run_ids[i % runs]}/events"
                nursery.start_soon(sse_client, port, path, st, connecting, ready, finished)
            with trio.fail_after(60):
                await ready.reached.wait()
            await trio.sleep(0.5)
            start = time.perf_counter()
            server_cpu0 = _cpu_s(proc.pid)
            client_cpu0 = time.process_time()
            await _http(port, "POST", "/bench/go")

            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], _rss_mb(proc.pid))
                    await trio.sleep(0.2)

            nursery.start_soon(sample)
            with trio.move_on_after(seconds * 3 + 30):
                await finished.reached.wait()
            elapsed = time.perf_counter() - start
            server_cpu = (_cpu_s(proc.pid) - server_cpu0) / elapsed
            client_cpu = (time.process_time() - client_cpu0) / elapsed
            nursery.cancel_scope.cancel()
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.move_on_after(60 if os.environ.get("BENCH_PROFILE") else 5):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    latencies = sorted(x for st in stats for x in st.latencies)
    errors = sum(len(st.errors) + (not st.done) for st in stats)

    def pct(p: float) -> float:
        if not latencies:
            return math.nan
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return Result(
        server=server,
        clients=clients,
        runs=runs,
        rate=rate,
        tokens_expected=clients * tokens,
        tokens_delivered=sum(st.tokens for st in stats),
        seconds=elapsed,
        p50_ms=pct(0.50),
        p99_ms=pct(0.99),
        max_ms=latencies[-1] * 1000 if latencies else math.nan,
        rss_idle_mb=rss_idle,
        rss_peak_mb=peak[0],
        errors=errors,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        emit_s=statistics.median(st.last_ts - st.first_ts for st in stats) + 1 / rate,
    )


# -- the report ------------------------------------------------------------------------------


def _stack() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("trio", "hypercorn", "starlette", "uvicorn", "uvloop", "httptools"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "-"
    return versions


def table(results: Sequence[Result], args: argparse.Namespace) -> str:
    stack = _stack()
    lines = [
        f"Python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"server and clients on the same machine. {args.runs} runs emit {args.duration:g} s of "
        "tokens each, staggered evenly; the clients are spread evenly over the runs, so each "
        "client receives its run's rate.",
        f"trioflow: Hypercorn {stack['hypercorn']} (Trio {stack['trio']}); baseline: Starlette "
        f"{stack['starlette']} + uvicorn {stack['uvicorn']} (asyncio; uvloop {stack['uvloop']}, "
        f"httptools {stack['httptools']}).",
        "",
        "| clients | tokens/s per run | server | delivered ev/s | vs baseline | p50 ms | p99 ms "
        "| RSS/conn KiB | server CPU | lost |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {(r.clients, r.rate): r for r in results if r.server == "baseline"}
    for r in results:
        ref = base.get((r.clients, r.rate))
        ratio = r.delivered_per_s / ref.delivered_per_s if ref and ref.delivered_per_s else math.nan
        lost = r.tokens_expected - r.tokens_delivered
        lines.append(
            f"| {r.clients:,} | {r.rate:g} | {r.server} | {r.delivered_per_s:,.0f} | {ratio:.2f}x "
            f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.rss_per_conn_kb:.1f} "
            f"| {r.server_cpu:.0%} | {lost} |"
        )
    lines.append("")
    for rate in sorted({r.rate for r in results}):
        mine = {r.clients: r for r in results if r.server == "trioflow" and r.rate == rate}
        ref = base.get((1000, rate))
        if 1000 in mine and ref is not None:
            r = mine[1000]
            met = r.delivered_per_s >= ref.delivered_per_s * 0.99 and r.p99_ms < 50
            lines.append(
                f"Target at 1,000 clients and {rate:g} tokens/s per run (delivered >= the "
                f"baseline's, p99 < 50 ms): {'met' if met else 'NOT met'}."
            )
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> list[Result]:
    results = []
    for rate in args.rates:
        for clients in args.clients:
            for server in args.servers:
                result = await run_scenario(server, clients, args.runs, rate, args.duration)
                print(
                    f"# {server:8} {clients:5} clients at {rate:g}/s: "
                    f"{result.delivered_per_s:,.0f} ev/s, p50 {result.p50_ms:.1f} ms, "
                    f"p99 {result.p99_ms:.1f} ms, max {result.max_ms:.1f} ms; tokens emitted in "
                    f"{result.emit_s:.1f} s of {args.duration:g}; server CPU "
                    f"{result.server_cpu:.0%}, client CPU {result.client_cpu:.0%}; "
                    f"{result.errors} errors",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(result)
    return results


def _numbers(kind: type[float] | type[int]) -> Any:
    return lambda text: [kind(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s of tokens per scenario")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument(
        "--clients",
        type=_numbers(int),
        default=[100, 1000],
        help="comma-separated client counts (default: 100,1000)",
    )
    parser.add_argument(
        "--rates",
        type=_numbers(float),
        default=[5.0, 20.0],
        help="comma-separated tokens/s per run (default: 5,20)",
    )
    parser.add_argument(
        "--servers",
        type=lambda s: s.split(","),
        default=["trioflow", "baseline"],
        help="comma-separated servers to measure (default: trioflow,baseline)",
    )
    parser.add_argument("--runs", type=int, default=10, help="concurrent runs (default: 10)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds of tokens per run (default: 10)"
    )
    parser.add_argument(
        "--serve", choices=["trioflow", "baseline", "hypercorn", "trio"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.serve is not None:
        rate = args.rates[0]
        tokens = max(1, round(rate * args.duration))
        servers = {
            "trioflow": serve_trioflow,
            "baseline": serve_baseline,
            "hypercorn": serve_hypercorn,
            "trio": serve_trio,
        }
        servers[args.serve](rate, tokens, args.runs)
        return
    if "baseline" in args.servers and importlib.util.find_spec("uvicorn") is None:
        parser.error("the baseline needs uvicorn: pip install uvicorn")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    results = trio.run(bench, args)
    if args.json:
        print(json.dumps([asdict(r) | {"delivered_per_s": r.delivered_per_s} for r in results]))
    else:
        print()
        print(table(results, args))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
