"""The merge-features stage's spec: the partial stores of a job's machines and the merged store."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option


@dataclass
class MergeFeaturesSpec(Spec):
    shard: list = option([], "a partial feature store (repeat: one per machine of the job)", append=True,
                         metavar="DIR")
    out: str = option(None, "the merged feature store", required=True)
    allow_mixed_numerics: bool = option(False, "merge shards computed under other numerics (thread count, device, "
                                        "dtype, library versions); recorded in the merged store's manifest")

    def validate(self) -> None:
        if len(self.shard) < 1:
            raise UserError("pass at least one --shard DIR (the feature store directory of each machine)")
        seen: dict[Path, str] = {}
        for shard in self.shard:
            where = Path(shard).resolve()
            if where in seen:
                raise UserError(f"--shard {shard} is passed twice (as {seen[where]} too); pass each machine's "
                                "directory once")
            seen[where] = str(shard)
        if Path(self.out).resolve() in seen:
            raise UserError("--out must be a new directory, not one of the shards")
