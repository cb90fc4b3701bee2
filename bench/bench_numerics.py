"""What the torch thread count changes: one digits store featurized with OMP_NUM_THREADS=1 and with 2, and the
attributions of each.

    nice .venv/bin/python bench/bench_numerics.py                    # N=256 training, 64 held-out queries
    nice .venv/bin/python bench/bench_numerics.py --n 128 --json numerics.json

A tiny digits UNet is trained once (one thread); its training set and 64 held-out digits are featurized with the
default settings (Kronecker projection, 8,192 dimensions, 10 timesteps) in fresh processes under 1 and under 2
threads, and attributed (TRAK per-group, TracIn; top-10) from each pair of stores and from the mixed pair
(1-thread training rows, 2-thread queries). Reported: rows whose bytes differ, the largest absolute and
row-relative feature difference, whether the top-10 ids are identical, and the largest score difference
relative to each query's largest |score|.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

METHODS = {"trak-per-group": ["--method", "trak", "--kernel", "per-group"], "tracin": ["--method", "tracin"]}


def cli(args: list, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "gradtrace.cli", *map(str, args), "--no-progress"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def compare_features(a: Path, b: Path) -> dict:
    x, y = np.load(a / "features.npy"), np.load(b / "features.npy")
    diff = np.abs(x.astype(np.float64) - y)
    norm = np.linalg.norm(x.astype(np.float64), axis=1)
    return {"rows": int(len(x)), "rows_with_other_bytes": int((x != y).any(axis=1).sum()),
            "max_abs_diff": float(diff.max()), "max_row_relative_diff": float((diff.max(axis=1) / norm).max())}


def compare_runs(a: Path, b: Path) -> dict:
    ia, ib = np.load(a / "topk_ids.npy"), np.load(b / "topk_ids.npy")
    sa, sb = np.load(a / "scores.npy").astype(np.float64), np.load(b / "scores.npy").astype(np.float64)
    scale = np.abs(sa).max(axis=1, keepdims=True)
    return {"queries": int(len(ia)), "topk_identical_queries": int((ia == ib).all(axis=1).sum()),
            "topk_sets_identical_queries": int(sum(set(p) == set(q) for p, q in zip(ia, ib))),
            "max_score_diff_rel_to_query_max": float((np.abs(sa - sb) / scale).max())}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="training examples")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gradtrace-numerics-"))
    cli(["train", "--data", "digits", "--n", args.n, "--steps", args.steps, "--out", root / "ckpt"], 1)
    (root / "queries.txt").write_text("\n".join(str(i) for i in range(args.n, args.n + 64)) + "\n")
    for t in (1, 2):
        cli(["featurize", "--checkpoint", root / "ckpt", "--out", root / f"train-{t}"], t)
        cli(["featurize", "--checkpoint", root / "ckpt", "--data", "digits", "--ids", root / "queries.txt",
             "--out", root / f"queries-{t}"], t)
    out = {"n_train": args.n, "n_queries": 64, "features": {
        "train": compare_features(root / "train-1", root / "train-2"),
        "queries": compare_features(root / "queries-1", root / "queries-2")}, "attributions": {}}
    for name, flags in METHODS.items():
        for label, (tr, qu) in {"1": (1, 1), "2": (2, 2), "mixed": (1, 2)}.items():
            cli(["attribute", "--train", root / f"train-{tr}", "--queries", root / f"queries-{qu}", *flags,
                 "--top-k", 10, "--out", root / f"attr-{name}-{label}"], 1)
        out["attributions"][name] = {
            "2 threads vs 1": compare_runs(root / f"attr-{name}-1", root / f"attr-{name}-2"),
            "mixed vs 1": compare_runs(root / f"attr-{name}-1", root / f"attr-{name}-mixed")}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
