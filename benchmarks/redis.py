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
  process's writer writes behind in batches (one script call per round
  trip, carrying every run's waiting batch; a call goes 2 ms after an event
  or at once for 64 events, and at most one is in flight).
* ``bus-memory`` and ``bus-redis``: ``await bus.emit(...)`` per event on a
  bus with a MemoryHistory and with a RedisHistory (timed until the last
  event is written, for Redis): what the Redis path costs a run's emitter.

The tables show the best of ``--repeat`` interleaved rounds (after a warm-up),
with events/s, the ratio to ``xadd-each``, and for the Redis histories the
script calls and the mean events per call.

``--nodes`` measures serving across processes instead (:class:`trioflow.redis.NodeTail`),
with a writer process executing the runs and one or two node processes
following them (each with its own tail and connection pool):

* latency: 100 concurrent runs x 20 tokens/s for 5 s, one watcher per run on
  one node; emit -> watcher p50/p99 (the writer's ``time.time()`` stamped in
  the event, read by the watcher), against the same load in memory (one
  process, a bus per run);
* throughput: 100 runs written as fast as the writer can (200 events each),
  400 watchers in total, on one node (4 per run) or split over two (2 per
  run each); delivered events/s over every watcher, and the cores the whole
  system kept busy meanwhile (CPU seconds of the nodes, the writer and
  Redis over the span): a second node can only add what the cores left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import coredis
import trio

from trioflow import FlowEvent, open_event_bus
from trioflow.events import EventType
from trioflow.redis import RedisRunStore, open_node_tail, open_redis, open_remote_run

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


# -- across processes: --nodes -------------------------------------------------------------


async def _line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            raise SystemExit("a benchmark process ended early")
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def writer(url: str, prefix: str, runs: int, events: int, rate: float) -> None:
    """Role ``writer``: create and claim the runs, say ``ready``, on ``go`` write them."""
    async with open_redis(url) as client:
        store = RedisRunStore(client, owner="bench-writer")
        epochs = {}
        for i in range(runs):
            await store.create(f"{prefix}{i}", capacity=CAPACITY)
            epochs[f"{prefix}{i}"] = await store.claim(f"{prefix}{i}")
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        cpu = time.process_time()

        async def one(run_id: str) -> None:
            async with (
                store.open_history(run_id, epoch=epochs[run_id]) as hist,
                open_event_bus(history=hist) as bus,
            ):
                start = trio.current_time()
                for seq in range(events):
                    if rate:
                        await trio.sleep_until(start + seq / rate)
                    await bus.emit(
                        "token.received", {"token": "word ", "index": seq}, run_id=run_id
                    )
                await bus.emit(EventType.FLOW_COMPLETED, {"output": "done"}, run_id=run_id)

        async with trio.open_nursery() as nursery:
            for run_id in epochs:
                nursery.start_soon(one, run_id)
    print(json.dumps({"cpu": time.process_time() - cpu}), flush=True)


async def node(url: str, prefix: str, runs: int, watchers: int) -> None:
    """Role ``node``: watch every run ``watchers`` times through one tail; print the figures."""
    async with open_redis(url) as client:
        store = RedisRunStore(client, owner="bench-node")
        latencies: list[float] = []
        counts = {"delivered": 0}
        first: list[float] = []
        last: list[float] = []
        async with open_node_tail(store) as tail:
            remotes = [await open_remote_run(store, tail, f"{prefix}{i}") for i in range(runs)]
            ready = trio.Event()
            joined = 0

            async def watch(run: object, sample: bool) -> None:
                nonlocal joined
                assert hasattr(run, "subscribe")
                async with run.subscribe(after=0, buffer=1024) as events:
                    joined += 1
                    if joined == runs * watchers:
                        ready.set()
                    n = 0
                    while True:
                        try:
                            batch = await events.receive_batch()
                        except trio.EndOfChannel:
                            break
                        now = time.time()
                        if not first:
                            first.append(now)
                        n += len(batch)
                        if sample:
                            latencies.extend(now - e.timestamp for e in batch)
                    counts["delivered"] += n
                    last.append(time.time())

            async with trio.open_nursery() as nursery:
                for remote in remotes:
                    for w in range(watchers):
                        nursery.start_soon(watch, remote, w == 0)
                await ready.wait()
                cpu = time.process_time()
                print("ready", flush=True)
            stats = tail.statistics()
    print(json.dumps({
        "delivered": counts["delivered"], "first": first[0], "last": max(last),
        "latencies": latencies, "reads": stats.reads, "reissues": stats.reissues,
        "cpu": time.process_time() - cpu,
    }), flush=True)  # fmt: skip


async def _spawn(*args: str) -> tuple[trio.Process, bytearray]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    return proc, bytearray()


