"""Tutorial 7: the pieces together, wired by a ServiceManager.

A :class:`trioflow.services.ServiceManager` creates trioflow's services
lazily, resolves their dependencies and tears them down in reverse order:

* ``settings``: a :class:`trioflow.settings.Settings` (here built with
  keywords; :meth:`Settings.from_env` reads the ``TRIOFLOW_*`` variables);
* ``cache``: a :class:`trioflow.cache.MemoryCache` sized by the settings;
* ``telemetry``: OpenTelemetry metrics of every run, read as Prometheus text
  (``settings.metrics``), listening on the shared event bus;
* ``flow_executor``: a :class:`trioflow.StreamingFlowExecutor` publishing to
  that bus.

A few tasks run through a calculator wrapped by :func:`trioflow.cache.cached`,
one of them twice, so the second time is answered from the cache. At the end
the program prints the telemetry's figures (from the Prometheus text a
``/metrics`` endpoint would serve) and the cache's statistics.

Run it::

    python examples/07_integration.py

Offline with the scripted model; Claude when ``ANTHROPIC_API_KEY`` is set.
``--pace`` (default ``$TRIOFLOW_PACE`` or 20) is the scripted model's tokens
per second. Needs the ``telemetry`` extra (``pip install -e ".[all]"``).
"""

from __future__ import annotations

import argparse
import os

import trio

from trioflow import Agent
from trioflow.builtin import calculator
from trioflow.cache import cached
from trioflow.models import open_model
from trioflow.services import ServiceManager, ServiceType
from trioflow.settings import Settings

TASKS = [
    "What is 25 * 4?",
    "What is 2 ^ 10?",
    "What is (3 + 4) * 2?",
    "What is 25 * 4?",  # the same calculation again: a cache hit
]

SHOWN_METRICS = (
    "trioflow_runs_total",
    "trioflow_iterations_total",
    "trioflow_tool_calls_total",
    "trioflow_cache_hits_total",
    "trioflow_cache_misses_total",
    "trioflow_run_duration_seconds_count",
)


def counted_runs(prometheus_text: str) -> float:
    """The sum of ``trioflow_runs_total`` over its labels."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in prometheus_text.splitlines()
        if line.startswith("trioflow_runs_total")
    )


async def main(pace: float) -> None:
    settings = Settings(cache_size=100, cache_ttl=60.0, metrics=True, telemetry=True)
    async with ServiceManager(settings=settings) as services, open_model(pace=pace) as model:
        settings = await services.get(ServiceType.SETTINGS)
        print(
            f"settings: cache_size={settings.cache_size}, cache_ttl={settings.cache_ttl:g} s, "
            f"metrics={settings.metrics}, history_size={settings.history_size}"
        )
        cache = await services.get(ServiceType.CACHE)
        telemetry = await services.get(ServiceType.TELEMETRY)
        executor = await services.get(ServiceType.FLOW_EXECUTOR)
        print(f"services created: {', '.join(services.created)}")

        calc = cached(calculator, cache, ttl=60.0, observer=telemetry)
        for number, task in enumerate(TASKS, 1):
            before = cache.statistics()
            result = await executor.run(Agent(model, tools=[calc]), task, timeout=60)
            after = cache.statistics()
            source = (
                "cache hit"
                if after.hits > before.hits
                else "computed, cached"
                if after.misses > before.misses
                else "no tool call"
            )
            print(f"run {number}: {task!r} -> {result.status}: {result.output!r} ({source})")

        prometheus = telemetry.prometheus
        assert prometheus is not None  # settings.metrics is set
        # The telemetry listens on the bus in a task of its own, which may lag a
        # little behind the runs; no event says it has caught up, so poll its figures.
        with trio.fail_after(5):
            while counted_runs(prometheus.text()) < len(TASKS):  # noqa: ASYNC110
                await trio.sleep(0.01)

        print("\nTelemetry (Prometheus text, as /metrics serves it):")
        for line in prometheus.text().splitlines():
            if line.startswith(SHOWN_METRICS):
                print(f"  {line}")

        stats = cache.statistics()
        print("\nCache statistics:")
        print(f"  hits {stats.hits}, misses {stats.misses}, hit rate {stats.hit_rate:.0%}")
        print(f"  size {stats.size} of at most {stats.max_size} entries")
    print(f"\nservices torn down (newest first); manager: {services!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Services, cache, telemetry and the executor.")
    parser.add_argument(
        "--pace",
        type=float,
        default=float(os.environ.get("TRIOFLOW_PACE", "20")),
        help="scripted model tokens per second (default: $TRIOFLOW_PACE or 20; 0: no delay)",
    )
    args = parser.parse_args()
    trio.run(main, args.pace)
