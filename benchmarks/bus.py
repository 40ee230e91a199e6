"""Event-bus throughput, as ratios against baselines measured in the same run.

Run with ``nox -s bench`` or ``python benchmarks/bus.py [--quick] [--json]``.

Every scenario moves N items from one producer task to one or more consumer
tasks, each through a bounded buffer of 256, and is timed with
:func:`time.perf_counter` from the first send until every consumer has received
the last item (each consumer counts what it receives, and the run fails unless
every consumer got every item). All scenarios run once as a warm-up, then
``--repeat`` rounds (3 by default) that each run every scenario once, so that
interference from other processes spreads over all of them; the table shows the
best round of each scenario (the JSON output has the median too).

Scenarios:

* ``trio-naive``: one trio memory channel, ``await send`` / ``async for``: every
  send and every receive is a schedule point.
* ``trio-batch-K``: one trio memory channel per consumer, K consumers. The
  producer ``send_nowait``s each item to every channel (``await send`` on
  :exc:`trio.WouldBlock`) and checkpoints once per batch of ``--batch`` items;
  each consumer ``await receive()``s one item, then drains with
  ``receive_nowait``.
* ``trio-records``: ``trio-batch-1`` carrying the per-event record below.
* ``asyncio-raw``: ``asyncio.Queue(256)``, ``await put`` / ``await get`` (neither
  yields unless the queue is full / empty), in ``asyncio.run`` in this process.
* ``asyncio-records``: the same, with a record built per event in the producer
  loop: ``(seq, type, dict(data), time.time(), run_id)``, the fields and the
  per-event work (a copy of the data, a clock read, a seq counter) of a
  FlowEvent, as a plain tuple, with no history.
* ``asyncio-langflow``: the same, with the record Langflow's
  ``EventManager.send_event`` builds, ``(f"{type}-{uuid4()}",
  (json.dumps({"event": type, "data": data}) + "\\n\\n").encode(), time.time())``.
  Informational only: it serialises in the producer, which trioflow leaves to
  the transport, so no target is set against it.
* ``bus-each``: the bus, one subscriber read one event at a time with
  ``async for``; the producer calls ``await bus.emit(type, data)``.
* ``bus-batch-K``: the bus, K subscribers read with ``receive_batch()``; the
  producer calls ``bus.emit_nowait(type, data)`` (``await bus.emit`` on
  :exc:`trio.WouldBlock`) and checkpoints once per batch of ``--batch`` events.

The raw baselines move one pre-built small object, ``(type, data)``. Every bus
emit builds a real FlowEvent (a frozen slots dataclass) with a copy of the
data, stamps a seq and a timestamp, and appends the event to the bus's
history (1024 events, the default); subscriptions use the default
``Overflow.BLOCK``, so nothing is dropped.

The default batch is 256, the buffer size: ``asyncio.Queue(256)`` switches
tasks about once per 256 items (``put`` and ``get`` do not yield until the
queue is full or empty), so a trio producer that checkpoints once per 256 items
switches as often. ``--batch 64`` shows the cost of switching 4 times as often.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

import trioflow

BUFFER = 256
"""Every channel's and queue's bound (the bus's default subscription buffer)."""
TYPE = "token.received"
DATA: dict[str, Any] = {"token": "Hi"}
ITEM = (TYPE, DATA)
"""The pre-built small object the raw baselines move."""
FANOUT = (1, 10, 100)
MIN_EVENTS = 2_000
"""Fan-out scenarios divide their events by the subscriber count, down to this."""

Make = Callable[[int], object]
Runner = Callable[[int, int, int], float]
"""``runner(events, subscribers, batch)`` returns the seconds the run took."""


# -- what the baselines carry ---------------------------------------------------------


def raw_item(_seq: int) -> object:
    return ITEM


def record(seq: int) -> object:
    return (seq, TYPE, dict(DATA), time.time(), None)


def langflow_record(_seq: int) -> object:
    payload = json.dumps({"event": TYPE, "data": DATA}) + "\n\n"
    return (f"{TYPE}-{uuid.uuid4()}", payload.encode("utf-8"), time.time())


# -- trio baselines ---------------------------------------------------------------------


async def trio_naive(n: int, k: int, batch: int) -> float:
    assert k == 1
    send, recv = trio.open_memory_channel[object](BUFFER)
    got = 0

    async def consume() -> None:
        nonlocal got
        async with recv:
            async for _ in recv:
                got += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.testing.wait_all_tasks_blocked()
        t0 = time.perf_counter()
        async with send:
            for _ in range(n):
                await send.send(ITEM)
    t1 = time.perf_counter()
    assert got == n, (got, n)
    return t1 - t0


async def trio_batch(n: int, k: int, batch: int, make: Make = raw_item) -> float:
    channels = [trio.open_memory_channel[object](BUFFER) for _ in range(k)]
    sends = [send for send, _ in channels]
    got = [0] * k
    checkpoint = trio.lowlevel.checkpoint

    async def consume(i: int, recv: trio.MemoryReceiveChannel[object]) -> None:
        receive, receive_nowait = recv.receive, recv.receive_nowait
        count = 0
        try:
            while True:
                await receive()
                count += 1
                while True:
                    try:
                        receive_nowait()
                    except trio.WouldBlock:
                        break
                    count += 1
        except trio.EndOfChannel:
            got[i] = count

    async with trio.open_nursery() as nursery:
        for i, (_, recv) in enumerate(channels):
            nursery.start_soon(consume, i, recv)
        await trio.testing.wait_all_tasks_blocked()
        t0 = time.perf_counter()
        seq = 0
        for start in range(0, n, batch):
            for _ in range(min(batch, n - start)):
                seq += 1
                item = make(seq)
                for send in sends:
                    try:
                        send.send_nowait(item)
                    except trio.WouldBlock:
                        await send.send(item)
            await checkpoint()
        for send in sends:
            send.close()
    t1 = time.perf_counter()
    assert got == [n] * k, (got, n)
    return t1 - t0


async def trio_records(n: int, k: int, batch: int) -> float:
    return await trio_batch(n, k, batch, record)


# -- asyncio baselines ---------------------------------------------------------------------


async def _asyncio_handoff(n: int, make: Make) -> float:
    queue: asyncio.Queue[object] = asyncio.Queue(BUFFER)
    done = object()
    got = 0

    async def consume() -> None:
        nonlocal got
        get = queue.get
        while (await get()) is not done:
            got += 1

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    put = queue.put
    for seq in range(1, n + 1):
        await put(make(seq))
    await put(done)
    await consumer
    t1 = time.perf_counter()
    assert got == n, (got, n)
    return t1 - t0


def in_asyncio(make: Make) -> Runner:
    def run(n: int, k: int, batch: int) -> float:
        assert k == 1
        return asyncio.run(_asyncio_handoff(n, make))

    return run


# -- the bus -----------------------------------------------------------------------------------


async def bus_each(n: int, k: int, batch: int) -> float:
    assert k == 1
    got = 0
    async with trioflow.open_event_bus() as bus, bus.subscribe(buffer=BUFFER) as sub:

        async def consume() -> None:
            nonlocal got
            async for _ in sub:
                got += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            t0 = time.perf_counter()
            emit = bus.emit
            for _ in range(n):
                await emit(TYPE, DATA)
            bus.close()
        t1 = time.perf_counter()
    assert got == n, (got, n)
    return t1 - t0


async def bus_batch(n: int, k: int, batch: int) -> float:
    got = [0] * k
    checkpoint = trio.lowlevel.checkpoint

    async def consume(i: int, sub: trioflow.Subscription) -> None:
        receive_batch = sub.receive_batch
        count = 0
        try:
            while True:
                count += len(await receive_batch())
        except trio.EndOfChannel:
            got[i] = count

    async with trioflow.open_event_bus() as bus, AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(bus.subscribe(buffer=BUFFER)) for _ in range(k)]
        async with trio.open_nursery() as nursery:
            for i, sub in enumerate(subs):
                nursery.start_soon(consume, i, sub)
            await trio.testing.wait_all_tasks_blocked()
            t0 = time.perf_counter()
            emit_nowait = bus.emit_nowait
            for start in range(0, n, batch):
                for _ in range(min(batch, n - start)):
                    try:
                        emit_nowait(TYPE, DATA)
                    except trio.WouldBlock:
                        await bus.emit(TYPE, DATA)
                await checkpoint()
            bus.close()
        t1 = time.perf_counter()
    assert got == [n] * k, (got, n)
    return t1 - t0


