"""One rank's share of a fit over the ranks of a torchrun job: its rows of the store, the Gram blocks summed over
ranks, and the base method fitted on its rows with the job's kernel. `attribute` (`gradtrace.attribution.sharded`)
and `learn-weights` (`gradtrace.pipeline.learn_weights`) split their work this way.

Rows of rank r: of a complete store, the contiguous block [r·N/P, (r+1)·N/P); of a node's partial store (written
by featurize's ranks on a machine without a shared filesystem, chunks c with c % P == r), rank r's own chunks, which
must be recorded there. Each rank reads only its rows.

The Gram blocks of a λ kernel are sums over rows, so each rank accumulates its rows' share in float64 and an
all-reduce (gloo) sums the shares, or every rank reads the blocks kept beside the store; every rank then solves the
same K. It equals one process's K up to the order of the float64 summation (ranks' partial sums, then their sum).
TracIn's kernel is the identity: nothing to share.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from gradtrace.attribution.gram_cache import load_gram, save_gram, wants_cache
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.methods.rows import ShardRows, effective_chunk_rows, row_chunks
from gradtrace.methods.trak import Gram, add_chunk_gram, has_dual_blocks, kernel_spans
from gradtrace.ranks import agree, all_reduce_blocks


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


def check_splittable(base, train: FeatureStore, stage: str) -> None:
    """Refuse (one line) a method whose fit cannot be split over ranks: one that scores the model, a kernel that is
    neither the identity nor built from Gram sums, or a block solved in its dual form (it needs every row)."""
    n = len(train.ids)
    if base.needs_model:
        raise UserError(f"method '{base.name}' scores the model directly; run {stage} without torchrun")
    base.check_measurement(train.settings["measurement"]["name"], str(train.path))
    if not (base.kernel_kind == "identity" or base.shares_gram):
        raise UserError(f"method '{base.name}' cannot split its fit over ranks; run {stage} without torchrun")
    if base.shares_gram and has_dual_blocks(base.kernel_kind, train.group_slices, n):
        raise UserError(f"a kernel block is wider than the {n} training rows (solved in its dual form, which "
                        f"needs every row at once); run {stage} without torchrun")


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


def shared_gram(train: FeatureStore, base, rows: ShardRows, *, rank: int, world: int, group,
                progress: bool = False) -> tuple[list[np.ndarray] | None, str | None]:
    """(the job's Gram blocks, "hit" | "written" | "not writable" | None): the blocks kept beside the store when every
    rank read them, else the all-reduced sum of the ranks' shares (the last rank keeps them beside a large store).
    (None, None) for the identity kernel."""
    if not base.shares_gram:
        return None, None
    cached = agree(group, lambda: load_gram(train, base.kernel_kind)[0] if wants_cache(train, base) else None)
    hit = torch.tensor([int(cached is not None)])
    dist.all_reduce(hit, op=dist.ReduceOp.MIN, group=group)
    if hit.item():
        return cached.blocks, "hit"
    share = agree(group, lambda: gram_share(rows, train.group_slices, base.kernel_kind, progress=progress))
    blocks = all_reduce_blocks(share, group)
    cache = None
    if rank == world - 1 and wants_cache(train, base):
        gram = Gram(kernel=base.kernel_kind, blocks=blocks, group_slices=train.group_slices, n=len(train.ids),
                    dual=[False] * len(blocks))  # the cache records the job's N
        cache = "written" if save_gram(train, gram, ranks=world) else "not writable"
    return blocks, cache


def job_gram(base, blocks: list[np.ndarray], train: FeatureStore, rows: ShardRows) -> Gram:
    """The job's Gram blocks as a rank's fit takes them (over its `rows`: the fit checks the count)."""
    return Gram(kernel=base.kernel_kind, blocks=blocks, group_slices=train.group_slices, n=len(rows),
                dual=[False] * len(blocks))


def row_scale_of(train: FeatureStore, base, rows: ShardRows) -> np.ndarray | None:
    """The per-example factors of this rank's rows (methods with `needs_row_scale`), else None."""
    return np.concatenate([train.row_scale[a:b] for a, b in rows.ranges]) if base.needs_row_scale else None


def fit_shard(train: FeatureStore, base, rows: ShardRows, blocks, *, query_side: bool = False, psi_path=None,
              progress: bool = False):
    """The base method fitted on this rank's rows with the job's kernel (`blocks`; None for the identity): Ψ of
    these rows (or Φ with K on the query side), `info["N"]` the job's N."""
    slices = train.group_slices
    given = {} if psi_path is None or query_side else {"psi_path": psi_path}
    if blocks is not None:
        side = query_side and not base.needs_row_scale and base.supports_query_side
        fitted = base.fit(rows, slices, gram=job_gram(base, blocks, train, rows), query_side=side,
                          row_scale=row_scale_of(train, base, rows), progress=progress, **given)
    else:
        fitted = base.fit(rows, slices, progress=progress)
    fitted.info["N"] = int(len(train.ids))
    return fitted
