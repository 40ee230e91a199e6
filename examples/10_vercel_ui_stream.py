"""The Vercel AI SDK's UI message stream: what ``useChat`` reads, served by trioflow.

Two halves of the same program:

* ``serve`` starts the web server on http://127.0.0.1:8080; point a Next.js
  app's ``useChat`` at ``/vercel/chat`` (see the how-to page
  ``docs/howto/vercel-ai-sdk.rst``). Ctrl-C shuts it down gracefully.
* Without ``serve``, a self-check: the same server starts in this process on
  a free port and ``httpx`` plays ``useChat``'s default transport: it posts
  ``{id, messages, trigger, messageId}`` to ``/vercel/chat`` and prints the
  chunks of the answer (``start``, ``text-delta``, ``tool-input-available``,
  ``tool-output-available``, ``finish``, ``[DONE]``); a second message in
  the same chat continues its thread; then the first run's stream is read
  again from ``GET /runs/{id}/events.vercel`` after a ``Last-Event-ID``, as a
  client resuming after a dropped connection would.

Run it::

    python examples/10_vercel_ui_stream.py            # the self-check
    python examples/10_vercel_ui_stream.py serve      # then point useChat at it

It works offline with the scripted model; with ``ANTHROPIC_API_KEY`` set it
talks to Claude instead. ``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the
scripted model's tokens per second; 0 streams as fast as possible.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
from typing import Any

import httpx
import trio

from trioflow import Agent, StreamingFlowExecutor
from trioflow.builtin import calculator
from trioflow.models import Model, ScriptedModel, open_model
from trioflow.web import AgentFactory, RunRequest, WebConfig, create_app, serve


def agent_factory(model: Model) -> AgentFactory:
    """One agent per run; the scripted model keeps per-run state, so each run gets its own."""

    def make(request: RunRequest) -> Agent:
        run_model = ScriptedModel(pace=model.pace) if isinstance(model, ScriptedModel) else model
        return Agent(run_model, tools=[calculator])

    return make


def user_message(number: int, text: str) -> dict[str, Any]:
    """A UI message as ``useChat`` sends it."""
    return {"id": f"msg-{number}", "role": "user", "parts": [{"type": "text", "text": text}]}


class Printer:
    """Prints a UI message stream's chunks, one a line; text deltas run on in one line."""

    QUIET = frozenset({"start-step", "finish-step", "text-start", "text-end", "tool-input-start"})
    """The structure (steps, parts), not shown."""

    def __init__(self) -> None:
        self.in_text = False
        self.last_id: str | None = None

    def line(self, text: str) -> None:
        if self.in_text:
            print()
            self.in_text = False
        print(text)

    def show(self, chunk: Any) -> None:
        if chunk == "[DONE]":
            self.line(f"[DONE] (the last id: {self.last_id})")
            return
        kind = chunk["type"]
        if kind == "text-delta":
            print(chunk["delta"], end="", flush=True)
            self.in_text = True
        elif kind == "start":
            self.line(f"start: message {chunk['messageId']}")
        elif kind == "tool-input-delta":
            self.line(f"{kind}: {chunk['inputTextDelta']}")
        elif kind == "tool-input-available":
            self.line(f"{kind}: {chunk['toolName']} {json.dumps(chunk['input'])}")
        elif kind == "tool-output-available":
            self.line(f"{kind}: {json.dumps(chunk['output'])}")
        elif kind == "data-progress-update":
            self.line(f"{kind}: {chunk['data']['percent']:.0f}%")
        elif kind == "finish":
            self.line(f"finish: {chunk['finishReason']}")
        elif kind not in self.QUIET:
            self.line(kind)


async def read_stream(response: httpx.Response) -> str | None:
    """Print the chunks of a UI message stream; return the last ``id:`` seen."""
    printer = Printer()
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            printer.last_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
            printer.show(data if data == "[DONE]" else json.loads(data))
    return printer.last_id


async def self_check(model: Model) -> None:
    """Start a server on a free port, chat with it as ``useChat`` does, stop it."""
    app = create_app(StreamingFlowExecutor(), agent=agent_factory(model))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            functools.partial(serve, app, WebConfig(port=0), shutdown_trigger=stop.wait)
        )
        base = urls[0]
        print(f"server listening on {base} (model: {model.name})")
        messages = [user_message(1, "What is 25 * 4?")]
        body = {"id": "chat-1", "messages": messages, "trigger": "submit-message"}
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            async with http.stream("POST", "/vercel/chat", json=body) as response:
                print(
                    f"POST /vercel/chat -> {response.status_code}, "
                    f"x-vercel-ai-ui-message-stream: {response.headers['x-vercel-ai-ui-message-stream']}"
                )
                run_id = response.headers["x-trioflow-run-id"]
                await read_stream(response)

            # The next message of the same chat: a run on the same thread.
            messages.append(user_message(2, "What is 7 times 6?"))
            body = {"id": "chat-1", "messages": messages, "trigger": "submit-message"}
            async with http.stream("POST", "/vercel/chat", json=body) as response:
                print(f"second message -> {response.status_code}")
                await read_stream(response)
            thread = (await http.get("/threads")).json()["threads"][0]
            print(f"chat-1 is thread {thread['thread_id']}: {thread['messages']} messages")

            # A client whose connection dropped after event 5 resumes after it.
            print(f"resume run {run_id} after Last-Event-ID: 5")
            async with http.stream(
                "GET", f"/runs/{run_id}/events.vercel", headers={"Last-Event-ID": "5"}
            ) as response:
                await read_stream(response)
        stop.set()  # graceful shutdown: serve() returns once streams have closed
    print("server stopped")


async def serve_until_interrupted(model: Model, port: int) -> None:
    """``serve``: the server, until Ctrl-C (or SIGTERM)."""
    app = create_app(StreamingFlowExecutor(), agent=agent_factory(model))
    stop = trio.Event()

    async def watch_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals)
        urls = await nursery.start(
            functools.partial(serve, app, WebConfig(port=port), shutdown_trigger=stop.wait)
        )
        print(f"serving on {urls[0]}: useChat's api is {urls[0]}/vercel/chat; Ctrl-C to stop")
        await stop.wait()
    print("stopped")


async def main(args: argparse.Namespace) -> None:
    async with open_model(pace=args.pace) as model:
        if args.command == "serve":
            await serve_until_interrupted(model, args.port)
        else:
            await self_check(model)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["serve"], help="serve until Ctrl-C")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (0: as fast as possible)",
    )
    trio.run(main, parser.parse_args())