def in_trio(fn: Callable[[int, int, int], Awaitable[float]]) -> Runner:
    def run(n: int, k: int, batch: int) -> float:
        return trio.run(fn, n, k, batch)

    return run


# -- the scenarios -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Runner
    events: int
    """Events in a full run (with one subscriber)."""
    description: str
    fanout: bool = False


SCENARIOS = [
    Scenario(
        "trio-naive",
        in_trio(trio_naive),
        60_000,
        "trio channel, `await send` / `async for`; pre-built object",
    ),
    Scenario(
        "trio-batch",
        in_trio(trio_batch),
        300_000,
        "trio channel per consumer, `send_nowait` + 1 checkpoint per batch, "
        "`receive_nowait` drain; pre-built object",
        fanout=True,
    ),
    Scenario(
        "trio-records",
        in_trio(trio_records),
        200_000,
        "as trio-batch-1, carrying a record built per event: "
        "`(seq, type, dict(data), time.time(), run_id)`",
    ),
    Scenario(
        "asyncio-raw",
        in_asyncio(raw_item),
        200_000,
        "`asyncio.Queue(256)`, `await put` / `await get`; pre-built object",
    ),
    Scenario(
        "asyncio-records",
        in_asyncio(record),
        200_000,
        "`asyncio.Queue(256)`, carrying a record built per event: "
        "`(seq, type, dict(data), time.time(), run_id)`",
    ),
    Scenario(
        "asyncio-langflow",
        in_asyncio(langflow_record),
        30_000,
        "`asyncio.Queue(256)`, carrying Langflow's `send_event` record: "
        "`(uuid4 id, json.dumps bytes, time.time())` (informational)",
    ),
    Scenario(
        "bus-each",
        in_trio(bus_each),
        60_000,
        "bus: `await bus.emit(type, data)`, subscriber read with `async for`",
    ),
    Scenario(
        "bus-batch",
        in_trio(bus_batch),
        200_000,
        "bus: `emit_nowait` + 1 checkpoint per batch, subscribers read with `receive_batch()`",
        fanout=True,
    ),
]
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Result:
    name: str
    scenario: str
    subscribers: int
    events: int
    runs: list[float]
    """Seconds of every timed run."""

    @property
    def seconds(self) -> float:
        return min(self.runs)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def deliveries_per_s(self) -> float:
        return self.events * self.subscribers / self.seconds

    @property
    def ns_per_delivery(self) -> float:
        return 1e9 / self.deliveries_per_s

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "subscribers": self.subscribers,
            "events": self.events,
            "runs_s": self.runs,
            "best_s": self.seconds,
            "median_s": statistics.median(self.runs),
            "events_per_s": self.events_per_s,
            "deliveries_per_s": self.deliveries_per_s,
            "ns_per_delivery": self.ns_per_delivery,
        }


