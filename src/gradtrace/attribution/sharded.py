"""Scoring split over the ranks of a torchrun job, without copying a store: the `attribute` of one process.

    doc = attribute_sharded(train_path, query_path, out, rank=r, world=P, ...)   # the last rank returns the document

Each rank reads only its rows of the store and fits the method on them with the job's kernel
(`gradtrace.attribution.shard_fit`: which rows, the Gram shares summed over ranks): scores agree with one process's
to float32 rounding, not bitwise (the float64 Gram is summed in another order).

The merge: each rank keeps the top-k of its rows with their per-group contributions (and, when the dense scores are
small enough to save, its columns of them) and sends it to the last rank, which keeps the k best per query by the
rule of one process (descending score, ties to the lower index) and writes the artefact one process would have
written. Anything a rank refuses (a missing chunk, bad features) stops every rank with the same one-line message.
"""
from __future__ import annotations

import numpy as np
import torch.distributed as dist

from gradtrace.attribution.output import FULL_SCORES_MAX, query_side_for, topk_contributions, write_topk_attributions
from gradtrace.attribution.scoring import at_c, scoring_settings, weights_inside
from gradtrace.attribution.shard_fit import check_splittable, fit_shard, gram_share, shard_ranges, shared_gram
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.methods.rows import ShardRows
from gradtrace.methods.topk import sort_desc_then_index
from gradtrace.ranks import agree, process_group

__all__ = ["attribute_sharded", "score_shard", "merge_partials", "ShardRows", "shard_ranges", "gram_share"]


def attribute_sharded(train_path, query_path, out, *, rank: int, world: int, method, kernel: str, c=None,
                      weights_path=None, aspect: str | None = None, learning_queries=None, top_k: int = 10,
                      spec: dict | None = None, progress: bool = True) -> dict | None:
    """`write_attributions` over `world` ranks (see the module docstring): the last rank writes `out` and returns
    the document, the others return None."""
    with process_group(world, "scoring"):
        return _attribute(train_path, query_path, out, rank=rank, world=world, method=method, kernel=kernel, c=c,
                          weights_path=weights_path, aspect=aspect, learning_queries=learning_queries,
                          top_k=top_k, spec=spec, progress=progress)


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
        inner, weights = weights_inside(method, kernel, weights, info, train.group_names)
        base = at_c(inner, kernel, c_value)
        check_splittable(base, train, "attribute")
        rows = ShardRows(train.features, shard_ranges(train, rank, world))
        return train, queries, weights, info, lam, base, rows

    train, queries, weights, w_info, lam, base, rows = agree(group, prepare)
    # the cache when every rank read it, else each rank's share of the sums
    blocks, cache = shared_gram(train, base, rows, rank=rank, world=world, group=group, progress=progress)
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
    fitted = fit_shard(train, base, rows, blocks, query_side=query_side, progress=progress)
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
