"""Appending a run's events to Redis: RedisHistory's batches against one XADD per event.

Run with ``nox -s bench`` or ``python benchmarks/redis.py [--quick] [--json]``.
Starts its own ``redis-server`` (``$TRIOFLOW_REDIS_SERVER`` or the one on
``PATH``) on a Unix socket in a temporary directory, without persistence, and
stops it at the end. Every figure is a rate measured in this run; the ratios
are the point, the absolute rates depend on the machine.

Scenarios (each event is the same ``token.received`` FlowEvent with its JSON,
about 150 bytes; each scenario writes into a new run):

* ``xadd-each``: the baseline, what one writes without batching (Langflow's
  shape): ``await client.xadd(key, {"e": json}, identifier="N-0", MAXLEN ~
  cap)`` per event, the JSON encoded in the loop. Runs a fifth of the events
  (it is slow) and is reported as a rate.
* ``history``: :class:`trioflow.redis.RedisHistory`: ``append`` per event
  and a checkpoint per event (as ``await bus.emit`` does), then ``await
  history.flush()``; timed until Redis has confirmed the last event. The
  flusher writes behind in batches (every 25 ms or 64 events, one script
  call each).
* ``bus-memory`` and ``bus-redis``: ``await bus.emit(...)`` per event on a
  bus with a MemoryHistory and with a RedisHistory (timed until the last
  event is written, for Redis): what the Redis path costs a run's emitter.

The tables show the best of ``--repeat`` interleaved rounds (after a warm-up),
with events/s, the ratio to ``xadd-each``, and for the Redis histories the
script calls and the mean events per call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import coredis
import trio

from trioflow import FlowEvent, open_event_bus
from trioflow.redis import RedisRunStore, open_redis

CAPACITY = 4096


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    program = os.environ.get("TRIOFLOW_REDIS_SERVER") or shutil.which("redis-server")
    if program is None:
        raise SystemExit("benchmarks/redis.py needs redis-server (apt-get install redis-server)")
    path = str(directory / "redis.sock")
    proc = subprocess.Popen(
        [program, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(directory), "--logfile", "redis.log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return proc, f"unix://{path}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.02)


def token(seq: int, run_id: str) -> FlowEvent:
    return FlowEvent("token.received", {"token": "word ", "index": seq}, time.time(), seq, run_id)


Result = dict[str, float]


async def xadd_each(store: RedisRunStore, events: int) -> Result:
    run_id = (await store.create(capacity=CAPACITY)).run_id
    key = store.keys.events(run_id)
    client = store.client
    start = time.perf_counter()
    for seq in range(1, events + 1):
        await client.xadd(
            key,
            {"e": token(seq, run_id).to_json()},
            identifier=f"{seq}-0",
            trim_strategy=coredis.PureToken.MAXLEN,
            trim_operator=coredis.PureToken.APPROXIMATELY,
            threshold=CAPACITY,
        )
    elapsed = time.perf_counter() - start
    return {"rate": events / elapsed, "writes": events}


async def history(store: RedisRunStore, events: int) -> Result:
    run_id = (await store.create(capacity=CAPACITY)).run_id
    epoch = await store.claim(run_id)
    checkpoint = trio.lowlevel.checkpoint
    async with store.open_history(run_id, epoch=epoch) as hist:
        start = time.perf_counter()
        for seq in range(1, events + 1):
            hist.append(token(seq, run_id))
            await checkpoint()
        await hist.flush()
        elapsed = time.perf_counter() - start
        writes = hist.statistics().writes
    assert (await store.get(run_id)).last_seq == events
    return {"rate": events / elapsed, "writes": writes}


async def bus_memory(store: RedisRunStore, events: int) -> Result:
    async with open_event_bus(history=CAPACITY) as bus:
        start = time.perf_counter()
        for seq in range(events):
            await bus.emit("token.received", {"token": "word ", "index": seq}, run_id="run_x")
        elapsed = time.perf_counter() - start
    return {"rate": events / elapsed, "writes": 0}


async def bus_redis(store: RedisRunStore, events: int) -> Result:
    run_id = (await store.create(capacity=CAPACITY)).run_id
    epoch = await store.claim(run_id)
    async with (
        store.open_history(run_id, epoch=epoch) as hist,
        open_event_bus(history=hist) as bus,
    ):
        start = time.perf_counter()
        for seq in range(events):
            await bus.emit("token.received", {"token": "word ", "index": seq}, run_id=run_id)
        await hist.flush()
        elapsed = time.perf_counter() - start
        writes = hist.statistics().writes
    return {"rate": events / elapsed, "writes": writes}


SCENARIOS: dict[str, tuple[Callable[[RedisRunStore, int], Awaitable[Result]], int]] = {
    "xadd-each": (xadd_each, 5),  # a fifth of the events
    "history": (history, 1),
    "bus-memory": (bus_memory, 1),
    "bus-redis": (bus_redis, 1),
}


async def main(args: argparse.Namespace) -> dict[str, Result]:
    best: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="trioflow-bench-redis-") as tmp:
        proc, url = start_server(Path(tmp))
        try:
            async with open_redis(url) as client:
                store = RedisRunStore(client)
                for scenario, divisor in SCENARIOS.values():  # warm-up
                    await scenario(store, max(100, args.events // 20 // divisor))
                for _ in range(args.repeat):
                    for name, (scenario, divisor) in SCENARIOS.items():
                        await client.flushall()
                        result = await scenario(store, args.events // divisor)
                        result["events"] = args.events // divisor
                        if result["rate"] > best.get(name, {"rate": 0.0})["rate"]:
                            best[name] = result
        finally:
            proc.terminate()
            proc.wait(10)
    base = best["xadd-each"]["rate"]
    for result in best.values():
        result["ratio"] = result["rate"] / base
    best["bus-redis"]["vs_memory"] = best["bus-redis"]["rate"] / best["bus-memory"]["rate"]
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer events")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.events = 5_000
        args.repeat = 2
    results = trio.run(main, args)
    if args.json:
        print(json.dumps(results))
    else:
        print(
            f"Python {platform.python_version()}, trio {trio.__version__}, "
            f"coredis {coredis.__version__}, {args.events} events (xadd-each: a fifth)"
        )
        print("| scenario | events/s | x xadd-each | script calls | events per call |")
        print("|---|--:|--:|--:|--:|")
        for name, r in results.items():
            calls = f"{r['writes']:,.0f}" if r["writes"] else "-"
            per = f"{r['events'] / r['writes']:,.1f}" if r["writes"] else "-"
            print(f"| {name} | {r['rate']:,.0f} | {r['ratio']:.1f} | {calls} | {per} |")
        print(
            f"\nbus-redis / bus-memory: {results['bus-redis']['vs_memory']:.2f} "
            "(what writing behind to Redis costs a run's emits)"
        )
