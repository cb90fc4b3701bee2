"""`gradtrace retrain`: retrain the run's model on S random subsets (× R seeds) for the LDS.

Directory layout (default ``RUN/retrain``)::

    manifest.json          what this retraining is: the run's recipe, subset draw, seeds, job names
    subsets.npy / .json    the S subsets of training ids (see `subsets`)
    models/s0000-r0/ ...   one checkpoint per (subset, seed); job i = s·R + r
    outputs/<key>/         cached ground-truth model outputs per query set (see `outputs`)

Rerunning the same command resumes: finished models are skipped, unfinished ones retrained. A directory
made with other settings is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradtrace.errors import UserError
from gradtrace.evaluate.harness import Job, is_finished, model_dir, prestart_workers, train_jobs
from gradtrace.evaluate.recipe import Recipe, load_recipe
from gradtrace.evaluate.subsets import draw_subsets, load_subsets, save_subsets
from gradtrace.io import command_line, jsonable, read_json, sha256_arrays, versions, write_json_atomic

FORMAT = "gradtrace-retrain"
MANIFEST = "manifest.json"


def lds_jobs(subsets: np.ndarray, seeds: list[int]) -> list[Job]:
    """Job i = s·R + r trains subset s with seed seeds[r]."""
    return [Job(name=f"s{s:04d}-r{r}", train_ids=np.asarray(ids, dtype=np.int64), seed=int(seed),
                extra={"subset": s, "replicate": r})
            for s, ids in enumerate(subsets) for r, seed in enumerate(seeds)]


def open_or_create(out, settings: dict, what: str, fix: str, info: dict | None = None) -> dict:
    """Write `settings` (+ `info`, not compared) as a new manifest in `out`, or check an existing one's settings."""
    out = Path(out)
    path = out / MANIFEST
    if path.exists():
        old = read_json(path, f"{what} manifest")
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise UserError(f"{out} holds something other than a gradtrace retraining; choose another --out")
        if old.get("settings") != jsonable(settings):
            before, now = old.get("settings") or {}, jsonable(settings)
            key = next((k for k in [*now, *before] if before.get(k) != now.get(k)), "?")
            raise UserError(f"{out} holds a {what} made with other settings ('{key}' differs); {fix}")
        return old
    own = {MANIFEST, "models", "subsets.npy", "subsets.json", "outputs"}  # another rank may be writing them
    if out.exists() and (not out.is_dir() or any(p.name not in own and not p.name.startswith(".")
                                                 for p in out.iterdir())):
        raise UserError(f"{out} exists and is not a retraining directory; choose an empty or new --out")
    manifest = {"format": FORMAT, "format_version": 1, "kind": settings.get("kind"), **jsonable(info or {}),
                "settings": jsonable(settings), "versions": versions()}
    write_json_atomic(path, manifest)
    return manifest


def retrain_run(run, out=None, *, n_subsets: int = 64, fraction: float = 0.5, n_seeds: int = 1,
                workers: int = 1, subset_seed: int = 0, max_models: int | None = None, rank: int | None = None,
                world: int | None = None, progress: bool = True) -> dict:
    """Draw the subsets (or reload them), then train every unfinished (subset, seed) model of this rank."""
    recipe = load_recipe(run)
    prestart_workers(workers, recipe)
    out = Path(out) if out is not None else Path(run) / "retrain"
    subsets = draw_subsets(recipe.train_ids, n_subsets, fraction, subset_seed)
    seeds = recipe.replicate_seeds(n_seeds)
    jobs = lds_jobs(subsets, seeds)
    settings = {"kind": "lds", "recipe": recipe.summary(),
                "subsets": {"seed": int(subset_seed), "fraction": float(fraction), "n_subsets": int(n_subsets),
                            "subset_size": int(subsets.shape[1]), "sha256": sha256_arrays([subsets])},
                "seeds": seeds, "jobs": [j.name for j in jobs]}
    fix = "pass the same --subsets/--fraction/--seeds/--subset-seed to resume, or choose a new --out"
    had_manifest = (out / MANIFEST).exists()
    open_or_create(out, settings, "retraining", fix, {"run": recipe.run, "command": command_line()})
    if had_manifest and (out / "subsets.npy").exists():
        saved, _ = load_subsets(out)
        if not np.array_equal(saved, subsets):
            raise UserError(f"the subsets saved in {out} differ from a redraw with seed {subset_seed}; "
                            "choose a new --out")
    else:
        save_subsets(out, subsets, recipe.train_ids, fraction, subset_seed)
    stats = train_jobs(out, jobs, recipe, workers=workers, rank=rank, world=world, max_models=max_models,
                       progress=progress)
    missing = [j.name for j in jobs if not is_finished(out, j)]
    return {"out": str(out), "models": len(jobs), "finished": len(jobs) - len(missing), "missing": missing,
            **stats}


@dataclass
class Retraining:
    """A retraining directory opened for evaluation."""

    path: Path
    manifest: dict
    subsets: np.ndarray      # (S, m) training ids
    seeds: list[int]
    jobs: list[str]          # job i = s·R + r

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def n_subsets(self) -> int:
        return int(self.subsets.shape[0])

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def model_paths(self) -> list[Path]:
        return [model_dir(self.path, name) for name in self.jobs]

    def check_complete(self) -> None:
        missing = [n for n in self.jobs if not is_finished(self.path, n)]
        if missing:
            raise UserError(f"retraining in {self.path} is unfinished ({len(missing)} of {len(self.jobs)} models "
                            f"missing, e.g. {missing[0]}); rerun the same `gradtrace retrain` command to finish it")

    def check_run(self, recipe: Recipe) -> None:
        if self.settings["recipe"]["run_fingerprint"] != recipe.fingerprint:
            raise UserError(f"retraining {self.path} was made from another run (model fingerprint differs from "
                            f"{recipe.run}); pass the --run it was made from")


def open_retraining(path) -> Retraining:
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise UserError(f"no retraining at {path} (manifest.json missing); run `gradtrace retrain` first")
    manifest = read_json(path / MANIFEST, "retraining manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            manifest.get("settings", {}).get("kind") != "lds":
        raise UserError(f"{path} is not an LDS retraining directory; pass the --out of `gradtrace retrain`")
    subsets, _ = load_subsets(path)
    settings = manifest["settings"]
    if sha256_arrays([subsets]) != settings["subsets"]["sha256"]:
        raise UserError(f"subsets in {path} do not match its manifest; rerun `gradtrace retrain` into a new --out")
    return Retraining(path=path, manifest=manifest, subsets=subsets, seeds=list(settings["seeds"]),
                      jobs=list(settings["jobs"]))
