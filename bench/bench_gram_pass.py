"""What the per-group TRAK fit's Gram pass costs against the scoring floor, and what float32 products would change.

    nice .venv/bin/python bench/bench_gram_pass.py STORE [--rows 16384] [--precision-store TRAIN QUERIES]

On the first ROWS rows of a feature store (e.g. bench_scoring_floor.py's, kept with --keep), each timed once, in
one process: the floor (1,000 random queries times the rows, float32, chunked as `FittedMethod.topk`), the library's
Gram pass (`accumulate_gram`: float64 products per group), float64 products through torch, and float32 products
(torch bmm over the 16 groups at once) summed in float64 across chunks. With --precision-store, the scores of a real
store's queries under K from float32-product Gram blocks against K from float64 ones: the largest difference per
query relative to its largest |score|, and the top-10 overlap, at c = 0.01 and 1e-4.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from gradtrace.features.store import FeatureStore
from gradtrace.methods.rows import effective_chunk_rows, row_chunks
from gradtrace.methods.trak import accumulate_gram, regularised_inverse


def timed(label: str, fn, floor: float | None = None):
    start = time.perf_counter()
    out = fn()
    took = time.perf_counter() - start
    ratio = "" if floor is None else f" ({took / floor:.2f}x the floor)"
    print(f"{label}: {took:.2f} s{ratio}", flush=True)
    return took, out


def gram_float32(phi, spans, rows):
    """Float32 products of each chunk (one bmm over equal-width groups), float64 sums across chunks."""
    widths = {e - s for s, e in spans}
    if len(widths) != 1:
        raise SystemExit("the float32 bmm variant needs groups of equal width")
    w = widths.pop()
    out = torch.zeros((len(spans), w, w), dtype=torch.float64)
    for a, b in row_chunks(len(phi), rows):
        x = torch.from_numpy(np.array(phi[a:b], dtype=np.float32)).view(b - a, len(spans), w).transpose(0, 1)
        out += torch.bmm(x.transpose(1, 2), x).double()
    return list(out.numpy())


def gram_torch64(phi, spans, rows):
    blocks = [np.zeros((e - s, e - s)) for s, e in spans]
    for a, b in row_chunks(len(phi), rows):
        x = phi[a:b]
        for block, (s, e) in zip(blocks, spans):
            xs = torch.from_numpy(np.array(x[:, s:e], dtype=np.float64))
            block += (xs.T @ xs).numpy()
    return blocks


def precision(train: FeatureStore, queries: FeatureStore) -> None:
    phi = np.asarray(train.features, dtype=np.float32)
    q = np.asarray(queries.features, dtype=np.float64)
    for c in (0.01, 1e-4):
        s64 = np.zeros((len(q), len(phi)))
        s32 = np.zeros_like(s64)
        for _, a, b in train.group_slices:
            x = phi[:, a:b]
            g64 = x.astype(np.float64).T @ x.astype(np.float64)
            g32 = np.zeros_like(g64)
            for s in range(0, len(x), 4096):
                g32 += (x[s:s + 4096].T @ x[s:s + 4096]).astype(np.float64)
            s64 += q[:, a:b] @ regularised_inverse(g64, c)[0] @ x.T.astype(np.float64)
            s32 += q[:, a:b] @ regularised_inverse(g32, c)[0] @ x.T.astype(np.float64)
        err = np.abs(s32 - s64).max(1) / np.abs(s64).max(1)
        top64, top32 = np.argsort(-s64, 1)[:, :10], np.argsort(-s32, 1)[:, :10]
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top64, top32)])
        print(f"float32-product Gram, c = {c:g}: score difference / largest |score| max {err.max():.2e}, median "
              f"{np.median(err):.2e}; top-10 overlap {overlap:.4f} ({len(phi)} rows, {phi.shape[1]} columns, "
              f"{len(train.group_slices)} groups)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--precision-store", nargs=2, metavar=("TRAIN", "QUERIES"))
    args = p.parse_args()
    store = FeatureStore.open(args.store)
    phi = store.features[:args.rows]
    k = phi.shape[1]
    slices = store.group_slices
    spans = [(s, e) for _, s, e in slices]
    np.array(phi)  # into the page cache
    q = np.random.default_rng(0).standard_normal((args.queries, k), dtype=np.float32)
    print(f"{args.rows} rows x {k} columns ({len(slices)} groups), {args.queries} queries; "
          f"load {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}", flush=True)
    step = effective_chunk_rows(65536, 4 * (k + args.queries))
    floor, _ = timed("floor", lambda: [q @ np.asarray(phi[a:b], dtype=np.float32).T
                                       for a, b in row_chunks(len(phi), step)])
    _, ref = timed("Gram pass (accumulate_gram, float64)", lambda: accumulate_gram(phi, slices, "per-group").blocks,
                   floor)
    rows = effective_chunk_rows(65536, 8 * k)
    _, t64 = timed("Gram, torch float64 per group", lambda: gram_torch64(phi, spans, rows), floor)
    _, f32 = timed("Gram, float32 products (torch bmm), float64 sums", lambda: gram_float32(phi, spans, rows), floor)
    for label, got in (("torch float64", t64), ("float32 products", f32)):
        rel = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(got, ref))
        print(f"{label} vs accumulate_gram: largest entry difference / largest entry {rel:.1e}")
    if args.precision_store:
        precision(FeatureStore.open(args.precision_store[0]), FeatureStore.open(args.precision_store[1]))


if __name__ == "__main__":
    main()
