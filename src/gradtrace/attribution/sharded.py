"""Scoring split over the ranks of a torchrun job, without copying a store: the `attribute` of one process.

    doc = attribute_sharded(train_path, query_path, out, rank=r, world=P, ...)   # the last rank returns the document

Rows of rank r: of a complete store, the contiguous block [r·N/P, (r+1)·N/P); of a node's partial store (written
by featurize's ranks on a machine without a shared filesystem, chunks c with c % P == r), rank r's own chunks, which
must be recorded there. Each rank reads only its rows.

The fit: the Gram blocks of a λ kernel are sums over rows, so each rank accumulates its rows' share in float64 and an
all-reduce (gloo) sums the shares; every rank then solves the same K. It equals one process's K up to the order of
the float64 summation (ranks' partial sums, then their sum), so scores agree with one process's to float32 rounding,
not bitwise. TracIn's kernel is the identity: nothing to share.

The merge: each rank keeps the top-k of its rows with their per-group contributions (and, when the dense scores are
small enough to save, its columns of them) and sends it to the last rank, which keeps the k best per query by the
rule of one process (descending score, ties to the lower index) and writes the artefact one process would have
written. Anything a rank refuses (a missing chunk, bad features) stops every rank with the same one-line message.
"""
from __future__ import annotations

import datetime

import numpy as np
import torch
import torch.distributed as dist

from gradtrace.attribution.gram_cache import load_gram, save_gram, wants_cache
from gradtrace.attribution.output import FULL_SCORES_MAX, query_side_for, topk_contributions, write_topk_attributions
from gradtrace.attribution.scoring import at_c, scoring_settings
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.methods.rows import effective_chunk_rows, row_chunks
from gradtrace.methods.topk import sort_desc_then_index
from gradtrace.methods.trak import Gram, add_chunk_gram, has_dual_blocks, kernel_spans

TIMEOUT = datetime.timedelta(minutes=30)  # how long a rank waits for the others at a collective


