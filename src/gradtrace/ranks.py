"""Which rank of a job this process is: RANK and WORLD_SIZE as torchrun (or any launcher) sets them.

The ranks of featurize and retrain never talk to each other: they share an output directory and split the work by
index (the retraining's models, the feature store's chunks), so a killed rank costs only its own unfinished work and
a rerun of the same command, with any number of ranks, redoes exactly that. Scoring's ranks sum their shares of the
kernel and send their partial top-k over gloo (`gradtrace.attribution.sharded`).
"""
from __future__ import annotations

import os

from gradtrace.errors import UserError


def distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun (or any launcher setting RANK/WORLD_SIZE), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise UserError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
                            "integers; fix the launcher settings") from None
        if not 0 <= rank < world:
            raise UserError(f"RANK={rank} is not in 0..WORLD_SIZE-1={world - 1}; fix the launcher settings")
        return rank, world
    return None


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): the launcher's, else (0, 1)."""
    return distributed_rank() or (0, 1)


def local_rank() -> int:
    """This process's index on its node (LOCAL_RANK; 0 without a launcher): which GPU it takes."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} must be an integer; fix the launcher "
                        "settings") from None
