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
    out = FeatureStore.create(spec.out, first.settings, first.ids, first.cond,
                              provenance={**first.manifest.get("provenance", {}), "merged_from":
                                          [str(s.path.resolve()) for s in shards], "merge_command": command_line()})
    try:
        have = set(out.progress.done())
        for shard in shards:
            recorded = ChunkProgress(shard.path, len(shard.ids), int(shard.settings["chunk_rows"])).done() \
                if not shard.complete else {c: None for c in range(len(out.progress.bounds))}
            for c, want in sorted(recorded.items()):
                if c in have:
                    continue
                start, stop = out.progress.bounds[c]
                scale = None if shard.row_scale is None else shard.row_scale[start:stop]
                raw = np.asarray(shard.stored[start:stop])
                if want is not None and digest(raw, scale) != want:
                    raise UserError(f"{shard.path}: rows {start}..{stop - 1} changed after they were written; "
                                    "featurize that shard's chunks again")
                out.write(start, np.asarray(shard.features[start:stop], dtype=np.float32), scale)
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