def plan(scale: float, only: list[str] | None) -> list[tuple[Scenario, int, int]]:
    """The runs of one round: (scenario, subscribers, events)."""
    runs = []
    for scenario in SCENARIOS:
        if only and scenario.name not in only:
            continue
        for k in FANOUT if scenario.fanout else (1,):
            n = max(int(scenario.events * scale) // k, int(MIN_EVENTS * scale))
            runs.append((scenario, k, n))
    return runs


def run_all(
    *,
    scale: float,
    repeat: int,
    batch: int,
    only: list[str] | None,
    progress: Callable[[str], None],
) -> dict[str, Result]:
    runs = plan(scale, only)
    for scenario, k, n in runs:  # warm-up
        scenario.run(max(n // 10, 100), k, batch)
    results = {
        f"{s.name}-{k}" if s.fanout else s.name: Result(
            f"{s.name}-{k}" if s.fanout else s.name, s.name, k, n, []
        )
        for s, k, n in runs
    }
    for round_ in range(1, repeat + 1):
        started = time.perf_counter()
        for (scenario, k, n), result in zip(runs, results.values(), strict=True):
            gc.collect()
            result.runs.append(scenario.run(n, k, batch))
        progress(f"round {round_}/{repeat}: {time.perf_counter() - started:.1f} s")
    return results


# -- ratios and reporting ---------------------------------------------------------------------


def ratios(r: dict[str, Result]) -> list[tuple[str, float | None, str]]:
    """(what, ratio, target); a ratio is None when its scenarios did not run."""

    def rate(a: str, b: str) -> float | None:
        if a in r and b in r:
            return r[a].events_per_s / r[b].events_per_s
        return None

    def cost(a: str, b: str) -> float | None:
        if a in r and b in r:
            return r[a].ns_per_delivery / r[b].ns_per_delivery
        return None

    out: list[tuple[str, float | None, str]] = [
        ("bus-each / trio-naive (events/s)", rate("bus-each", "trio-naive"), ">= 1"),
        ("bus-batch-1 / asyncio-raw (events/s)", rate("bus-batch-1", "asyncio-raw"), ">= 1"),
        (
            "bus-batch-1 / asyncio-records (events/s)",
            rate("bus-batch-1", "asyncio-records"),
            ">= 1",
        ),
        ("bus-batch-1 / trio-records (events/s)", rate("bus-batch-1", "trio-records"), ""),
        ("bus-batch-1 / trio-batch-1 (events/s)", rate("bus-batch-1", "trio-batch-1"), ""),
    ]
    for k in FANOUT:
        out.append(
            (
                f"bus / trio cost per delivery, {k} subscriber{'s' if k > 1 else ''}",
                cost(f"bus-batch-{k}", f"trio-batch-{k}"),
                "",
            )
        )
    for name in ("bus-batch", "trio-batch"):
        for k in FANOUT[1:]:
            out.append(
                (
                    f"{name}: cost per delivery, {k} / 1 subscribers",
                    cost(f"{name}-{k}", f"{name}-1"),
                    "<= ~1 (linear fan-out)" if name == "bus-batch" else "",
                )
            )
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if hasattr(os, "sched_getaffinity"):
        nproc = len(os.sched_getaffinity(0))
    else:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "cpu": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "trio": trio.__version__,
        "trioflow": trioflow.__version__,
        "platform": platform.platform(terse=True),
    }


def markdown(
    info: dict[str, Any],
    results: dict[str, Result],
    q: list[tuple[str, float | None, str]],
    *,
    repeat: int,
    batch: int,
) -> str:
    lines = [
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['python']}, "
        f"trio {info['trio']}, trioflow {info['trioflow']}, {info['platform']}.",
        f"Best of {repeat} interleaved rounds after a warm-up; buffers of {BUFFER}; "
        f"nowait producers checkpoint once per {batch} items.",
        "",
        "| scenario | what moves | subs | events | events/s | deliveries/s | ns/delivery |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for res in results.values():
        desc = BY_NAME[res.scenario].description
        lines.append(
            f"| {res.name} | {desc} | {res.subscribers} | {res.events:,} | "
            f"{res.events_per_s:,.0f} | {res.deliveries_per_s:,.0f} | "
            f"{res.ns_per_delivery:,.0f} |"
        )
    lines += ["", "| ratio | value | target |", "|---|--:|---|"]
    for what, value, target in q:
        if value is not None:
            lines.append(f"| {what} | {value:.2f} | {target} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Event-bus throughput against baselines.")
    parser.add_argument("--quick", action="store_true", help="a run of about 10 s")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument(
        "--batch",
        type=int,
        default=BUFFER,
        help=f"items a nowait producer sends per checkpoint (default {BUFFER})",
    )
    parser.add_argument("--scale", type=float, help="multiply every event count")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BY_NAME),
        help="run only this scenario (repeatable)",
    )
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.4 if args.quick else 1.0)
    info = machine()

    def say(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    say(f"trioflow bus benchmark: scale {scale}, {args.repeat} rounds, batch {args.batch}")
    results = run_all(
        scale=scale, repeat=args.repeat, batch=args.batch, only=args.only, progress=say
    )
    q = ratios(results)
    if args.json:
        doc = {
            "machine": info,
            "statistic": "best",
            "repeat": args.repeat,
            "buffer": BUFFER,
            "batch": args.batch,
            "scale": scale,
            "results": {name: res.to_json() for name, res in results.items()},
            "ratios": {what: value for what, value, _ in q if value is not None},
        }
        print(json.dumps(doc, indent=2))
    else:
        print(markdown(info, results, q, repeat=args.repeat, batch=args.batch))


if __name__ == "__main__":
    main()
