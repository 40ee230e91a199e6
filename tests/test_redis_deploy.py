"""A deployment on Redis with real processes on 127.0.0.1 (#14): one redis-server, two
``python -m trioflow serve --redis URL --workers 0`` nodes, two ``python -m trioflow worker``
processes. A run queued on node A streams gapless from node B (``Last-Event-ID`` resume
included) and survives a restart of every node; a cancel on B reaches the worker running it;
``kill -9`` of that worker brings ``flow.failed`` (``worker_lost``) to B's client within 10 s;
``serve --workers 1`` runs a queued run end to end in one process."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import CliProcess, cli_process, http_client, post_run

pytest.importorskip("coredis")

from trioflow.redis import WORKER_LOST

if TYPE_CHECKING:
    from conftest import OpenSSE, SSEFrame

WORKER_TIMES = ("--lease", "2", "--heartbeat", "0.5")
"""Workers presumed lost 2 s after their last heartbeat (the reapers run every second)."""


def node(redis_url: str, pace: float) -> Any:
    """``trioflow serve --redis URL --workers 0`` on an ephemeral port, ready once it serves."""
    return cli_process(
        "serve", "--redis", redis_url, "--workers", "0", "--port", "0",
        "--model", "scripted", "--pace", str(pace), "--allow-model", "scripted",
        "--shutdown-timeout", "3",
        ready="serving on ",
    )  # fmt: skip


def worker(redis_url: str, name: str, pace: float) -> Any:
    """``trioflow worker --redis URL`` named ``name``, ready once it said so."""
    return cli_process(
        "worker", "--redis", redis_url, "--name", name, "--model", "scripted",
        "--pace", str(pace), "--allow-model", "scripted", *WORKER_TIMES,
        ready=" ready on ",
    )  # fmt: skip


@asynccontextmanager
async def deployment(
    redis_url: str, *, pace: float, workers: int = 2
) -> AsyncIterator[tuple[list[CliProcess], list[CliProcess]]]:
    """Two nodes and ``workers`` workers (``w1``, ``w2``, ...) on ``redis_url``, all ready."""
    async with AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(node(redis_url, pace)) for _ in range(2)]
        names = [f"w{i + 1}" for i in range(workers)]
        procs = [await stack.enter_async_context(worker(redis_url, n, pace)) for n in names]
        yield nodes, procs


async def stop(process: CliProcess) -> None:
    """SIGTERM, then its exit status must be 0 (a graceful shutdown or drain)."""
    process.process.send_signal(signal.SIGTERM)
    assert await process.process.wait() == 0, process.err.decode()
    assert b"Traceback" not in process.err, process.err.decode()


def ids(frames: list[SSEFrame]) -> list[int]:
    return [int(frame.id or 0) for frame in frames]


async def first_event(open_sse: OpenSSE, url: str, run_id: str) -> Any:
    """The run's ``flow.started`` data, read from ``url``'s event stream."""
    async with open_sse(url, f"/runs/{run_id}/events") as stream:
        while (frame := await stream.next()) is not None:
            if frame.event == "flow.started":
                return frame.json()["data"]
    raise AssertionError("the stream ended before flow.started")


async def test_a_run_queued_on_node_a_streams_gapless_from_node_b_and_survives_a_restart_of_every_node(
    redis_url: str, open_sse: OpenSSE
) -> None:
    with trio.fail_after(40):
        async with deployment(redis_url, pace=40) as ((a, b), _):
            created = await post_run(
                a.url(),
                metadata={"ticket": 7},
                model="scripted",
                system="Be brief.",
                max_tokens=64,
            )
            assert created.json()["status"] in (
                "pending",
                "running",
            )  # queued: a worker executes it
            run_id = created.json()["run_id"]
            async with open_sse(b.url(), f"/runs/{run_id}/events") as stream:
                frames = await stream.events()
            assert ids(frames) == list(range(1, len(frames) + 1))
            assert frames[-1].event == "flow.completed"
            started = frames[0].json()["data"]
            assert started["model"] == "scripted"
            metadata = started["metadata"]
            assert metadata["ticket"] == 7 and metadata["source"] == "http"
            assert metadata["worker"] in ("w1", "w2") and metadata["attempt"] == 1
            async with open_sse(
                b.url(), f"/runs/{run_id}/events", headers={"Last-Event-ID": "2"}
            ) as s:
                assert ids(await s.events()) == ids(frames)[2:]
            await stop(a)
            await stop(b)
            # Every node restarted: the run is still served, and resumed, by the new ones.
            async with node(redis_url, 40) as a2, node(redis_url, 40) as b2:
                async with http_client(a2.url()) as http:
                    got = await http.get(f"/runs/{run_id}")
                assert got.status_code == 200, got.text
                assert got.json()["status"] == "completed"
                assert got.json()["last_seq"] == len(frames)
                headers = {"Last-Event-ID": "3"}
                async with open_sse(b2.url(), f"/runs/{run_id}/events", headers=headers) as s:
                    assert ids(await s.events()) == ids(frames)[3:]
                await stop(a2)
                await stop(b2)


async def test_a_cancel_on_b_reaches_a_worker_and_kill_9_of_a_worker_ends_its_run_within_10_s(
    redis_url: str, open_sse: OpenSSE
) -> None:
    with trio.fail_after(50):
        async with deployment(redis_url, pace=1) as ((a, b), workers):
            # Cancel on B of a run executing under a worker: flow.cancelled on A's stream.
            run_id = (await post_run(a.url())).json()["run_id"]
            async with open_sse(a.url(), f"/runs/{run_id}/events") as stream:
                first = await stream.next()
                while first is not None and first.event != "flow.started":
                    first = await stream.next()
                async with http_client(b.url()) as http:
                    cancelled = await http.post(f"/runs/{run_id}/cancel")
                assert cancelled.status_code == 202, cancelled.text
                with trio.fail_after(5):
                    frames = await stream.events()
            assert frames[-1].event == "flow.cancelled"
            assert ids(frames) == list(range(2, len(frames) + 2))

            # kill -9 of the worker running a run: its terminal event reaches B's client in 10 s.
            run_id = (await post_run(a.url())).json()["run_id"]
            async with open_sse(b.url(), f"/runs/{run_id}/events") as stream:
                seen: list[SSEFrame] = []
                while (frame := await stream.next()) is not None and frame.event != "add_message":
                    if frame.data is not None:
                        seen.append(frame)
                assert seen and seen[0].event == "flow.started"
                name = seen[0].json()["data"]["metadata"]["worker"]
                victim = workers[["w1", "w2"].index(name)]
                victim.process.kill()
                killed = trio.current_time()
                with trio.fail_after(10):
                    rest = await stream.events()
                assert trio.current_time() - killed < 10.0
            assert rest[-1].event == "flow.failed"
            assert rest[-1].json()["data"]["reason"] == WORKER_LOST
            assert ids(rest) == list(range(ids(seen)[-1] + 2, ids(seen)[-1] + 2 + len(rest)))


async def test_serve_with_one_in_process_worker_runs_a_queued_run_end_to_end(
    redis_url: str, open_sse: OpenSSE
) -> None:
    import os
    import secrets

    notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    name = f"trioflow-test-{os.getpid()}-{secrets.token_hex(4)}"
    await notify.bind("\0" + name)  # systemd's NOTIFY_SOCKET, in the abstract namespace
    env = {"NOTIFY_SOCKET": "@" + name}
    with notify, trio.fail_after(30):
        command = ("serve", "--redis", redis_url, "--workers", "1", "--port", "0")
        async with cli_process(
            *command, "--model", "scripted", ready="serving on ", env=env
        ) as one:
            assert await notify.recv(64) == b"READY=1"
            assert b"worker " in one.err and b"ready (concurrency 1)" in one.err
            run_id = (await post_run(one.url(), on_disconnect="continue")).json()["run_id"]
            async with open_sse(one.url(), f"/runs/{run_id}/events") as stream:
                frames = await stream.events()
            assert ids(frames) == list(range(1, len(frames) + 1))
            assert frames[-1].event == "flow.completed"
            assert frames[0].json()["data"]["metadata"]["source"] == "http"
            async with http_client(one.url()) as http:
                listed = (await http.get("/runs")).json()["runs"]
            assert run_id in [run["run_id"] for run in listed]
            await stop(one)
            assert await notify.recv(64) == b"STOPPING=1"
        assert b"draining the workers" in one.err and b"stopped" in one.err


def test_workers_without_redis_is_a_usage_error(run_cli: Any) -> None:
    result = run_cli("serve", "--workers", "1", "--port", "0")
    assert result.returncode == 2
    assert "--workers needs --redis" in result.stderr
