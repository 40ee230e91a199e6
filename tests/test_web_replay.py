"""``trioflow serve --replay FILE``: a recording served like a live run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from conftest import http_client

from trioflow import Agent, ScriptedModel, StreamingFlowExecutor, Turn, open_event_bus
from trioflow.bus import Overflow
from trioflow.recording import EventRecorder, ReplayRun, start_replay

if TYPE_CHECKING:
    from conftest import OpenSSE, StartWebServer, WebServer


async def record_run(path: Path) -> list[dict[str, Any]]:
    """Record a scripted run to ``path``; return its lines, decoded."""
    agent = Agent(ScriptedModel([Turn("alpha beta gamma")], pace=0))
    with EventRecorder(path) as recorder:
        async with open_event_bus() as bus:
            bus.add_listener(recorder, overflow=Overflow.BLOCK)
            await StreamingFlowExecutor(bus=bus).run(agent, "say three words")
    text = await trio.Path(path).read_text()
    return [json.loads(line) for line in text.splitlines()]


async def serve_replay(
    start_web_server: StartWebServer, nursery: trio.Nursery, path: Path, speed: float
) -> tuple[WebServer, ReplayRun]:
    server = await start_web_server()
    replay = await start_replay(path, nursery=nursery, speed=speed)
    server.hub.add_replay(replay)
    return server, replay


async def test_replay_events_over_sse_match_the_recording(
    tmp_path: Path, start_web_server: StartWebServer, nursery: trio.Nursery, open_sse: OpenSSE
) -> None:
    recorded = await record_run(tmp_path / "run.jsonl")
    assert recorded[0]["type"] == "flow.started"
    assert recorded[-1]["type"] == "flow.completed"
    server, replay = await serve_replay(start_web_server, nursery, tmp_path / "run.jsonl", 1.0)
    run_id = recorded[0]["run_id"]
    assert replay.run_id == run_id
    with trio.fail_after(10):
        async with open_sse(server.url, f"/runs/{run_id}/events") as stream:
            frames = await stream.events()
    assert stream.status == 200
    served = [frame.json() for frame in frames]
    assert [e["type"] for e in served] == [e["type"] for e in recorded]
    assert [e["data"] for e in served] == [e["data"] for e in recorded]
    assert {e["run_id"] for e in served} == {run_id}
    assert [int(frame.id or 0) for frame in frames] == list(range(1, len(recorded) + 1))


async def test_replay_is_a_run_of_the_server(
    tmp_path: Path, start_web_server: StartWebServer, nursery: trio.Nursery
) -> None:
    recorded = await record_run(tmp_path / "run.jsonl")
    server, replay = await serve_replay(start_web_server, nursery, tmp_path / "run.jsonl", math.inf)
    with trio.fail_after(10):
        await replay.wait()
    run_id = recorded[0]["run_id"]
    async with http_client(server) as http:
        response = await http.get(f"/runs/{run_id}")
        assert response.status_code == 200, response.text
        view = response.json()
        assert view["status"] == "completed"
        assert view["task"] == "say three words"
        assert view["output"] == "alpha beta gamma"
        assert view["metadata"]["replay"] == str(tmp_path / "run.jsonl")
        assert view["metadata"]["speed"] is None  # inf: JSON has no infinity
        assert view["events_url"].endswith(f"/runs/{run_id}/events")
        listed = (await http.get("/runs")).json()["runs"]
        assert [r["run_id"] for r in listed] == [run_id]
        finished = await http.post(f"/runs/{run_id}/cancel")
        assert finished.status_code == 409
        assert (await http.get("/runs/nope")).status_code == 404


async def test_a_replay_still_going_stops_on_shutdown(
    tmp_path: Path, start_web_server: StartWebServer, nursery: trio.Nursery
) -> None:
    lines = (await record_run(tmp_path / "run.jsonl"))[:2]
    slow = tmp_path / "slow.jsonl"
    # Two events an hour apart: the replay waits between them.
    lines[1]["timestamp"] = lines[0]["timestamp"] + 3600
    slow.write_text("".join(json.dumps(line) + "\n" for line in lines))
    server, replay = await serve_replay(start_web_server, nursery, slow, 1.0)
    assert not replay.done
    server.stop.set()
    with trio.fail_after(10):
        await server.stopped.wait()
        await replay.wait()
    assert replay.to_dict()["metadata"]["cancelled"] == "server shutdown"
