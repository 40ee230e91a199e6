"""Threads (conversations) in Redis, against a real redis-server: RedisThreads' atomic begin
and fenced end, and over HTTP on two ``serve()`` nodes sharing one Redis with a worker
executing the runs: a conversation posted alternately to both, busy/full/unknown across
nodes, a fenced run leaving the thread untouched, and messages surviving a node restart."""

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
from conftest import WebServer, http_client, send, until_terminal

import trioflow
from trioflow import Agent, ScriptedModel, Turn
from trioflow.models import Message
from trioflow.threads import ThreadBusy, ThreadFull, ThreadLimitReached, ThreadNotFound

pytest.importorskip("coredis")

from test_redis_serve import start_node as serve_node

from trioflow.redis import (
    RedisRunStore,
    RedisThreads,
    new_run_id,
    open_redis,
    open_worker,
    reap,
)
from trioflow.redis._reaper import end_run

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import OpenWS


def said(messages: Any) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in messages]


def texts(thread_view: dict[str, Any]) -> list[tuple[str, str]]:
    """``(role, text)`` of each message of a ``GET /threads/{id}`` body."""
    return [
        (m["role"], "".join(b.get("text", "") for b in m["content"]))
        for m in thread_view["messages"]
    ]


async def start_node(
    nursery: trio.Nursery,
    redis_url: str,
    agent: Callable[[Any], Agent],
    *,
    enqueue: bool = True,
    **config: Any,
) -> WebServer:
    """A serve node on ``redis_url`` (queueing its runs for workers unless ``enqueue=False``)."""
    return await serve_node(nursery, redis_url, agent, enqueue=enqueue, **config)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def new_thread(node: WebServer, **body: Any) -> str:
    async with http_client(node) as http:
        created = await http.post("/threads", json=body)
    assert created.status_code == 201, created.text
    return str(created.json()["thread_id"])


async def post_message(node: WebServer, thread_id: str, message: str) -> Any:
    async with http_client(node) as http:
        return await http.post(f"/threads/{thread_id}/runs", json={"message": message})


async def finished(node: WebServer, run_id: str) -> dict[str, Any]:
    """``GET /runs/{id}`` on ``node`` once the run has ended (polled)."""
    async with http_client(node) as http:
        while True:
            view: dict[str, Any] = (await http.get(f"/runs/{run_id}")).json()
            if view.get("status") in ("completed", "failed", "cancelled"):
                return view
            await trio.sleep(0.02)