async def across(url: str, runs: int, events: int, rate: float, split: list[int]) -> list[dict]:
    """One writer, a node per entry of ``split`` (its watchers per run); each node's figures."""
    prefix = f"run_bench_{time.time_ns()}_"
    writer_proc, wbuf = await _spawn(
        "--role", "writer", url, prefix, str(runs), str(events), str(rate)
    )
    assert writer_proc.stdout is not None
    assert writer_proc.stdin is not None
    assert await _line(writer_proc.stdout, wbuf) == "ready"
    nodes = []
    for watchers in split:
        proc, buf = await _spawn("--role", "node", url, prefix, str(runs), str(watchers))
        assert proc.stdout is not None
        assert await _line(proc.stdout, buf) == "ready"
        nodes.append((proc, buf))
    await writer_proc.stdin.send_all(b"go\n")
    results = []
    for proc, buf in nodes:
        assert proc.stdout is not None
        results.append(json.loads(await _line(proc.stdout, buf)))
        await proc.wait()
    results.append(json.loads(await _line(writer_proc.stdout, wbuf)))  # the writer's, last
    await writer_proc.wait()
    return results


async def redis_cpu(url: str) -> float:
    """The CPU seconds the Redis server has used (``INFO cpu``: user + system)."""
    async with open_redis(url) as client:
        info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def memory_latency(runs: int, events: int, rate: float) -> list[float]:
    """The same load as the latency scenario in one process, a bus per run (no Redis)."""
    latencies: list[float] = []

    async def one() -> None:
        async with (
            open_event_bus(history=CAPACITY) as bus,
            bus.subscribe(after=0) as sub,
            trio.open_nursery() as nursery,
        ):

            async def emit() -> None:
                start = trio.current_time()
                for seq in range(events):
                    await trio.sleep_until(start + seq / rate)
                    await bus.emit("token.received", {"token": "word ", "index": seq})
                bus.close()

            nursery.start_soon(emit)
            async for event in sub:
                latencies.append(time.time() - event.timestamp)

    async with trio.open_nursery() as nursery:
        for _ in range(runs):
            nursery.start_soon(one)
    return latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def nodes_main(args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    seconds = 2 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="trioflow-bench-redis-") as tmp:
        proc, url = start_server(Path(tmp))
        try:
            memory = await memory_latency(100, 20 * seconds, 20.0)
            [lat, _] = await across(url, 100, 20 * seconds, 20.0, [1])
            out |= {
                "memory_p50_ms": _pct(memory, 0.5), "memory_p99_ms": _pct(memory, 0.99),
                "redis_p50_ms": _pct(lat["latencies"], 0.5),
                "redis_p99_ms": _pct(lat["latencies"], 0.99),
                "redis_mean_ms": statistics.fmean(lat["latencies"]) * 1000,
                "tail_reads": lat["reads"],
            }  # fmt: skip
            for name, split in (("one_node", [4]), ("two_nodes", [2, 2])):
                best = 0.0
                for _ in range(args.repeat):
                    before = await redis_cpu(url)
                    *figures, writer_figures = await across(url, 100, 200, 0.0, split)
                    redis_used = await redis_cpu(url) - before
                    delivered = sum(f["delivered"] for f in figures)
                    span = max(f["last"] for f in figures) - min(f["first"] for f in figures)
                    if delivered / span > best:
                        best = delivered / span
                        # the cores the whole system kept busy: nodes, writer and Redis
                        cpu = sum(f["cpu"] for f in figures) + writer_figures["cpu"] + redis_used
                        out[f"{name}_cores_busy"] = cpu / span
                out[f"{name}_events_per_s"] = best
            out["two_vs_one"] = out["two_nodes_events_per_s"] / out["one_node_events_per_s"]
        finally:
            proc.terminate()
            proc.wait(10)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--role"]:  # a process of --nodes
        role, url, prefix, runs, *rest = sys.argv[2:]
        if role == "writer":
            trio.run(writer, url, prefix, int(runs), int(rest[0]), float(rest[1]))
        else:
            trio.run(node, url, prefix, int(runs), int(rest[0]))
        raise SystemExit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer events")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--nodes", action="store_true", help="serving across processes instead")
    args = parser.parse_args()
    if args.quick:
        args.events = 5_000
        args.repeat = 2
    if args.nodes:
        figures = trio.run(nodes_main, args)
        if args.json:
            print(json.dumps(figures))
        else:
            print(f"Python {platform.python_version()}, {os.cpu_count()} cores")
            print("| figure | value |\n|---|--:|")
            for key, value in figures.items():
                print(f"| {key} | {value:,.2f} |")
        raise SystemExit(0)
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
