"""The merge-features stage: one complete feature store from the partial stores of a job's machines.

A torchrun job over machines without a shared filesystem leaves one store directory per machine, each holding
the chunks its ranks wrote (`gradtrace.features.progress`). Copied onto one machine, they are merged here: the
stores must be of the same settings and examples, every chunk recorded by at least one of them is checked
against the digest its writer recorded and copied, and the result is finished only when every chunk is there
(else it is refused in one line naming the missing chunks). The merged arrays are the bytes a single process
writes, so every later stage (attribute, learn-weights, eval) gives the unsharded results.

    gradtrace merge-features --shard node0/feat --shard node1/feat --out feat
"""
from __future__ import annotations

import numpy as np

from gradtrace.errors import UserError
from gradtrace.features.numerics import check_not_mixed
from gradtrace.features.progress import ChunkProgress, digest
from gradtrace.features.store import FeatureStore
from gradtrace.io import command_line
from gradtrace.pipeline.specs.merge_features import MergeFeaturesSpec


def merge_features_run(spec: MergeFeaturesSpec, *, progress: bool = True) -> FeatureStore:
    shards = [FeatureStore.open(s, require_complete=False) for s in spec.shard]
    first = shards[0]
    for other in shards[1:]:
        if other.settings != first.settings or not np.array_equal(other.ids, first.ids):
            raise UserError(f"{other.path} is not a shard of the same store as {first.path} (other settings or "
                            "examples); merge the directories of one featurize job")
    sources = _chunk_sources(shards)
    check_not_mixed([n for holders in sources.values() for _, n in holders], "merging these shards",
                    allowed=spec.allow_mixed_numerics)
    overlap = _check_overlap(sources)
    out = FeatureStore.create(spec.out, first.settings, first.ids, first.cond,
                              provenance={**first.manifest.get("provenance", {}), "merged_from":
                                          [str(s.path.resolve()) for s in shards], "merge_command": command_line(),
                                          "merge_overlap_chunks": overlap},
                              allow_mixed_numerics=spec.allow_mixed_numerics)
    try:
        have = set(out.progress.done())
        for c, holders in sorted(sources.items()):
            if c in have:
                continue
            shard, numerics = holders[0]
            start, stop = out.progress.bounds[c]
            scale = None if shard.row_scale is None else shard.row_scale[start:stop]
            out.write(start, np.asarray(shard.features[start:stop], dtype=np.float32), scale, numerics=numerics)
            have.add(c)
        missing = out.missing_chunks()
        if missing:
            rows = [out.progress.bounds[c] for c in missing[:3]]
            raise UserError(f"{len(missing)} chunk(s) are in none of the shards (rows {rows[0][0]}..{rows[0][1] - 1}"
                            f"{' and others' if len(missing) > 1 else ''}); pass every machine's directory, or "
                            "rerun the featurize job to write them")
        out.finish()
        return out
    finally:
        out.release()


def _chunk_sources(shards: list[FeatureStore]) -> dict[int, list[tuple[FeatureStore, dict | None]]]:
    """chunk → every (shard, numerics) that holds it, each chunk's bytes checked against its writer's digest."""
    sources: dict[int, list] = {}
    for shard in shards:
        progress = ChunkProgress(shard.path, len(shard.ids), int(shard.settings["chunk_rows"]))
        recorded = progress.done() if not shard.complete else {c: None for c in range(len(progress.bounds))}
        numerics = progress.numerics()
        for c, want in sorted(recorded.items()):
            start, stop = progress.bounds[c]
            if want is not None and _digest(shard, start, stop) != want:
                raise UserError(f"{shard.path}: rows {start}..{stop - 1} changed after they were written; "
                                "featurize that shard's chunks again")
            sources.setdefault(c, []).append((shard, numerics.get(c)))
    return sources


def _check_overlap(sources) -> int:
    """The number of chunks held by more than one shard; refused when their bytes differ."""
    overlap = 0
    for c, holders in sources.items():
        if len(holders) < 2:
            continue
        overlap += 1
        (a, _), rest = holders[0], holders[1:]
        start, stop = ChunkProgress(a.path, len(a.ids), int(a.settings["chunk_rows"])).bounds[c]
        for b, _ in rest:
            if _digest(b, start, stop) != _digest(a, start, stop):
                raise UserError(f"{a.path} and {b.path} both hold rows {start}..{stop - 1}, with different bytes; "
                                "pass only the shards of one featurize job (one of them holds another run's rows)")
    return overlap


def _digest(shard: FeatureStore, start: int, stop: int) -> str:
    scale = None if shard.row_scale is None else shard.row_scale[start:stop]
    return digest(np.asarray(shard.stored[start:stop]), scale)
