"""Train many models with one recipe: resumable, in worker processes or one rank per node under torchrun.

A *job* is (name, training ids, seed). Job i's model goes to ``models/<name>/`` as a checkpoint. It is
trained into ``models/.tmp-<name>/`` and renamed into place once save_checkpoint has written config.json
(last), so a directory under its final name is always a finished model, and a model killed at any point
(even by SIGKILL) leaves at most a temp directory that the next run deletes and retrains.

Parallelism: ``workers`` single-threaded processes (torch.multiprocessing, forkserver) share the unfinished
jobs round-robin; ``workers=1`` trains in this process (also single-threaded). Under torchrun (RANK and
WORLD_SIZE in the environment) each rank trains the jobs i with i % WORLD_SIZE == RANK, in its own process
(``torchrun --nnodes N --nproc-per-node 1 ... -m gradtrace.cli -- retrain --run RUN --out SHARED_DIR``; no
process group is needed: ranks never talk, they share the output directory).
Training is deterministic for a seed at a fixed thread count, so every path gives bit-identical weights.
"""
from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import forkserver
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from tqdm.auto import tqdm

from gradtrace.adapters.train_state import STATE_FILE, TrainState
from gradtrace.errors import UserError
from gradtrace.evaluate.recipe import Recipe, load_run_dataset
from gradtrace.io import command_line, process_alive, sha256_arrays
from gradtrace.ranks import distributed_rank

MODELS = "models"


@dataclass
class Job:
    name: str
    train_ids: np.ndarray
    seed: int
    extra: dict = field(default_factory=dict)


def model_dir(out, job_or_name) -> Path:
    name = job_or_name.name if isinstance(job_or_name, Job) else str(job_or_name)
    return Path(out) / MODELS / name


def is_finished(out, job_or_name) -> bool:
    """A model is finished when its final directory holds config.json (written last, then renamed)."""
    return (model_dir(out, job_or_name) / "config.json").is_file()


def train_jobs(out, jobs: list[Job], recipe: Recipe, *, workers: int = 1, rank: int | None = None,
               world: int | None = None, max_models: int | None = None, progress: bool = True) -> dict:
    """Train every unfinished job of this rank; returns counts and per-model wall times.

    `rank`/`world` default to the torchrun environment (else 0/1). `max_models` stops after that many
    newly trained models (a controlled interruption, for tests and for splitting work over sessions).
    """
    if int(workers) != workers or workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    if rank is None or world is None:
        rank, world = distributed_rank() or (0, 1)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("job names must be unique")
    mine = [j for i, j in enumerate(jobs) if i % world == rank]
    for j in mine:  # temp dirs of killed runs are never reused, whether or not their job is pending
        _remove_stale_tmp(model_dir(out, j))
    pending = [j for j in mine if not is_finished(out, j)]
    for j in mine:  # the training state of a model killed after it was saved
        if is_finished(out, j):
            TrainState(state_path(out, j)).clear()
    skipped = len(mine) - len(pending)
    if max_models is not None:
        pending = pending[:max(0, int(max_models))]
    (Path(out) / MODELS).mkdir(parents=True, exist_ok=True)
    stats = {"rank": rank, "world": world, "jobs": len(jobs), "mine": len(mine),
             "skipped": skipped,
             "trained": 0, "model_wall_s": {}}
    if not pending:
        return stats
    start = time.perf_counter()
    bar = tqdm(total=len(pending), desc=f"retrain (rank {rank}/{world})" if world > 1 else "retrain",
               unit="model", disable=not progress)
    workers = min(int(workers), len(pending))
    try:
        if workers == 1:
            _train_in_process(out, pending, recipe, bar, stats)
        else:
            _train_in_workers(out, pending, recipe, workers, bar, stats)
    finally:
        bar.close()
    stats["wall_s"] = time.perf_counter() - start
    return stats


def state_path(out, job_or_name) -> Path:
    """Where a job's resumable training state is kept while it trains (`gradtrace.adapters.train_state`)."""
    final = model_dir(out, job_or_name)
    return final.parent / f".{final.name}{STATE_FILE}"


