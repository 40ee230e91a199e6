"""Serve nodes on Redis, against a real redis-server: two ``serve()`` in this process sharing
one Redis (a run started on A streams from B over SSE and WebSocket, resumes, cancels across
nodes, survives a restart of A), and two ``python -m trioflow serve --redis`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from conftest import (
    WebServer,
    http_client,
    post_run,
    receive,
    send,
    start_run,
    talker,
    until_terminal,
)

import trioflow
from trioflow import StreamingFlowExecutor

pytest.importorskip("coredis")

from trioflow.redis import RedisRunStore, RemoteRun, new_run_id, open_redis, open_worker
from trioflow.web import WebConfig, create_app, serve
from trioflow.web._app import direct_writes

if TYPE_CHECKING:
    from conftest import OpenSSE, OpenWS, RedisServer
    from starlette.applications import Starlette

    from trioflow.web._runs import AgentFactory


async def start_node(
    nursery: trio.Nursery,
    redis_url: str,
    agent: AgentFactory | None = None,
    port: int = 0,
    *,
    enqueue: bool = False,
    **config: Any,
) -> WebServer:
    """A serve node on ``redis_url`` in ``nursery``, on 127.0.0.1 (``port``, else ephemeral);
    ``enqueue``: it queues the runs it starts for workers; ``config``: more ``WebConfig``."""
    stop, stopped = trio.Event(), trio.Event()
    made: list[tuple[StreamingFlowExecutor, Starlette, WebConfig]] = []

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            async with open_redis(redis_url) as client:
                store = RedisRunStore(client)
                executor = StreamingFlowExecutor(
                    history_store=store.history_factory(flush_interval=0.005), run_ids=new_run_id
                )
                web = WebConfig(port=port, **config)
                app = create_app(
                    executor,
                    agent=agent or talker(40, pace=100),
                    config=web,
                    store=store,
                    enqueue=enqueue,
                )
                made.append((executor, app, web))
                await serve(app, shutdown_trigger=stop.wait, task_status=task_status)
        finally:
            stopped.set()

    urls: list[str] = await nursery.start(run)
    executor, app, config = made[0]
    return WebServer(urls[0], "ws" + urls[0][4:], executor, app, config, stop, stopped)


def ids(frames: list[Any]) -> list[int]:
    return [int(frame.id) for frame in frames]


async def test_a_run_started_on_node_a_streams_gapless_from_node_b_and_resumes(
    redis_url: str, nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url)
        b = await start_node(nursery, redis_url)
        assert not direct_writes(b.app)
        run_id = await start_run(a.url)
        async with open_sse(b.url, f"/runs/{run_id}/events") as stream:
            frames = await stream.events()
        assert ids(frames) == list(range(1, len(frames) + 1))
        assert frames[-1].event == "flow.completed"
        last = len(frames)
        async with open_sse(b.url, f"/runs/{run_id}/events", headers={"Last-Event-ID": "7"}) as s:
            resumed = await s.events()
        assert ids(resumed) == list(range(8, last + 1))
        assert [f.data for f in resumed] == [f.data for f in frames[7:]]
        async with http_client(b) as http:
            view = (await http.get(f"/runs/{run_id}")).json()
            assert (view["status"], view["last_seq"]) == ("completed", last)
            listed = (await http.get("/runs")).json()
            assert run_id in [r["run_id"] for r in listed["runs"]]
            missing = await http.get("/runs/run_nope")
            assert missing.status_code == 404
            assert (await http.get("/runs/run_nope/events")).status_code == 404


async def test_a_live_run_is_followed_from_b_while_a_executes_it(
    redis_url: str, nursery: trio.Nursery, open_sse: OpenSSE, open_ws: OpenWS
) -> None:
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, talker(100, pace=100))
        b = await start_node(nursery, redis_url)
        run_id = await start_run(a.url)
        got: dict[str, list[int]] = {}

        async def sse() -> None:
            async with open_sse(b.url, f"/runs/{run_id}/events") as stream:
                got["sse"] = ids(await stream.events())

        async def ws() -> None:
            async with open_ws(f"{b.ws_url}/runs/{run_id}/ws") as socket:
                frames = await until_terminal(socket, run_id)
                got["ws"] = [f["id"] for f in frames if "id" in f]

        async with trio.open_nursery() as inner:
            inner.start_soon(sse)
            inner.start_soon(ws)
        assert got["sse"] == list(range(1, len(got["sse"]) + 1))
        assert got["ws"] == got["sse"]
        tail = b.hub.tail
        assert tail is not None and tail.statistics().events >= 1


async def test_a_cancel_on_node_b_stops_the_run_executing_on_node_a(
    redis_url: str, nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, talker(5000, pace=100))
        b = await start_node(nursery, redis_url)
        run_id = await start_run(a.url)
        async with open_sse(b.url, f"/runs/{run_id}/events") as stream:
            first = await stream.next()
            assert first is not None
            async with http_client(b) as http:
                answer = await http.post(f"/runs/{run_id}/cancel")
                assert answer.status_code == 202, answer.text
            frames = await stream.events()
        assert frames[-1].event == "flow.cancelled"
        assert frames[-1].json()["data"]["reason"] == "cancelled by client"
        local = a.hub.executor.get_run(run_id)
        assert (await local.wait()).status == "cancelled"


async def test_after_a_restart_of_node_a_its_run_is_still_served_and_resumed(
    redis_url: str, nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url)
        run_id = await start_run(a.url)
        async with open_sse(a.url, f"/runs/{run_id}/events") as stream:
            frames = await stream.events()
        port = int(a.url.rsplit(":", 1)[1])
        a.stop.set()
        await a.stopped.wait()
        again = await start_node(nursery, redis_url, port=port)
        async with http_client(again) as http:
            view = (await http.get(f"/runs/{run_id}")).json()
        assert (view["status"], view["last_seq"]) == ("completed", len(frames))
        headers = {"Last-Event-ID": "3"}
        async with open_sse(again.url, f"/runs/{run_id}/events", headers=headers) as stream:
            resumed = await stream.events()
        assert [f.data for f in resumed] == [f.data for f in frames[3:]]


async def test_a_hundred_sse_clients_on_node_b_share_one_tail_read_and_one_blocking_connection(
    redis_url: str, redis_server: RedisServer, nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    with trio.fail_after(60):
        a = await start_node(nursery, redis_url, talker(400, pace=100))
        b = await start_node(nursery, redis_url)
        run_id = await start_run(a.url)
        results: list[list[int]] = []

        async def client() -> None:
            async with open_sse(b.url, f"/runs/{run_id}/events") as stream:
                results.append(ids(await stream.events()))

        async with trio.open_nursery() as inner:
            for _ in range(100):
                inner.start_soon(client)
            await b.hub.wait_joined(run_id, 100)
            assert int(redis_server.info("clients")["blocked_clients"]) <= 1  # the tail's read
        assert len(results) == 100 and all(r == results[0] for r in results)
        assert results[0] == list(range(1, len(results[0]) + 1))
        tail = b.hub.tail
        assert tail is not None
        stats = tail.statistics()
        # a read per batch the writer made (at most one per event), not per client
        assert stats.reads <= len(results[0])
        assert stats.reads + stats.reissues < len(results[0]) + 100


async def test_a_redis_restart_mid_stream_reaches_the_sse_client_on_b_once(
    redis_aof_server: RedisServer, nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    url = redis_aof_server.url
    with trio.fail_after(40):
        a = await start_node(nursery, url, talker(300, pace=100))
        b = await start_node(nursery, url)
        run_id = await start_run(a.url)
        seen: list[int] = []
        async with open_sse(b.url, f"/runs/{run_id}/events") as stream:
            while (frame := await stream.next()) is not None:
                if frame.id is None:
                    continue
                seen.append(int(frame.id))
                if seen[-1] == 20:
                    redis_aof_server.kill()
                    await trio.sleep(0.3)
                    redis_aof_server.start()
        assert seen == list(range(1, len(seen) + 1))
        assert frame is None
        local = a.hub.executor.get_run(run_id)
        assert (await local.wait()).status == "completed"
        assert seen[-1] == local.last_seq


async def test_a_ws_resume_on_b_finds_a_run_b_never_looked_up(
    redis_url: str, nursery: trio.Nursery, open_ws: OpenWS
) -> None:
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url)
        b = await start_node(nursery, redis_url)
        run_id = await start_run(a.url)
        await a.hub.executor.get_run(run_id).wait()
        async with open_ws(f"{b.ws_url}/ws") as socket:
            await send(socket, {"action": "resume", "run_id": run_id, "after": 3})
            frames = [f for f in await until_terminal(socket, run_id) if "id" in f]
            assert [f["id"] for f in frames] == list(range(4, len(frames) + 4))
            assert frames[-1]["type"] == "flow.completed"
            await send(socket, {"action": "cancel", "run_id": "run_nope"})
            error = await receive(socket)
            assert error["type"] == "error" and error["code"] == "run_not_found"


async def test_an_enqueuing_node_queues_http_and_ws_runs_for_a_worker_with_their_options(
    redis_url: str, nursery: trio.Nursery, open_ws: OpenWS
) -> None:
    from trioflow.demo import default_agent_factory

    with trio.fail_after(30):
        node = await start_node(
            nursery, redis_url, default_agent_factory(), enqueue=True, allowed_models=("scripted",)
        )
        assert node.hub.enqueue
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            async with open_worker(store, allowed_models=(), reap_interval=None, name="solo"):
                created = await post_run(node.url, metadata={"k": 1}, system="Terse.")
                run_id = created.json()["run_id"]
                assert isinstance(node.hub.get(run_id), RemoteRun)
                async with open_ws(f"{node.ws_url}/ws") as socket:
                    await send(socket, {"action": "resume", "run_id": run_id, "after": 0})
                    frames = [f for f in await until_terminal(socket, run_id) if "id" in f]
                    started = frames[0]["data"]
                    assert started["metadata"] == {
                        "k": 1, "source": "http", "worker": "solo", "attempt": 1
                    }  # fmt: skip
                    assert frames[-1]["type"] == "flow.completed"
                    # The node allows the model, this worker does not: the run ends failed.
                    await send(socket, {"action": "start", "task": "2+2?", "model": "scripted"})
                    frames = await until_terminal(socket)
                    assert frames[0]["type"] == "accepted"
                    assert frames[-1]["type"] == "flow.failed"
                    assert "does not run model 'scripted'" in str(frames[-1]["data"]["error"])
                    assert (await store.get(frames[0]["run_id"])).request["source"] == "ws"


# -- real processes ----------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn_node(
    redis_url: str, port: int, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """``python -m trioflow serve --redis URL --port PORT``, its stderr to ``log``."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "trioflow", "serve", "--redis", redis_url, "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


