"""NDJSON: a run's events one JSON object a line, for ``curl``, ``jq`` and log pipelines.

A server starts in this process on a free port, then, over plain HTTP:

1. ``POST /runs``, then ``GET /runs/{id}/events?format=ndjson`` (the same as
   ``/events.ndjson`` or ``Accept: application/x-ndjson``): each line is one
   event, exactly as trioflow's SSE ``data:`` carries it, the response ends
   after the terminal event's line;
2. the same run resumed after its fifth event (``Last-Event-ID: 5``): the
   rest, no gap and no duplicate;
3. the shell equivalent, printed for you to paste.

Run it::

    python examples/11_ndjson.py

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second. See :doc:`/howto/ndjson` (``docs/howto/ndjson.rst``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

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


async def main(pace: float) -> None:
    async with open_model(pace=pace) as model:
        app = create_app(StreamingFlowExecutor(), agent=agent_factory(model))
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                functools.partial(serve, app, WebConfig(port=0), shutdown_trigger=stop.wait)
            )
            base = urls[0]
            print(f"server listening on {base} (model: {model.name})")
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                created = await http.post("/runs", json={"task": "What is 25 * 4?"})
                run_id = created.json()["run_id"]
                print(f"POST /runs -> {created.status_code}: run {run_id}")
                print("\n1. The run as NDJSON, line by line:")
                seqs = []
                path = f"/runs/{run_id}/events"
                async with http.stream("GET", path, params={"format": "ndjson"}) as response:
                    print(f"GET {path}?format=ndjson -> {response.headers['content-type']}")
                    async for line in response.aiter_lines():
                        if not line:
                            continue  # a keep-alive
                        event = json.loads(line)
                        seqs.append(event["id"])
                        data = event["data"]
                        detail = data.get("token") or data.get("result") or data.get("output") or ""
                        print(f"  {event['id']:>3} {event['type']:<22} {detail!r}")
                print(f"{len(seqs)} lines; the last is the terminal event")
                print("\n2. Resumed after event 5 (Last-Event-ID: 5):")
                rest = await http.get(
                    path, headers={"Accept": "application/x-ndjson", "Last-Event-ID": "5"}
                )
                resumed = [json.loads(line)["id"] for line in rest.text.splitlines() if line]
                print(
                    f"  ids {resumed[0]}..{resumed[-1]}: no gap, no duplicate: {resumed == seqs[5:]}"
                )
                print("\n3. From a shell:")
                print(f"  curl -sN '{base}{path}.ndjson' | jq -c '{{id, type}}'")
            stop.set()
    print("server stopped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pace", type=float, default=float(os.environ.get("TRIOFLOW_PACE", 20)))
    trio.run(main, parser.parse_args().pace)