async def thread_view(node: WebServer, thread_id: str) -> dict[str, Any]:
    async with http_client(node) as http:
        response = await http.get(f"/threads/{thread_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


# -- the store ---------------------------------------------------------------------------------


async def test_begin_is_atomic_end_is_fenced_and_limits_hold(redis_url: str) -> None:
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            threads = RedisThreads(store, max_threads=2, max_messages=3)
            thread = await threads.create_thread({"user": "ann"})
            assert (await threads.get_thread(thread.thread_id)).metadata == {"user": "ann"}
            with pytest.raises(ThreadNotFound):
                await threads.get_thread("thread_nope")
            with pytest.raises(ThreadNotFound):
                await threads.begin("thread_nope", "run_x")

            run = (await store.create(new_run_id())).run_id
            assert await threads.begin(thread.thread_id, run) == ()
            assert await threads.begin(thread.thread_id, run) == ()  # the same run again: fine
            other = (await store.create(new_run_id())).run_id
            with pytest.raises(ThreadBusy) as busy:
                await threads.begin(thread.thread_id, other)
            assert busy.value.run_id == run
            epoch = await store.claim(run)
            turn = (Message.user("hi"), Message("assistant", ()))
            # a zombie (an older epoch) adds nothing and leaves the run holding the thread
            assert not await threads.end(thread.thread_id, run, turn, epoch=epoch - 1)
            assert await threads.end(thread.thread_id, run, turn, epoch=epoch)  # the holder
            await end_run(store, run, epoch=epoch, type="flow.completed", data={})
            view = await threads.get_thread(thread.thread_id)
            assert said(view.messages) == [("user", "hi"), ("assistant", "")]
            assert view.runs == (run,) and view.running is None

            # a limit of 3: with 2 held, a run may start; with 4, none
            third = (await store.create(new_run_id())).run_id
            assert len(await threads.begin(thread.thread_id, third)) == 2
            assert await threads.end(thread.thread_id, third, [*turn, *turn], epoch=None)
            with pytest.raises(ThreadFull) as full:
                await threads.begin(thread.thread_id, other)
            assert full.value.limit == 3

            # a running run whose record is terminal (reaped) no longer blocks its thread
            second = await threads.create_thread()
            lost = (await store.create(new_run_id())).run_id
            await threads.begin(second.thread_id, lost)
            lost_epoch = await store.claim(lost)
            with pytest.raises(ThreadBusy):
                await threads.begin(second.thread_id, other)
            await end_run(store, lost, epoch=lost_epoch, type="flow.failed", data={})
            assert (await threads.get_thread(second.thread_id)).running is None
            # its worker, ending it after the reaper did, adds nothing
            assert await threads.end(second.thread_id, lost, turn, epoch=lost_epoch)
            assert (await threads.get_thread(second.thread_id)).messages == ()
            assert await threads.begin(second.thread_id, other) == ()


async def test_the_oldest_idle_thread_makes_room_else_the_limit_is_reached(
    redis_url: str,
) -> None:
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            threads = RedisThreads(store, max_threads=2)
            first = await threads.create_thread()
            second = await threads.create_thread()
            await threads.begin(second.thread_id, (await store.create()).run_id)
            third = await threads.create_thread()  # the first, idle, is forgotten
            listed = [t.thread_id for t in await threads.list_threads()]
            assert listed == [second.thread_id, third.thread_id]
            with pytest.raises(ThreadNotFound):
                await threads.get_thread(first.thread_id)
            await threads.begin(third.thread_id, (await store.create()).run_id)
            with pytest.raises(ThreadLimitReached):
                await threads.create_thread()


# -- over HTTP, two nodes and a worker ----------------------------------------------------------


def node_agent(request: Any) -> Agent:
    """The nodes' own agent: never used for a queued run (the worker builds its own)."""
    return Agent(ScriptedModel([Turn("from the node")]))


async def test_a_conversation_posted_alternately_to_two_nodes_runs_on_a_worker(
    redis_url: str, nursery: trio.Nursery, open_ws: OpenWS
) -> None:
    model = ScriptedModel(
        [Turn("hello ann"), Turn("you are ann"), Turn("bye ann"), Turn("still ann")]
    )
    agent = Agent(model)
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, node_agent)
        b = await start_node(nursery, redis_url, node_agent)
        async with (
            open_redis(redis_url) as client,
            open_worker(
                RedisRunStore(client), agent_factory=lambda r: agent, reap_interval=None, name="w1"
            ),
        ):
            thread_id = await new_thread(a, metadata={"user": "ann"})
            runs = []
            for node, other, message in ((a, b, "I am ann"), (b, a, "who am I?"), (a, b, "bye")):
                response = await post_message(node, thread_id, message)
                assert response.status_code == 201, response.text
                assert response.json()["thread_id"] == thread_id
                run_id = response.json()["run_id"]
                view = await finished(other, run_id)  # the terminal event: the thread is free
                assert view["status"] == "completed"
                assert view["metadata"]["thread_id"] == thread_id
                assert view["metadata"]["owner"] == "w1"
                runs.append(run_id)
            async with open_ws(f"{b.ws_url}/ws") as socket:  # and a fourth over /ws
                await send(socket, {"action": "message", "thread_id": thread_id, "message": "?"})
                frames = await until_terminal(socket)
            assert frames[0]["type"] == "accepted" and frames[0]["thread_id"] == thread_id
            assert frames[-1]["type"] == "flow.completed"
            runs.append(frames[0]["run_id"])
    assert said(model.calls[3])[-2:] == [("assistant", "bye ann"), ("user", "?")]
    assert said(model.calls[2]) == [
        ("user", "I am ann"),
        ("assistant", "hello ann"),
        ("user", "who am I?"),
        ("assistant", "you are ann"),
        ("user", "bye"),
    ]
    with trio.fail_after(10):
        view = await thread_view(b, thread_id)
        assert texts(view)[-3:] == [
            ("assistant", "bye ann"),
            ("user", "?"),
            ("assistant", "still ann"),
        ]
        assert len(view["messages"]) == 8
        assert view["runs"] == runs and view["running"] is None
        assert view["metadata"] == {"user": "ann"}
        async with http_client(a) as http:
            listed = (await http.get("/threads")).json()["threads"]
        assert [(t["thread_id"], t["messages"], t["runs"]) for t in listed] == [(thread_id, 8, 4)]