async def test_two_trioflow_serve_processes_on_one_redis(
    redis_url: str, open_sse: OpenSSE, tmp_path: Path
) -> None:
    root = str(Path(trioflow.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    ports = [_free_port(), _free_port()]
    procs = [_spawn_node(redis_url, port, env, tmp_path / f"node{port}.log") for port in ports]
    a, b = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        with trio.fail_after(40):
            for url in (a, b):
                async with http_client(url) as http:
                    while True:
                        try:
                            if (await http.get("/healthz")).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass  # not listening yet
                        await trio.sleep(0.05)
            run_id = await start_run(a)
            async with open_sse(b, f"/runs/{run_id}/events") as stream:
                frames = await stream.events()
            assert ids(frames) == list(range(1, len(frames) + 1))
            assert frames[-1].event == "flow.completed"
            async with open_sse(b, f"/runs/{run_id}/events", headers={"Last-Event-ID": "2"}) as s:
                assert ids(await s.events()) == ids(frames)[2:]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    logs = "".join((tmp_path / f"node{port}.log").read_text() for port in ports)
    assert "Traceback" not in logs, logs


def test_serve_with_an_unreachable_redis_exits_1(run_cli: Any) -> None:
    result = run_cli("serve", "--redis", "redis://127.0.0.1:1/0", "--port", "0")
    assert result.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr


async def test_a_server_on_redis_needs_an_executor_writing_there(redis_url: str) -> None:
    async with open_redis(redis_url) as client:
        with pytest.raises(ValueError, match="history_store"):
            create_app(StreamingFlowExecutor(), store=RedisRunStore(client))


def test_importing_trioflow_and_its_web_server_loads_no_redis_client() -> None:
    code = "import sys, trioflow, trioflow.web, trioflow.cli; print('coredis' in sys.modules)"
    root = str(Path(trioflow.__file__).parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": root},
        timeout=60,
    )
    assert out.stdout.strip() == "False"


async def test_on_disconnect_cancel_counts_the_watchers_of_every_node(
    redis_url: str, nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, talker(5000, pace=200))
        b = await start_node(nursery, redis_url)
        run_id = await start_run(a.url, on_disconnect="cancel")
        local = a.hub.executor.get_run(run_id)
        async with open_sse(b.url, f"/runs/{run_id}/events") as on_b:
            async with open_sse(a.url, f"/runs/{run_id}/events") as on_a:
                assert await on_a.next() is not None
                await a.hub.wait_watchers(run_id, 1)
            await a.hub.wait_watchers(run_id, 0)  # A's last client left; B's watches on
            seen = 0
            while seen < 100:  # the run goes on: 0.5 s of tokens after A's client left
                frame = await on_b.next()
                assert frame is not None and frame.event != "flow.cancelled"
                seen += frame.event == "token.received"
            assert not local.done
        result = await local.wait()  # B's client left too: nobody watches it anywhere
    assert (result.status, result.reason) == ("cancelled", "client disconnected")
    assert b.hub.watch_counts is not None
    assert await b.hub.watch_counts.total(run_id) == 0


async def test_the_watchers_of_a_node_that_is_gone_stop_counting(redis_url: str) -> None:
    from trioflow.redis import WatcherCounts

    with trio.fail_after(10):
        async with open_redis(redis_url) as client, trio.open_nursery() as nursery:
            store = RedisRunStore(client)
            here, there = WatcherCounts(store, "here"), WatcherCounts(store, "there")
            await nursery.start(here.run)
            await nursery.start(there.run)
            here.set("run_x", 2)
            there.set("run_x", 1)
            await here.total("run_x")  # each writes its own count first
            assert await there.total("run_x") == 3
            assert await here.total("run_x") == 3
            # A node that crashed: a count of its own in the hash, its alive key gone.
            await client.hset(store.keys.watchers("run_x"), {"crashed": "5"})
            assert await here.total("run_x") == 3
            assert await client.hget(store.keys.watchers("run_x"), "crashed") is None
            there.set("run_x", 0)
            assert await there.total("run_x") == 2  # its own 0 written first
            nursery.cancel_scope.cancel()  # both stop: their alive keys go
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            assert await WatcherCounts(store, "third").total("run_x") == 0
    with pytest.raises(ValueError, match="alive_ttl"):
        WatcherCounts(store, "n", alive_ttl=0)
