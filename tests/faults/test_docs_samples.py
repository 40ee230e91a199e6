"""The sample outputs in the docs are what the code emits.

Each sample is compared with a real run (the offline scripted model at pace
0, through the real server, SSE encoder and WebSocket endpoint, or the
example program as a reader runs it). What legitimately varies is
normalised: the random part of run ids, the server's address, durations.
In a docs line, ``...`` stands for any text, and a line of only ``...`` for
any number of frames or lines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import post_run

if TYPE_CHECKING:
    from conftest import OpenSSE, OpenWS, WebServer

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DOCS_URL = "http://127.0.0.1:8080"
RUN_ID = re.compile(r"run_(\d{4})_[0-9a-f]{8}")
DURATION = re.compile(r"\b\d+ ms\b|\b\d+\.\d s\b")


def code_blocks(name: str) -> list[list[str]]:
    """The code blocks of a docs page, each as its dedented lines (no trailing blanks)."""
    lines = (DOCS / name).read_text(encoding="utf-8").splitlines()
    blocks: list[list[str]] = []
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith(".. code-block::"):
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith(":")):
                i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            indent = min(len(x) - len(x.lstrip()) for x in block if x.strip())
            blocks.append([x[indent:] for x in block])
        else:
            i += 1
    return blocks


def block_with(name: str, text: str) -> list[str]:
    (block,) = [b for b in code_blocks(name) if any(text in line for line in b)]
    return block


def normalise(text: str, server_url: str = DOCS_URL) -> str:
    return RUN_ID.sub(r"run_\1_x", text.replace(server_url, DOCS_URL))


def pattern(docs_line: str) -> re.Pattern[str]:
    """A docs line as a pattern: ``...`` is any text."""
    parts = normalise(docs_line).split("...")
    return re.compile(".*".join(re.escape(p) for p in parts))


def assert_line(docs_line: str, real_line: str) -> None:
    assert pattern(docs_line).fullmatch(real_line), f"docs: {docs_line}\nreal: {real_line}"


def sse_frames(lines: list[str]) -> dict[str, list[str]]:
    """The frames of an SSE sample (or stream) by their ``id:``."""
    frames: dict[str, list[str]] = {}
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line)
        elif current:
            if current[0].startswith("id: "):
                frames[current[0][4:]] = current
            current = []
    return frames


async def real_sse(server: WebServer, open_sse: OpenSSE) -> tuple[str, list[str]]:
    response = await post_run(server)
    answer, info = response.text, response.json()
    async with open_sse(server.url, f"/runs/{info['run_id']}/events") as sse:
        await sse.events()
        raw = sse.raw
    return normalise(answer, server.url), normalise(raw, server.url).splitlines()


def assert_sse_sample(sample: list[str], real: list[str]) -> int:
    """Every frame of ``sample`` is the real frame of the same id; returns how many."""
    assert real[0] == "retry: 3000"
    if sample[0].startswith("retry: "):
        assert sample[0] == real[0]
    frames = sse_frames(real)
    checked = 0
    for seq, docs_frame in sse_frames(sample).items():
        real_frame = frames[seq]
        for docs_line, real_line in zip(docs_frame, real_frame, strict=False):
            assert_line(docs_line, real_line)
        assert len(docs_frame) == len(real_frame) or docs_frame[-1] == "..."
        checked += 1
    return checked


async def test_sse_tutorial_sample_is_a_real_stream(
    web_server: WebServer, open_sse: OpenSSE
) -> None:
    block = block_with("tutorial/sse-streaming.rst", "curl -N")
    answer, real = await real_sse(web_server, open_sse)
    post = block.index(next(x for x in block if x.startswith("$ curl -s -X POST")))
    assert_line(block[post + 2], answer)
    stream = block[next(i for i, x in enumerate(block) if x.startswith("$ curl -N")) + 1 :]
    assert assert_sse_sample(stream, real) == 3


async def test_http_reference_sse_sample_is_a_real_stream(
    web_server: WebServer, open_sse: OpenSSE
) -> None:
    block = block_with("reference/http.rst", "event: token.received")
    _, real = await real_sse(web_server, open_sse)
    assert assert_sse_sample(block, real) == 1


async def test_http_reference_websocket_sample_is_real(
    web_server: WebServer, open_sse: OpenSSE, open_ws: OpenWS
) -> None:
    await post_run(web_server)  # the sample's run is the server's second one
    block = block_with("reference/http.rst", '→ {"action": "start"')
    sent = [json.loads(x[2:]) for x in block if x.startswith("→ ")]
    expected = [x[2:] for x in block if x.startswith("← ")]
    received: list[str] = []
    async with open_ws(web_server.ws_url + "/ws") as ws:
        for message in sent:
            await ws.send_message(json.dumps(message))
        while True:
            frame = str(await ws.get_message())
            received.append(normalise(frame, web_server.url))
            if json.loads(frame).get("type") == "flow.completed":
                break
    position = 0
    for docs_line in expected:  # in order, with any frames between them ("...")
        match = pattern(docs_line)
        while not match.fullmatch(received[position]):
            position += 1
            assert position < len(received), f"no frame matches {docs_line}"
        position += 1
    assert json.loads(received[-1])["id"] == 29


async def test_event_table_gives_the_real_seqs_and_types(web_server: WebServer) -> None:
    block = block_with("concepts/events.rst", "flow.started          task")
    info = (await post_run(web_server)).json()
    run = web_server.executor.get_run(info["run_id"])
    await run.wait()
    async with run.subscribe(after=0) as sub:
        types = {event.seq: event.type async for event in sub}
    rows = [re.match(r"\s*(\d+)\s+(\S+)", line) for line in block]
    table = {int(m[1]): m[2] for m in rows if m}
    assert len(table) == 18
    for seq, type in table.items():
        assert types[seq] == type, f"seq {seq}: docs say {type}, the run emits {types[seq]}"
    assert max(types) == max(table)  # the last row is the run's last event


def test_basic_streaming_sample_is_the_example_output() -> None:
    block = block_with("tutorial/basic-streaming.rst", "Task: What is 25 * 4?")
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "01_basic_streaming.py"), "--pace", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    def clean(lines: list[str]) -> list[str]:
        return [DURATION.sub("<duration>", normalise(x)) for x in lines]

    assert clean(proc.stdout.splitlines()) == clean(block)