def train_one(out, job: Job, recipe: Recipe, dataset, command: str = "") -> float:
    """Train and save one job's model with the run's adapter (temp dir, then rename); returns its wall time.
    A job killed mid-training continues from its saved training state when it is trained again."""
    final = model_dir(out, job)
    _remove_stale_tmp(final)
    tmp = final.parent / f".tmp-{job.name}-{os.getpid()}"
    start = time.perf_counter()
    adapter = recipe.adapter
    cfg = adapter.train_config(recipe.train_config_with_seed(job.seed))
    ids = np.asarray(job.train_ids, dtype=np.int64)
    state = TrainState(state_path(out, job), {"run": recipe.fingerprint, "job": job.name, "seed": int(job.seed),
                                               "ids": sha256_arrays([np.sort(ids)]),
                                               "train_config": recipe.train_config_with_seed(job.seed)})
    model = adapter.train(recipe.model_config, dataset, cfg, ids=ids, progress=False, resume=state)
    extra = {"job": job.name, "retrain_of": recipe.run, "run_fingerprint": recipe.fingerprint,
             "command": command, **job.extra}
    adapter.save(tmp, model, train_config=cfg, dataset_info=recipe.dataset,
                 train_ids=np.asarray(job.train_ids, dtype=np.int64), extra=extra)
    if is_finished(out, job):  # another process finished it meanwhile: keep theirs
        shutil.rmtree(tmp)
    else:
        if final.exists():  # a directory without config.json under the final name is junk, not a model
            shutil.rmtree(final)
        os.rename(tmp, final)
    state.clear()
    return time.perf_counter() - start


def _remove_stale_tmp(final: Path) -> None:
    """Delete temp dirs of this job left by dead processes (a killed run): they are never reused."""
    for tmp in final.parent.glob(f".tmp-{final.name}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _train_in_process(out, pending: list[Job], recipe: Recipe, bar, stats: dict) -> None:
    dataset = load_run_dataset(recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as a worker process: bit-identical weights
    try:
        for job in pending:
            wall = train_one(out, job, recipe, dataset, command_line())
            stats["trained"] += 1
            stats["model_wall_s"][job.name] = wall
            bar.update(1)
    finally:
        torch.set_num_threads(threads)


def _train_in_workers(out, pending: list[Job], recipe: Recipe, workers: int, bar, stats: dict) -> None:
    ctx = _context(recipe)
    results = ctx.Queue()
    shares = [pending[w::workers] for w in range(workers)]
    procs = [ctx.Process(target=_worker, args=(str(out), share, recipe.to_dict(), results, command_line()),
                         daemon=True) for share in shares]
    for p in procs:
        p.start()
    remaining = len(pending)
    try:
        while remaining:
            try:
                kind, name, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"a retraining worker died (exit code {dead[0].exitcode}); rerun the same "
                                       "command to resume")
                continue
            if kind == "done":
                remaining -= 1
                stats["trained"] += 1
                stats["model_wall_s"][name] = payload
                bar.update(1)
            elif kind == "user-error":
                raise UserError(payload)
            else:
                raise RuntimeError(f"retraining worker failed on model {name}:\n{payload}")
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()


def prestart_workers(workers: int, recipe: Recipe) -> None:
    """Start the forkserver (it imports torch and the run's adapter) now, so that it loads while this process does
    other work; only when worker processes will be used. A no-op for spawn or one worker."""
    if int(workers) > 1 and distributed_rank() is None and _context(recipe).get_start_method() == "forkserver":
        forkserver.ensure_running()


def _context(recipe: Recipe):
    """forkserver with torch and the run's adapter preloaded (imported once, then each worker is a cheap fork of a
    process that never ran a torch op); spawn where forkserver does not exist. Never plain fork: the parent
    may hold OpenMP threads."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["gradtrace.evaluate.harness", type(recipe.adapter).__module__])
        return ctx
    return mp.get_context("spawn")


def _worker(out: str, jobs: list[Job], recipe_dict: dict, results, command: str) -> None:
    """Worker process: single-threaded; trains its share and reports each model as it is saved."""
    torch.set_num_threads(1)
    _exit_with_parent()
    name = "?"
    try:
        recipe = Recipe.from_dict(recipe_dict)
        dataset = load_run_dataset(recipe)
        for job in jobs:
            name = job.name
            results.put(("done", name, train_one(out, job, recipe, dataset, command)))
    except UserError as exc:
        results.put(("user-error", name, str(exc)))
    except BaseException:  # report, then exit non-zero; the parent stops the others
        results.put(("error", name, traceback.format_exc()))
        raise


def _exit_with_parent() -> None:
    """Stop this worker at once when the process that started it dies (e.g. kill -9 of `gradtrace retrain`).

    A daemon thread waits on multiprocessing's parent sentinel (a pipe the parent holds open; it reaches EOF
    when the parent dies, whatever the start method) and then exits the process; the unfinished model's temp
    directory is removed by the next run.
    """
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
