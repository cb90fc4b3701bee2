#!/usr/bin/env python
"""Training step time by AdamW implementation: gradtrace's fused kernel against torch's foreach and
per-tensor loop implementations of the same update, measured in the same run.

    python bench/bench_train_step.py                       # digits model, 1 and 2 concurrent workers
    python bench/bench_train_step.py --steps 100 --rounds 2  # shorter

Each measurement is one call of `gradtrace.adapters.diffusion.train` (the real training loop: batch draw, noise,
forward, backward, clipping, AdamW, LR schedule) on 1,000 sklearn digits with the default 8x8 unconditional model,
batch 64, torch single-threaded; only the optimizer implementation is swapped. The implementations are
interleaved round by round, so drifts in machine load hit all of them alike. With --workers 2, two
processes train at once, as the retraining harness does on two cores. Prints a markdown table: median
ms/step over rounds and workers, and the ratio to the foreach implementation (the one gradtrace used before).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import time

IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False, "fused": False}}


def _one(impl: str, steps: int, queue) -> None:
    import torch

    torch.set_num_threads(1)
    from gradtrace.adapters.diffusion import TrainConfig, default_model_config, train
    from gradtrace.data.registry import load_dataset

    reference = torch.optim.AdamW

    def adamw(params, **options):
        options.pop("fused", None)
        options.pop("foreach", None)
        return reference(params, **options, **IMPLS[impl])

    torch.optim.AdamW = adamw
    model = train(default_model_config("unconditional", channels=1, size=8), load_dataset("digits", n=1000),
                  TrainConfig(steps=steps), progress=False)
    queue.put(float(model.train_log["ms_per_step"]))


def measure(impl: str, steps: int, workers: int) -> list[float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_one, args=(impl, steps, queue)) for _ in range(workers)]
    for p in procs:
        p.start()
    out = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a worker for {impl} failed (exit {p.exitcode})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per implementation")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="concurrent processes")
    args = ap.parse_args(argv)
    if args.steps < 10 or args.rounds < 1 or min(args.workers) < 1:
        print("error: --steps must be >= 10, --rounds and --workers >= 1", file=sys.stderr)
        return 2
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()} ({mp.cpu_count()} CPUs), "
             f"{args.steps} steps × {args.rounds} rounds.", "",
             "| workers | AdamW | ms/step (median) | range | ratio to foreach |", "|---|---|---|---|---|"]
    for w in args.workers:
        times: dict[str, list[float]] = {k: [] for k in IMPLS}
        for _ in range(args.rounds):
            for impl in IMPLS:
                times[impl] += measure(impl, args.steps, w)
        base = statistics.median(times["foreach"])
        for impl, t in times.items():
            med = statistics.median(t)
            lines.append(f"| {w} | {impl} | {med:.1f} | {min(t):.1f}–{max(t):.1f} | {med / base:.2f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
