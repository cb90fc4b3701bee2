"""How long the `gradtrace` command takes to answer without running a stage: `--help`, a subcommand's `--help`,
and one-line refusals of bad arguments (a missing option, a value that is not a number, a spec's own check).

Each case runs as a fresh process (`python -m gradtrace.cli ...`), `--repeats` times after one warm-up run; the
median wall time is printed per case. `--baseline-src DIR` runs the same cases with another tree's `src` (e.g.
`git archive COMMIT src | tar -x -C /tmp/gradtrace-COMMIT`) on PYTHONPATH, alternating with this tree's, and
prints the ratio of the medians.

    nice .venv/bin/python bench/bench_cli_startup.py [--repeats 5] [--baseline-src /tmp/gradtrace-COMMIT/src]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CASES = {
    "--help": ["--help"],
    "attribute --help": ["attribute", "--help"],
    "missing option": ["attribute", "--train", "t"],
    "not a number": ["learn-weights", "--train", "t", "--queries", "q", "--k", "1.5"],
    "spec check": ["attribute", "--train", "t", "--queries", "q", "--out", "o", "--weights", "w", "--aspect", "a"],
}


def run_once(src: Path, argv: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gradtrace.cli", *argv], env=env, capture_output=True)
    return time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-src", type=Path, default=None, help="another tree's src/ to compare against")
    args = parser.parse_args()
    trees = [("this tree", SRC)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
    print(f"python {sys.version.split()[0]}; {args.repeats} runs per case after one warm-up; median wall seconds")
    print("| case | exit code | " + " | ".join(name for name, _ in trees) + (" | ratio |" if len(trees) > 1 else ""))
    for case, argv in CASES.items():
        times: dict[str, list[float]] = {name: [] for name, _ in trees}
        codes = set()
        for name, src in trees:
            run_once(src, argv)  # warm-up (the file cache)
        for _ in range(args.repeats):
            for name, src in trees:  # alternated, so a change in the machine's load hits both alike
                seconds, code = run_once(src, argv)
                times[name].append(seconds)
                codes.add(code)
        medians = [statistics.median(times[name]) for name, _ in trees]
        row = f"| {case} | {','.join(map(str, sorted(codes)))} | " + " | ".join(f"{m:.2f}" for m in medians)
        print(row + (f" | {medians[1] / medians[0]:.1f}x |" if len(trees) > 1 else ""))


if __name__ == "__main__":
    main()
