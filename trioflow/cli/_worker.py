"""``trioflow worker``: the long-running process that executes the runs queued in Redis.

``trioflow worker --redis URL [--concurrency N] [--lease S] [--heartbeat S]``
``[--drain finish|handback] [--drain-timeout S] [--name NAME] [--model ...] [--pace X]``
``[--allow-model MODEL ...] [--timeout S] [--max-iterations N]`` takes runs off the work queue
(:func:`trioflow.redis.submit`) and runs them with the demo agent on
``--model`` (or the model a request names, when ``--allow-model`` names it:
give the workers the serve nodes' list; the request's ``system``,
``max_tokens`` and ``temperature`` apply as on a node), at most ``--concurrency`` at once, each under a lease it renews
every ``--heartbeat`` seconds; it also reaps the runs of lost workers (see
:func:`trioflow.redis.open_worker`). Once ready it writes one line on
standard error: ``trioflow: worker NAME ready ...``.

On SIGTERM or SIGINT it stops taking runs and drains: ``--drain finish``
(default) lets its runs end, for at most ``--drain-timeout`` seconds (30),
then cancels the rest; ``--drain handback`` hands them back to the queue at
once, for another worker. A second signal stops at once (the runs end with
``flow.cancelled``).

Under systemd (``Type=notify``), it also tells the service manager: ``READY=1``
once ready and ``STOPPING=1`` when it starts draining, as datagrams to
``$NOTIFY_SOCKET`` (nothing is sent when the variable is unset).

Exit status: 0 after a drain (or a second signal), 1 when Redis cannot be
reached or the model is unavailable, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from typing import IO

import trio

from trioflow._util import collapse_single_group
from trioflow.cli._common import (
    add_allow_model_option,
    add_model_option,
    add_pace_option,
    add_timeout_option,
    at_least_one,
    notify,
    positive_float,
    stop_on_signals,
)
from trioflow.cli._console import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from trioflow.models import ModelError, open_model
from trioflow.settings import Settings

__all__ = ["HELP", "add_arguments", "main"]

HELP = "execute the runs queued in Redis (a long-running worker process)"
"""The subcommand's one-line help."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``trioflow worker`` to ``parser``; defaults come from :class:`Settings`.

    Raises:
        SettingsError: a ``TRIOFLOW_*`` variable has a bad value.
    """
    settings = Settings.from_env()
    parser.add_argument(
        "--redis",
        required=True,
        metavar="URL",
        help="the Redis to take runs from: redis://host:port/db or unix:///path",
    )
    parser.add_argument(
        "--concurrency", type=at_least_one, default=4, help="the most runs at once (default: 4)"
    )
    parser.add_argument(
        "--lease",
        type=positive_float,
        default=5.0,
        help="seconds without a heartbeat after which a run's worker counts as lost (default: 5)",
    )
    parser.add_argument(
        "--heartbeat",
        type=positive_float,
        default=1.0,
        help="seconds between heartbeats, below --lease (default: 1)",
    )
    parser.add_argument(
        "--drain",
        choices=("finish", "handback"),
        default="finish",
        help="on SIGTERM: let the runs finish, or hand them back to the queue (default: finish)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=30.0,
        help="the most seconds a 'finish' drain waits (default: 30)",
    )
    parser.add_argument("--name", default=None, help="the worker's name (default: host:pid)")
    add_model_option(parser, settings, env_in_help=False)
    add_allow_model_option(parser)
    add_pace_option(parser)
    add_timeout_option(parser, settings, default=900.0)
    parser.add_argument(
        "--max-iterations",
        type=at_least_one,
        default=10,
        help="the agent's iteration budget when a request sets none (default: 10)",
    )


async def _work(args: argparse.Namespace, err: IO[str]) -> int:
    from trioflow.demo import default_agent_factory
    from trioflow.redis import open_worker

    async with open_model(args.model, pace=args.pace) as model:
        stop = trio.Event()
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                stop_on_signals(nursery, stop, err, doing="draining")
                async with open_worker(
                    args.redis,
                    agent_factory=default_agent_factory(model, max_iterations=args.max_iterations),
                    allowed_models=args.allow_model,
                    concurrency=args.concurrency,
                    lease=args.lease,
                    heartbeat=args.heartbeat,
                    drain=args.drain,
                    drain_timeout=args.drain_timeout,
                    run_timeout=args.timeout or None,
                    name=args.name,
                ) as worker:
                    print(
                        f"trioflow: worker {worker.name} ready on {args.redis} "
                        f"(concurrency {args.concurrency}, lease {args.lease:g} s, "
                        f"drain {args.drain}) with the {model.name} model; Ctrl-C to stop",
                        file=err,
                        flush=True,
                    )
                    notify("READY=1")
                    await stop.wait()
                nursery.cancel_scope.cancel()  # drained: stop watching signals
    stats = worker.statistics()
    print(
        f"trioflow: stopped ({stats.completed} completed, {stats.failed} failed, "
        f"{stats.cancelled} cancelled, {stats.handed_back} handed back)",
        file=err,
        flush=True,
    )
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    """Run ``trioflow worker`` with parsed ``args``; return the exit status."""
    if not args.heartbeat < args.lease:
        print("trioflow worker: --heartbeat must be below --lease", file=sys.stderr)
        return EXIT_USAGE
    from coredis.exceptions import RedisError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        return trio.run(functools.partial(_work, args, sys.stderr))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ModelError as exc:
        print(f"trioflow worker: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"trioflow worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, RedisError) as exc:
        print(f"trioflow worker: cannot reach Redis at {args.redis}: {exc}", file=sys.stderr)
        return EXIT_FAILED