class ShardRows:
    """A read-only (n, k) row view of `source` over the global row ranges `ranges`, in their order: local row i is
    the i-th row of the ranges. Slices read only their rows (a view when they fall in one range)."""

    ndim = 2

    def __init__(self, source, ranges: list[tuple[int, int]]):
        self.source = source
        self.ranges = [(int(a), int(b)) for a, b in ranges if b > a]
        self.offsets = np.cumsum([0] + [b - a for a, b in self.ranges])
        self.shape = (int(self.offsets[-1]), int(source.shape[1]))
        self.dtype = np.dtype(source.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def global_rows(self, local) -> np.ndarray:
        """Global row indices of local rows `local` (any shape)."""
        local = np.asarray(local, dtype=np.int64)
        which = np.searchsorted(self.offsets, local, side="right") - 1
        starts = np.asarray([a for a, _ in self.ranges], dtype=np.int64)
        return starts[which] + (local - self.offsets[which])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("ShardRows takes row slices of step 1")
            parts = []
            for (a, b), off in zip(self.ranges, self.offsets):
                lo, hi = max(start, off), min(stop, off + b - a)
                if lo < hi:
                    parts.append(self.source[a + lo - off:a + hi - off])
            if len(parts) == 1:
                return parts[0]
            return np.concatenate(parts) if parts else np.asarray(self.source[0:0])
        if isinstance(key, tuple):
            raise IndexError("ShardRows takes row indices only")
        return self.source[self.global_rows(key)]


def shard_ranges(store: FeatureStore, rank: int, world: int) -> list[tuple[int, int]]:
    """Rank `rank`'s rows: a contiguous block of a complete store, else its own chunks (c % world == rank), which
    must all be recorded in this (partial) store."""
    n = len(store.ids)
    if store.complete:
        return [(rank * n // world, (rank + 1) * n // world)]
    bounds = store._progress().bounds
    mine = [c for c in range(len(bounds)) if c % world == rank]
    missing = sorted(set(mine) - set(store._progress().done()))
    if missing:
        a, b = bounds[missing[0]]
        raise UserError(f"rank {rank} of {world} scores the chunks c % {world} == {rank} of {store.path}, but "
                        f"{len(missing)} of them are not in this partial store (rows {a}..{b - 1} first); run with "
                        f"the ranks that featurized it, or finish the store")
    return [bounds[c] for c in mine]


def agree(group, action):
    """Run `action` on every rank; if any rank raised, every rank raises (the failing one its own error, the others
    its message in one line), so no rank waits forever at a later collective. Returns the action's result."""
    failure, message, result = None, None, None
    try:
        result = action()
    except Exception as exc:  # noqa: BLE001 - told to every rank, then raised again here
        failure = exc
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    messages = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, message, group=group)
    if failure is not None:
        raise failure
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise UserError(f"another rank stopped: {first}")
    return result


def gram_share(rows: ShardRows, group_slices: list[tuple[str, int, int]], kernel: str, *,
               chunk_rows: int = 65536, progress: bool = False) -> list[np.ndarray]:
    """This rank's share of the Gram blocks, the sum over its rows of φ_jᵀ φ_j in float64 (NaN/Inf refused)."""
    k = rows.shape[1]
    spans = kernel_spans(kernel, group_slices, k)
    blocks = [np.zeros((e - s, e - s), dtype=np.float64) for s, e in spans]
    step = effective_chunk_rows(chunk_rows, 8 * k)
    for start, stop in row_chunks(len(rows), step, progress=progress, desc="gram (this rank's rows)"):
        x = rows[start:stop]
        if not add_chunk_gram(blocks, x, spans):
            bad = np.flatnonzero(~np.isfinite(np.asarray(x, dtype=np.float64)).all(axis=1))
            shown = ", ".join(str(int(r)) for r in rows.global_rows(bad[:5] + start))
            raise UserError(f"training features contain NaN/Inf in rows {shown}; re-featurize those examples (or "
                            "drop them) before scoring")
    return blocks


def all_reduce_blocks(blocks: list[np.ndarray], group) -> list[np.ndarray]:
    """The sum over ranks of each float64 block (one all-reduce of their concatenation)."""
    flat = torch.from_numpy(np.concatenate([b.reshape(-1) for b in blocks]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, at = [], 0
    for b in blocks:
        out.append(flat[at:at + b.size].numpy().reshape(b.shape).copy())
        at += b.size
    return out


def attribute_sharded(train_path, query_path, out, *, rank: int, world: int, method, kernel: str, c=None,
                      weights_path=None, aspect: str | None = None, learning_queries=None, top_k: int = 10,
                      spec: dict | None = None, progress: bool = True) -> dict | None:
    """`write_attributions` over `world` ranks (see the module docstring): the last rank writes `out` and returns
    the document, the others return None."""
    created = not dist.is_initialized()
    if created:
        try:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"scoring over {world} ranks needs torchrun's rendezvous (MASTER_ADDR, MASTER_PORT): "
                            f"{str(exc).splitlines()[0][:160]}; launch with torchrun") from None
    try:
        return _attribute(train_path, query_path, out, rank=rank, world=world, method=method, kernel=kernel, c=c,
                          weights_path=weights_path, aspect=aspect, learning_queries=learning_queries,
                          top_k=top_k, spec=spec, progress=progress)
    finally:
        if created:
            dist.destroy_process_group()


def _attribute(train_path, query_path, out, *, rank, world, method, kernel, c, weights_path, aspect,
               learning_queries, top_k, spec, progress):
    group = dist.group.WORLD

    def prepare():
        train = FeatureStore.open(train_path, require_complete=False)
        queries = FeatureStore.open(query_path)
        n = len(train.ids)
        if top_k < 1 or top_k > n:
            raise UserError(f"--top-k must be in 1..{n} (the training set size), got {top_k}")
        if learning_queries is not None and not train.complete:
            raise UserError("--lambda-c auto reads every training row, which a partial store lacks; pass a number "
                            "(e.g. the c chosen on the merged store) or score the complete store")
        weights, info, c_value, lam = scoring_settings(train, queries, method=method, kernel=kernel, c=c,
                                                       weights_path=weights_path, aspect=aspect,
                                                       learning_queries=learning_queries)
        base = at_c(method, kernel, c_value)
        if base.needs_model:
            raise UserError(f"method '{base.name}' scores the model directly; run attribute without torchrun")
        base.check_measurement(train.settings["measurement"]["name"], str(train.path))
        if not (base.kernel_kind == "identity" or base.shares_gram):
            raise UserError(f"method '{base.name}' cannot split its fit over ranks; run attribute without torchrun")
        if base.shares_gram and has_dual_blocks(base.kernel_kind, train.group_slices, n):
            raise UserError(f"a kernel block is wider than the {n} training rows (solved in its dual form, which "
                            "needs every row at once); run attribute without torchrun")
        rows = ShardRows(train.features, shard_ranges(train, rank, world))
        cached = load_gram(train, base.kernel_kind)[0] if wants_cache(train, base) else None
        return train, queries, weights, info, lam, base, rows, cached

    train, queries, weights, w_info, lam, base, rows, cached = agree(group, prepare)
    blocks, cache = None, None
    if base.shares_gram:  # the cache when every rank read it, else each rank's share of the sums
        hit = torch.tensor([int(cached is not None)])
        dist.all_reduce(hit, op=dist.ReduceOp.MIN, group=group)
        if hit.item():
            blocks, cache = cached.blocks, "hit"
        else:
            share = agree(group, lambda: gram_share(rows, train.group_slices, base.kernel_kind, progress=progress))
            blocks = all_reduce_blocks(share, group)
            if rank == world - 1 and wants_cache(train, base):
                gram = Gram(kernel=base.kernel_kind, blocks=blocks, group_slices=train.group_slices,
                            n=len(train.ids), dual=[False] * len(blocks))
                cache = "written" if save_gram(train, gram, ranks=world) else "not writable"
    full = len(queries.ids) * len(train.ids) <= FULL_SCORES_MAX
    partial = agree(group, lambda: score_shard(train, queries, base, rows, blocks, weights, top_k, full=full,
                                               query_side=query_side_for(train, kernel), progress=progress))
    last = world - 1
    gathered = [None] * world if rank == last else None
    dist.gather_object(partial, gathered, dst=last, group=group)
    if rank != last:
        return None
    idx, top, contrib, scores, info = merge_partials(gathered, top_k, len(train.ids), len(queries.ids))
    if cache is not None:
        info["gram_cache"] = cache
    return write_topk_attributions(train, queries, out, idx=idx, top=top, contrib=contrib, scores=scores,
                                   method_info=info, weights_info=w_info, lambda_info=lam, top_k=top_k, spec=spec,
                                   extra={"ranks": world})


def score_shard(train: FeatureStore, queries: FeatureStore, base, rows: ShardRows, blocks, weights, top_k: int, *,
                full: bool, query_side: bool, progress: bool) -> dict:
    """This rank's partial result: global rows (Q, k'), scores (Q, k'), weighted contributions (Q, k', M), its
    columns of the dense scores when `full`, its row ranges and the fitted method's info."""
    n_q, m = len(queries.ids), len(train.group_slices)
    if len(rows) == 0:
        return {"rows": np.zeros((n_q, 0), np.int64), "scores": np.zeros((n_q, 0), np.float32),
                "contrib": np.zeros((n_q, 0, m), np.float32), "dense": np.zeros((n_q, 0), np.float32) if full
                else None, "ranges": [], "info": None}
    scale = None
    if base.needs_row_scale:
        scale = np.concatenate([train.row_scale[a:b] for a, b in rows.ranges])
    slices = train.group_slices
    if blocks is not None:
        gram = Gram(kernel=base.kernel_kind, blocks=blocks, group_slices=slices, n=len(rows),
                    dual=[False] * len(blocks))
        side = query_side and not base.needs_row_scale and base.supports_query_side
        fitted = base.fit(rows, slices, gram=gram, query_side=side, row_scale=scale, progress=progress)
    else:
        fitted = base.fit(rows, slices, progress=progress)
    qf = np.asarray(queries.features)
    idx, top = fitted.topk(qf, min(top_k, len(rows)), weights, progress=progress)
    return {"rows": rows.global_rows(idx), "scores": top, "contrib": topk_contributions(fitted, qf, idx, weights),
            "dense": fitted.scores(qf, weights) if full else None, "ranges": rows.ranges, "info": fitted.info}


def merge_partials(partials: list[dict], top_k: int, n: int, n_q: int):
    """(rows (Q, k), scores, contributions (Q, k, M), dense (Q, N) or None, method info) from the ranks' partials:
    the k best per query by descending score, ties to the lower row, as one process's running top-k keeps them."""
    rows = np.concatenate([p["rows"] for p in partials], axis=1)
    vals = np.concatenate([p["scores"] for p in partials], axis=1)
    contrib = np.concatenate([p["contrib"] for p in partials], axis=1)
    order = sort_desc_then_index(vals, rows)[:, :top_k]
    idx, top = np.take_along_axis(rows, order, 1), np.take_along_axis(vals, order, 1)
    contrib = np.take_along_axis(contrib, order[:, :, None], 1)
    dense = None
    if all(p["dense"] is not None for p in partials):
        dense = np.empty((n_q, n), dtype=np.float32)
        for p in partials:
            if p["ranges"]:
                dense[:, np.concatenate([np.arange(a, b) for a, b in p["ranges"]])] = p["dense"]
    info = dict(next(p["info"] for p in reversed(partials) if p["info"] is not None))
    info["N"] = int(n)
    return idx, top, contrib, dense, info
