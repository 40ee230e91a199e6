"""Start-up time of the ``trioflow`` command against ``python -c "import trio"``.

Three commands, each run ``--samples`` times (after ``--warmup`` runs):

* ``baseline``: ``python -c "import trio"``, the floor of any Trio program;
* ``help``: ``python -m trioflow --help``, the parser alone;
* ``run``: ``python -m trioflow run "What is 25 * 4?" --json --pace 0``, a whole
  run with the offline scripted model, written as JSON lines.

Reported: the median and the minimum wall time of each, the median's
difference to the baseline's (the cost of trioflow itself), and the mean CPU
time (user + system), which moves less than wall time on a busy machine. The target: the
``run`` command at most 0.5 s above the baseline. Timed with ``hyperfine``
when it is installed (``apt-get install hyperfine``; ``--no-hyperfine`` to
skip it), else by timing the subprocesses here. The commands run with this
checkout first on ``PYTHONPATH`` and without ``ANTHROPIC_API_KEY``.

    python benchmarks/startup.py [--samples 20] [--warmup 2] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TARGET = 0.5
"""The most seconds ``run`` may take above the baseline."""


def commands() -> dict[str, list[str]]:
    python = sys.executable
    return {
        "baseline": [python, "-c", "import trio"],
        "help": [python, "-m", "trioflow", "--help"],
        "run": [python, "-m", "trioflow", "run", "What is 25 * 4?", "--json", "--pace", "0"],
    }


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def check(argv: list[str], env: dict[str, str]) -> None:
    """Run ``argv`` once: it must succeed (a broken command starts fast)."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")


Times = tuple[dict[str, list[float]], dict[str, float]]
"""Each command's wall times and its mean CPU time, in seconds."""


def with_hyperfine(
    cmds: dict[str, list[str]], env: dict[str, str], samples: int, warmup: int
) -> Times:
    """Each command's times, measured by ``hyperfine`` (without a shell)."""
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "results.json"
        argv = ["hyperfine", "--shell=none", "--warmup", str(warmup), "--runs", str(samples)]
        argv += ["--style", "basic", "--export-json", str(export)]
        for name, cmd in cmds.items():
            argv += ["--command-name", name, shlex.join(cmd)]
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        results = json.loads(export.read_text())["results"]
    wall = {r["command"]: [float(t) for t in r["times"]] for r in results}
    return wall, {r["command"]: float(r["user"]) + float(r["system"]) for r in results}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def by_subprocess(
    cmds: dict[str, list[str]], env: dict[str, str], samples: int, warmup: int
) -> Times:
    """Each command's times, timing ``subprocess.run`` here (interleaved rounds)."""
    wall: dict[str, list[float]] = {name: [] for name in cmds}
    cpu: dict[str, list[float]] = {name: [] for name in cmds}
    for round_ in range(warmup + samples):
        for name, cmd in cmds.items():  # interleaved: interference spreads over all
            cpu_start, start = _cpu(), time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            if round_ >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(_cpu() - cpu_start)
    return wall, {name: statistics.fmean(c) for name, c in cpu.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20, help="timed runs of each (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--quick", action="store_true", help="5 timed runs of each")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--no-hyperfine", action="store_true", help="time the subprocesses here")
    args = parser.parse_args(argv)
    samples = 5 if args.quick else args.samples
    cmds, env = commands(), environment()
    for cmd in cmds.values():
        check(cmd, env)
    tool = "subprocess"
    if not args.no_hyperfine and shutil.which("hyperfine"):
        tool = "hyperfine"
        times, cpu = with_hyperfine(cmds, env, samples, args.warmup)
    else:
        times, cpu = by_subprocess(cmds, env, samples, args.warmup)
    medians = {name: statistics.median(t) for name, t in times.items()}
    over = {name: medians[name] - medians["baseline"] for name in cmds}
    result = {
        "tool": tool,
        "samples": samples,
        "median_s": medians,
        "min_s": {name: min(t) for name, t in times.items()},
        "over_baseline_s": over,
        "cpu_s": cpu,
        "target_s": TARGET,
        "run_within_target": over["run"] <= TARGET,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"{samples} runs each, timed with {tool}"
    )
    print("| command | median (ms) | min (ms) | over baseline (ms) | CPU (ms) |")
    print("|---|--:|--:|--:|--:|")
    for name, cmd in cmds.items():
        shown = shlex.join(["python", *cmd[1:]])
        print(
            f"| `{shown}` | {medians[name] * 1e3:.0f} | {min(times[name]) * 1e3:.0f} "
            f"| {over[name] * 1e3:+.0f} | {cpu[name] * 1e3:.0f} |"
        )
    verdict = "within" if result["run_within_target"] else "OVER"
    print(f"run: {over['run'] * 1e3:+.0f} ms over the baseline, {verdict} the {TARGET:g} s target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
