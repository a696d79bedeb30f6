"""Run a benchmark on a base revision and on the working tree, side by side, and compare its figures.

    python benchmarks/against.py [--rounds 3] [--figures REGEX] REV BENCHMARK [ARGS...]

``REV`` is any git revision (a commit, a branch, ``HEAD``); ``BENCHMARK`` a script path relative
to the repository root (``benchmarks/bench_importance.py``), run as ``python BENCHMARK ARGS...``.

* The base revision is checked out in a temporary ``git worktree`` (detached, removed afterwards,
  even after an error or Ctrl-C) and its code is imported by running the benchmark with
  ``PYTHONPATH`` set to that checkout; the current code is the working tree, uncommitted changes
  included, with ``PYTHONPATH`` set to the repository root. Each run starts in its tree's root.
* The benchmark script is the base revision's own when it exists there (a benchmark written against
  the base's internals), else the working tree's; ``--script current`` takes the working tree's
  for both (a script that runs on both trees and prints figures the old one did not); the output
  says which.
* The two are run alternately, ``--rounds`` times, the first of each round alternating (base first
  in round 1, current first in round 2, …), so that a change of the machine's load hits both alike.
* Figures are read from the benchmark's standard output: every line that is a JSON object, alone or
  after a ``name:`` prefix (``mlp: {...}``; nested keys are joined with dots, ``mlp.exact_s``), and
  every ``name: number`` line. Booleans and strings are not figures.
* Printed: for each figure, the median over rounds of base and current and ``ratio = current / base``
  (the figure's own direction decides whether a ratio above 1 is better), then one JSON line with
  the same, the rounds' values, the revisions and the scripts used.

A figure that is not in every run of both trees is listed, not compared. Exit status: 0, or 2 when
a run fails (the end of its output is shown).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

_NUMBER = re.compile(r"^\s*([A-Za-z_][\w .\-/]*?)\s*[:=]\s*(-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_PREFIXED_JSON = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*:\s*(\{.*\})\s*$")


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield prefix, float(value)


def parse_figures(output: str) -> dict[str, float]:
    """The figures a benchmark printed (module docs): ``{name: value}``, a later line winning."""
    figures: dict[str, float] = {}
    for line in output.splitlines():
        text = line.strip()
        prefix, body = "", None
        if text.startswith("{") and text.endswith("}"):
            body = text
        else:
            match = _PREFIXED_JSON.match(text)
            if match:
                prefix, body = match.group(1), match.group(2)
        if body is not None:
            try:
                figures.update(_flatten(json.loads(body), prefix))
                continue
            except ValueError:
                pass
        match = _NUMBER.match(text)
        if match:
            figures[match.group(1).strip()] = float(match.group(2))
    return figures


def _git(root: Path, *arguments: str) -> str:
    result = subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"against.py: git {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _run(script: Path, arguments: list[str], tree: Path, timeout: float | None) -> tuple[dict[str, float], float]:
    """Run ``python script arguments`` in ``tree`` with ``PYTHONPATH=tree``; its figures and wall seconds."""
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(script), *arguments], cwd=tree, env=environment,
                            capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise RuntimeError(f"{script} failed with status {result.returncode} in {tree}:\n{tail}")
    return parse_figures(result.stdout), seconds


def _format(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"


def compare(root: Path, revision: str, benchmark: str, arguments: list[str], rounds: int,
            pattern: str | None = None, timeout: float | None = None, script: str = "base") -> dict[str, Any]:
    """Run the comparison (module docs) and return its report; prints progress and the table."""
    commit = _git(root, "rev-parse", "--verify", f"{revision}^{{commit}}")
    described = _git(root, "log", "-1", "--format=%h %s", commit)
    script_here = (Path.cwd() / benchmark if (Path.cwd() / benchmark).is_file() else root / benchmark).resolve()
    relative = script_here.relative_to(root.resolve()).as_posix()
    base_has_script = script == "base" and subprocess.run(
        ["git", "-C", str(root), "cat-file", "-e", f"{commit}:{relative}"], capture_output=True).returncode == 0
    if not base_has_script and not script_here.is_file():
        raise SystemExit(f"against.py: {relative} exists neither at {revision} nor in the working tree")
    scratch = Path(tempfile.mkdtemp(prefix="against_"))
    base_tree = scratch / "base"
    _git(root, "worktree", "add", "--detach", str(base_tree), commit)
    try:
        base_script = base_tree / relative if base_has_script else script_here
        print(f"base:    {revision} = {described} (temporary worktree {base_tree})")
        print(f"current: the working tree {root}")
        whose = "of each tree" if base_has_script else (
            "of the working tree for both (--script current)" if script == "current"
            else f"of the working tree (absent at {revision})")
        print(f"script:  {relative} {whose}"
              f"; arguments: {' '.join(arguments) or '(none)'}; {rounds} rounds, alternating")
        runs: dict[str, list[dict[str, float]]] = {"base": [], "current": []}
        seconds: dict[str, list[float]] = {"base": [], "current": []}
        trees = {"base": (base_script, base_tree), "current": (script_here, root)}
        for number in range(rounds):
            order = ("base", "current") if number % 2 == 0 else ("current", "base")
            for side in order:
                figures, wall = _run(trees[side][0], arguments, trees[side][1], timeout)
                runs[side].append(figures)
                seconds[side].append(wall)
                print(f"round {number + 1}/{rounds}: {side} done in {wall:.1f} s ({len(figures)} figures)", flush=True)
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(base_tree)], capture_output=True)
        subprocess.run(["git", "-C", str(root), "worktree", "prune"], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    selector = re.compile(pattern) if pattern else None
    names = [name for name in dict.fromkeys([*runs["current"][0], *runs["base"][0]])
             if selector is None or selector.search(name)]
    figures: dict[str, dict[str, Any]] = {}
    unmatched = []
    for name in names:
        values = {side: [run[name] for run in runs[side] if name in run] for side in runs}
        if len(values["base"]) != rounds or len(values["current"]) != rounds:
            unmatched.append(name)
            continue
        base, current = statistics.median(values["base"]), statistics.median(values["current"])
        figures[name] = {"base": base, "current": current, "ratio": current / base if base else None,
                         "base_rounds": values["base"], "current_rounds": values["current"]}
    width = max([len(name) for name in figures] + [6])
    print(f"\n{'figure':<{width}}  {'base':>12}  {'current':>12}  {'current/base':>12}")
    for name, row in figures.items():
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"{name:<{width}}  {_format(row['base']):>12}  {_format(row['current']):>12}  {ratio:>12}")
    if unmatched:
        print(f"not in every run of both trees (not compared): {', '.join(unmatched)}")
    report = {"base_revision": revision, "base_commit": commit, "benchmark": relative, "arguments": arguments,
              "base_script": "base revision's" if base_has_script else "working tree's", "rounds": rounds,
              "wall_seconds": seconds, "figures": figures, "not_compared": unmatched}
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating (default 3)")
    parser.add_argument("--figures", default=None, help="compare only figures whose name matches this regex")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to one run")
    parser.add_argument("--script", choices=("base", "current"), default="base",
                        help="whose benchmark script the base runs: the base revision's when it has one "
                             "(default), or the working tree's")
    parser.add_argument("revision", metavar="REV", help="the base revision (commit, branch, tag)")
    parser.add_argument("benchmark", metavar="BENCHMARK", help="the benchmark script, relative to the repository root")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    root = Path(_git(Path.cwd(), "rev-parse", "--show-toplevel"))
    try:
        report = compare(root, args.revision, args.benchmark, args.arguments, args.rounds, args.figures, args.timeout,
                         args.script)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"against.py: {error}", file=sys.stderr)
        return 2
    return 0 if report["figures"] else 2


if __name__ == "__main__":
    sys.exit(main())
