"""Which rank of a job this process is: RANK and WORLD_SIZE as torchrun (or any launcher) sets them.

The ranks of featurize and retrain never talk to each other: they share an output directory and split the work by
index (the retraining's models, the feature store's chunks), so a killed rank costs only its own unfinished work and
a rerun of the same command, with any number of ranks, redoes exactly that. Scoring's ranks sum their shares of the
kernel and send their partial top-k over gloo (`gradtrace.attribution.sharded`); weight learning's ranks merge each
pass over their rows of Ψ the same way (`gradtrace.weights.row_source`). The collectives they share live here: one
process group for a stage (`process_group`), one refusal told to every rank (`agree`), float64 sums and maxima.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from gradtrace.errors import UserError

TIMEOUT = datetime.timedelta(minutes=30)  # how long a rank waits for the others at a collective


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


@contextmanager
def process_group(world: int, what: str):
    """The gloo process group of a torchrun job for the block (created here unless one exists; nothing when
    `world` is 1). `what` names the work in the refusal when torchrun's rendezvous is missing."""
    created = world > 1 and not dist.is_initialized()
    if created:
        try:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        except (ValueError, RuntimeError) as exc:
            raise UserError(f"{what} over {world} ranks needs torchrun's rendezvous (MASTER_ADDR, MASTER_PORT): "
                            f"{str(exc).splitlines()[0][:160]}; launch with torchrun") from None
    try:
        yield dist.group.WORLD if world > 1 else None
    except BaseException:
        if created:
            dist.destroy_process_group()
        raise
    if created:
        # every rank reaches the end before any tears the group down: under load a rank whose peer had already
        # closed its connections aborted in gloo ("terminate called without an active exception", exit -6)
        dist.barrier()
        dist.destroy_process_group()


def agree(group, action):
    """Run `action` on every rank; if any rank raised, every rank raises (the failing one its own error, the others
    its message in one line), so no rank waits forever at a later collective. Returns the action's result.
    `action` itself must not wait at a collective (a rank that failed before it would leave the others there)."""
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


def all_reduce_blocks(blocks: list[np.ndarray], group, op: str = "sum") -> list[np.ndarray]:
    """The sum (or, `op="max"`, the maximum) over ranks of each float64 block, one all-reduce of their
    concatenation; every rank gets the same bits."""
    flat = torch.from_numpy(np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1) for b in blocks]))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    out, at = [], 0
    for b in blocks:
        size = int(np.size(b))
        out.append(flat[at:at + size].numpy().reshape(np.shape(b)).copy())
        at += size
    return out


def all_gather(value, group) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out
