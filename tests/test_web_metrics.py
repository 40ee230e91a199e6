"""``trioflow serve --metrics``: GET /metrics in the Prometheus text format."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import trio
import trio.testing
from conftest import http_client, talker
from prometheus_client.parser import text_string_to_metric_families

from trioflow import StreamingFlowExecutor
from trioflow.web import WebConfig, create_app, serve
from trioflow.web._app import MetricsRenderer
from trioflow.web._defaults import open_metrics


@asynccontextmanager
async def metrics_server(
    *, metrics: bool, token: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A server wired as ``trioflow serve [--metrics]`` wires it, and a client for it."""
    async with AsyncExitStack() as stack:
        render: MetricsRenderer | None = None
        executor = StreamingFlowExecutor()
        if metrics:
            bus, render = await stack.enter_async_context(open_metrics())
            executor = StreamingFlowExecutor(bus=bus)
        config = WebConfig(port=0, token=token)
        app = create_app(executor, agent=talker(4), config=config, metrics=render)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:  # closes before the bus
            urls: list[str] = await nursery.start(
                functools.partial(serve, app, shutdown_trigger=stop.wait)
            )
            async with http_client(urls[0]) as http:
                yield http
            stop.set()


def samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


async def run_to_completion(http: httpx.AsyncClient) -> str:
    response = await http.post("/runs", json={"task": "count"})
    assert response.status_code == 201, response.text
    run_id = str(response.json()["run_id"])
    with trio.fail_after(10):
        await http.get(f"/runs/{run_id}/events")  # the event stream ends with the run
    status = (await http.get(f"/runs/{run_id}")).json()["status"]
    assert status == "completed"
    return run_id


async def test_metrics_count_a_completed_run_and_its_tokens() -> None:
    async with metrics_server(metrics=True) as http:
        await run_to_completion(http)
        # The telemetry listener takes the run's last events from the bus in this process:
        # once every task is blocked, it has counted them.
        await trio.testing.wait_all_tasks_blocked()
        response = await http.get("/metrics")
        assert response.status_code == 200
        found = samples(response.text)
        assert response.headers["content-type"].startswith("text/plain")
        runs = {s.labels["status"]: s.value for s in found["trioflow_runs_total"]}
        assert runs == {"completed": 1.0}
        assert sum(s.value for s in found["trioflow_tokens_total"]) > 0
        assert [s.value for s in found["trioflow_runs_active"]] == [0.0]


async def test_metrics_need_the_token_when_one_is_set() -> None:
    async with metrics_server(metrics=True, token="sekrit") as http:
        assert (await http.get("/metrics")).status_code == 401
        response = await http.get("/metrics", headers={"Authorization": "Bearer sekrit"})
        assert response.status_code == 200
        assert "trioflow_tokens_total" in response.text


async def test_no_metrics_endpoint_when_disabled() -> None:
    async with metrics_server(metrics=False) as http:
        await run_to_completion(http)
        response = await http.get("/metrics")
        assert response.status_code == 404