async def test_busy_full_and_unknown_threads_across_nodes(
    redis_url: str, nursery: trio.Nursery
) -> None:
    slow = Agent(ScriptedModel([Turn(" ".join(["w"] * 400))] * 2, pace=200))
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, node_agent, max_thread_messages=2)
        b = await start_node(nursery, redis_url, node_agent, max_thread_messages=2)
        async with (
            open_redis(redis_url) as client,
            open_worker(RedisRunStore(client), agent_factory=lambda r: slow, reap_interval=None),
        ):
            thread_id = await new_thread(a)
            first = await post_message(a, thread_id, "talk")
            assert first.status_code == 201
            busy = await post_message(b, thread_id, "and more")
            assert busy.status_code == 409
            assert busy.json()["error"]["code"] == "thread_busy"
            assert busy.json()["error"]["run_id"] == first.json()["run_id"]
            assert (await thread_view(b, thread_id))["running"] == first.json()["run_id"]
            await finished(b, first.json()["run_id"])
            full = await post_message(b, thread_id, "once more")  # 2 messages: the limit
            assert full.status_code == 409
            assert full.json()["error"]["code"] == "thread_full"
            assert full.json()["error"]["limit"] == 2
            for node in (a, b):
                async with http_client(node) as http:
                    missing = await http.get("/threads/thread_nope")
                    assert missing.status_code == 404
                    assert missing.json()["error"]["code"] == "thread_not_found"
                    posted = await http.post("/threads/thread_nope/runs", json={"message": "hi"})
                    assert posted.status_code == 404


async def test_a_fenced_run_leaves_the_thread_untouched_and_usable(
    redis_url: str, nursery: trio.Nursery
) -> None:
    model = ScriptedModel(
        [Turn("hello ann"), Turn(" ".join(["w"] * 2000)), Turn("you are ann")], pace=200
    )
    agent = Agent(model)
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, node_agent)
        b = await start_node(nursery, redis_url, node_agent)
        async with (
            open_redis(redis_url) as client,
            open_worker(
                RedisRunStore(client), agent_factory=lambda r: agent, reap_interval=None
            ) as worker,
        ):
            store = RedisRunStore(client)
            thread_id = await new_thread(a)
            first = (await post_message(a, thread_id, "I am ann")).json()["run_id"]
            await finished(b, first)
            doomed = (await post_message(b, thread_id, "talk on")).json()["run_id"]
            while (await store.get(doomed)).last_seq < 20:  # noqa: ASYNC110 - Redis, no event
                await trio.sleep(0.02)
            # its worker is presumed lost: its lease lapses, a reaper fences and ends the run
            await client.zadd(store.keys.leases, {doomed: 0})
            assert await reap(store) == {doomed: "failed"}
            view = await finished(a, doomed)
            assert view["status"] == "failed"
            while worker.statistics().fenced < 1:  # noqa: ASYNC110 - at its next heartbeat
                await trio.sleep(0.05)
            thread = await thread_view(a, thread_id)
            assert texts(thread) == [("user", "I am ann"), ("assistant", "hello ann")]
            assert thread["running"] is None and thread["runs"] == [first, doomed]
            last = await post_message(a, thread_id, "who am I?")  # the thread is usable
            assert last.status_code == 201, last.text
            assert (await finished(b, last.json()["run_id"]))["status"] == "completed"
    assert said(model.calls[-1]) == [
        ("user", "I am ann"),
        ("assistant", "hello ann"),
        ("user", "who am I?"),
    ]
    with trio.fail_after(10):
        assert len((await thread_view(b, thread_id))["messages"]) == 4


