"""The ``trioflow`` command.

``trioflow run "What is 25 * 4?"`` runs the agent and shows its execution
live: the answer token by token, tool calls and their results as they
happen, and a progress bar with duration and ETA. ``--json`` writes one JSON
event per line instead, for pipes. Exit status: 0 when the run completed,
1 when it failed (or timed out), 130 when interrupted with Ctrl-C (after the
``flow.cancelled`` event was shown), 2 for bad usage.

Each subcommand is a module of this package, registered in
:data:`SUBCOMMANDS`: :mod:`~trioflow.cli._run`, :mod:`~trioflow.cli._serve`,
:mod:`~trioflow.cli._watch`, :mod:`~trioflow.cli._replay` and
:mod:`~trioflow.cli._worker`, each with a
``HELP`` string, an ``add_arguments(parser)`` function and a
``main(args) -> int`` function. What they share (option types, common
options, signals) is in :mod:`~trioflow.cli._common`; the terminal views are
in :mod:`~trioflow.cli._console`. Building the parser imports only those
light modules: a subcommand imports the feature it drives (the web server,
the clients, ...) when it runs, so that ``trioflow --help`` and ``trioflow
run`` start without loading the web stack.

``python -m trioflow`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections.abc import Sequence
from types import ModuleType

from trioflow import __version__
from trioflow.cli._common import UsageError
from trioflow.cli._console import EXIT_USAGE
from trioflow.settings import SettingsError

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "run": ("trioflow.cli._run", ()),
    "serve": ("trioflow.cli._serve", ("hypercorn", "starlette")),
    "watch": ("trioflow.cli._watch", ("httpx", "trio_websocket")),
    "replay": ("trioflow.cli._replay", ()),
    "worker": ("trioflow.cli._worker", ("coredis",)),
}
"""The subcommands: name -> (module, the distributions' top-level modules it needs).

A subcommand whose optional dependencies (``trioflow[web]``) are not
installed is left out; they are looked for, not imported.
"""


def _installed(requires: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in requires)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The parser of ``trioflow``, and the module of each subcommand it has.

    Defaults come from the ``TRIOFLOW_*`` environment variables; a bad value
    exits with status 2 and a one-line message.
    """
    parser = argparse.ArgumentParser(
        prog="trioflow",
        description="Stream the execution of LLM agents as events, on Trio.",
    )
    parser.add_argument("--version", action="version", version=f"trioflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules: dict[str, ModuleType] = {}
    try:
        for name, (module_name, requires) in SUBCOMMANDS.items():
            if not _installed(requires):
                continue  # that feature's optional dependency is not installed
            module = importlib.import_module(module_name)
            modules[name] = module
            module.add_arguments(
                sub.add_parser(
                    name,
                    help=module.HELP,
                    description=getattr(module, "DESCRIPTION", module.HELP),
                )
            )
    except SettingsError as exc:
        parser.exit(EXIT_USAGE, f"trioflow: {exc}\n")
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trioflow`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = modules[args.command].main(args)
    except UsageError as exc:
        parser.error(str(exc))
    return status
