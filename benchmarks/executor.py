"""Framework overhead per event: the executor against the bare model stream.

Both sides play the same ScriptedModel turn (``N`` text deltas, pace 0):

* ``bare``: ``async with model.stream(...)`` and iterate, counting deltas;
* ``executor``: ``executor.stream(agent, task)`` and iterate the events a
  subscriber receives (each delta becomes a ``token.received`` FlowEvent with
  its seq, history entry and run counters, plus the lifecycle events).

Reported: tokens/s of each, the ratio, and the overhead per token in
microseconds. Best of ``--repeat`` rounds, interleaved.

    python benchmarks/executor.py [--tokens 20000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import trio

from trioflow import Agent, Message, ScriptedModel, StreamingFlowExecutor, Turn
from trioflow.models import TextDelta


def make_model(tokens: int) -> ScriptedModel:
    return ScriptedModel([Turn(text=["x "] * tokens)])


async def bare(tokens: int) -> float:
    model = make_model(tokens)
    start = time.perf_counter()
    seen = 0
    async with model.stream([Message.user("go")]) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                seen += 1
    elapsed = time.perf_counter() - start
    assert seen == tokens
    return tokens / elapsed


async def through_executor(tokens: int) -> float:
    agent = Agent(make_model(tokens))
    executor = StreamingFlowExecutor(history=tokens + 64)
    start = time.perf_counter()
    seen = 0
    async with executor.stream(agent, "go") as events:
        while True:
            try:
                batch = await events.receive_batch()
            except trio.EndOfChannel:
                break
            seen += sum(1 for e in batch if e.type == "token.received")
    elapsed = time.perf_counter() - start
    assert seen == tokens, seen
    return tokens / elapsed


async def main(args: argparse.Namespace) -> dict[str, float]:
    best = {"bare": 0.0, "executor": 0.0}
    await bare(1000)
    await through_executor(1000)
    for _ in range(args.repeat):
        best["bare"] = max(best["bare"], await bare(args.tokens))
        best["executor"] = max(best["executor"], await through_executor(args.tokens))
    best["ratio"] = best["executor"] / best["bare"]
    best["overhead_us_per_token"] = (1 / best["executor"] - 1 / best["bare"]) * 1e6
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens = 5_000
    result = trio.run(main, args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"Python {platform.python_version()}, trio {trio.__version__}, {args.tokens} tokens")
        print("| path | tokens/s |")
        print("|---|--:|")
        print(f"| bare ScriptedModel stream | {result['bare']:,.0f} |")
        print(f"| executor -> subscriber (receive_batch) | {result['executor']:,.0f} |")
        print(
            f"\nratio executor/bare: {result['ratio']:.2f}; "
            f"overhead {result['overhead_us_per_token']:.1f} us per token"
        )