async def test_messages_survive_a_node_restart_and_runs_executed_on_the_node(
    redis_url: str, nursery: trio.Nursery
) -> None:
    model = ScriptedModel([Turn("hello ann"), Turn("you are ann")])
    agent = Agent(model)
    with trio.fail_after(30):
        a = await start_node(nursery, redis_url, lambda r: agent, enqueue=False)
        thread_id = await new_thread(a)
        run_id = (await post_message(a, thread_id, "I am ann")).json()["run_id"]
        assert (await finished(a, run_id))["status"] == "completed"
        assert len((await thread_view(a, thread_id))["messages"]) == 2
        a.stop.set()
        await a.stopped.wait()
        again = await start_node(nursery, redis_url, lambda r: agent, enqueue=False)
        view = await thread_view(again, thread_id)
        assert texts(view) == [("user", "I am ann"), ("assistant", "hello ann")]
        run_id = (await post_message(again, thread_id, "who am I?")).json()["run_id"]
        assert (await finished(again, run_id))["status"] == "completed"
        assert len((await thread_view(again, thread_id))["messages"]) == 4
    assert said(model.calls[1])[:3] == [
        ("user", "I am ann"),
        ("assistant", "hello ann"),
        ("user", "who am I?"),
    ]


# -- real processes ----------------------------------------------------------------------------


def _spawn(redis_url: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m trioflow serve --redis URL --workers 1 --port PORT``, its stderr to ``log``."""
    command = [sys.executable, "-m", "trioflow", "serve", "--redis", redis_url]
    with log.open("ab") as err:
        return subprocess.Popen(
            [*command, "--workers", "1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _healthy(url: str) -> None:
    async with http_client(url) as http:
        while True:
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            await trio.sleep(0.05)


async def test_a_conversation_across_two_trioflow_serve_processes_survives_their_restart(
    redis_url: str, tmp_path: Path
) -> None:
    root = str(Path(trioflow.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    ports = [_free_port(), _free_port()]
    logs = [tmp_path / f"node{port}.log" for port in ports]
    procs = [_spawn(redis_url, port, env, log) for port, log in zip(ports, logs, strict=True)]
    a, b = (f"http://127.0.0.1:{port}" for port in ports)
    messages = ["What is 25 * 4?", "What is 2 + 3?", "What is 7 * 6?"]
    try:
        with trio.fail_after(60):
            for url in (a, b):
                await _healthy(url)
            async with http_client(a) as http:
                thread_id = (await http.post("/threads")).json()["thread_id"]
            runs = []
            for node, other, message in zip((a, b, a), (b, a, b), messages, strict=True):
                async with http_client(node) as http:
                    posted = await http.post(
                        f"/threads/{thread_id}/runs", json={"message": message}
                    )
                assert posted.status_code == 201, posted.text
                runs.append(posted.json()["run_id"])
                async with http_client(other) as http:
                    while (await http.get(f"/runs/{runs[-1]}")).json()["status"] != "completed":  # noqa: ASYNC110
                        await trio.sleep(0.05)
            for proc in procs:  # every node restarts
                _stop(proc)
            procs = [
                _spawn(redis_url, port, env, log) for port, log in zip(ports, logs, strict=True)
            ]
            for url in (a, b):
                await _healthy(url)
            async with http_client(b) as http:
                view = (await http.get(f"/threads/{thread_id}")).json()
    finally:
        for proc in procs:
            _stop(proc)
    assert view["runs"] == runs and view["running"] is None
    users = [
        m for m in view["messages"] if m["role"] == "user" and m["content"][0]["type"] == "text"
    ]
    assert [m["content"][0]["text"] for m in users] == messages
    assert view["messages"][-1]["role"] == "assistant"
    text = "".join(log.read_text() for log in logs)
    assert "Traceback" not in text, text


async def test_the_retention_made_with_a_thread_holds_for_every_process(redis_url: str) -> None:
    """A worker's store has no retention of its own: the thread's (fixed when it was made)
    applies; no TTL while a run goes (a long run does not lose its thread), back at its end."""
    with trio.fail_after(10):
        async with open_redis(redis_url) as client:
            store = RedisRunStore(client)
            node = RedisThreads(store, retention=60)
            worker = RedisThreads(store)  # as a worker makes it
            thread = await node.create_thread()
            key = store.keys.thread(thread.thread_id)
            assert 0 < await client.ttl(key) <= 60
            run = (await store.create(new_run_id())).run_id
            await worker.begin(thread.thread_id, run)
            assert await client.ttl(key) == -1  # a run goes: no TTL
            epoch = await store.claim(run)
            assert await worker.end(thread.thread_id, run, None, epoch=epoch)
            assert 0 < await client.ttl(key) <= 60
