"""The learn-weights stage: learning queries (given or generated), the label-free λ, and the weights file.

Learning queries are generated samples (or held-out images), never the evaluation queries: the weights
file records the learning-query set's identity, and the scoring stages refuse to score that same set.
It dispatches on the configured method: a feature kernel learns on a learning-query store (or generated
queries); a method that needs the model (`method.needs_model`, EK-FAC) on the `--ids` examples of the checkpoint's
model (`gradtrace.pipeline.model_scoring`).

Generated learning queries are an artefact of their own:
`learning-queries/<aspect>-n<N>-seed<S>-guidance<G>-steps<T>-store<hash>[-prompts<hash>]/` beside the weights file
(samples/, features/ and `learning-queries.json`, which records how they were made and for which aspect). Every
method and kernel learning on the same store with the same settings reuses the set instead of sampling it again,
and `--queries SET/features` learns on it with its recorded aspect (a different `--aspect` is refused).

Under torchrun (WORLD_SIZE > 1) a feature kernel's learner is split over the ranks: each rank reads only its rows of
the training store (`gradtrace.attribution.shard_fit`: a block of a complete store, or its node's own chunks of a
partial one), fits Ψ of those rows with the job's kernel, and every pass over Ψ (ΨᵀΨ, the pools, the final
certificate, the λ search) is merged over the ranks (`gradtrace.weights.row_source`); the steps run identically on
every rank. The last rank writes the weights file (its manifest records `"ranks"`); the others return None.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

from gradtrace.adapters import adapter_of
from gradtrace.attribution import default_weights_path, fit_method, query_set_id, resolve_learning_c, store_identity
from gradtrace.attribution.gram_cache import store_gram, wants_cache
from gradtrace.attribution.lambda_rule import grid_edge
from gradtrace.attribution.psi_place import psi_place
from gradtrace.attribution.scoring import at_c, check_same_conditioning
from gradtrace.attribution.shard_fit import check_splittable, fit_shard, shard_ranges, shared_gram
from gradtrace.attribution.weights_file import weights_for
from gradtrace.choices import AUTO, parse_c
from gradtrace.data.sources import sampling_of
from gradtrace.errors import GradtraceWarning, UserError
from gradtrace.features.store import FeatureStore
from gradtrace.io import command_line, read_json, write_json_atomic
from gradtrace.methods import configure, get_method
from gradtrace.methods.rows import ShardRows
from gradtrace.pipeline.featurize import FeaturizeSpec, featurize_run
from gradtrace.pipeline.learning_families import SET_MANIFEST, resolve_objective
from gradtrace.pipeline.model_scoring import configure_model_method, learn_weights_model_run
from gradtrace.pipeline.sample import SampleSpec, read_prompts, sample_run
from gradtrace.pipeline.specs.learn_weights import LearnWeightsSpec
from gradtrace.ranks import agree, process_group, rank_and_world
from gradtrace.weights import learn_weights, save_weights
from gradtrace.weights.family import learn_family_weights
from gradtrace.weights.inside_lambda import INSIDE_GRID, choose_inside_c
from gradtrace.weights.row_source import Shard

LEARNING_SETS = "learning-queries"
SET_FORMAT = "gradtrace-learning-queries"


def learning_set_dir(weights: Path, train: FeatureStore, *, num: int, aspect: str | None, seed: int, guidance: float,
                     sample_steps: int, prompts: list[str] | None) -> Path:
    """Where a generated learning-query set lives: named by what makes it (and a hash of the training store's
    settings, which its features share), not by the method or kernel."""
    store = hashlib.sha256(json.dumps(train.settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', aspect or 'general')}-n{num}-seed{seed}-guidance{guidance:g}-" \
           f"steps{sample_steps}-store{store}"
    if prompts:
        name += "-prompts" + hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:10]
    return weights.parent / LEARNING_SETS / name


def recorded_aspect(queries: FeatureStore, given: str | None) -> str | None:
    """The aspect of learning queries: a generated set's record (a different `given` is refused), else `given`."""
    record = queries.path.parent / SET_MANIFEST
    if not record.exists():
        return given
    recorded = read_json(record, "learning-query set manifest").get("aspect")
    if given is not None and given != recorded:
        raise UserError(f"{queries.path} holds learning queries generated for "
                        f"{'aspect ' + repr(recorded) if recorded else 'no aspect (general weights)'}; "
                        + (f"pass --aspect {recorded}" if recorded else "drop --aspect") + " or generate a set for "
                        f"{given!r} (--generate N --aspect {given})")
    return recorded


def generate_learning_queries(train: FeatureStore, out: Path, *, num: int, aspect: str | None, seed: int,
                              guidance: float, sample_steps: int, progress: bool,
                              prompts: list[str] | None = None) -> FeatureStore:
    """Sample `num` learning queries from the training store's checkpoint (only `aspect` set, if given; or
    the user's `prompts`) and featurize them with the training store's exact settings."""
    checkpoint = train.manifest.get("provenance", {}).get("checkpoint")
    if not checkpoint:
        raise UserError(f"{train.path} does not record its checkpoint; pass --queries with featurized learning queries")
    adapter = adapter_of(checkpoint)
    request = adapter.query_request(adapter.load(checkpoint), num, aspect=aspect, seed=seed, prompts=prompts)
    families = request.pop("families", None)  # the aspect's value of each generated prompt, when built in
    sample_run(SampleSpec(checkpoint=checkpoint, out=str(out / "samples"), num=num, guidance=guidance,
                          sample_steps=sample_steps, seed=seed, **request), progress=progress)
    spec = FeaturizeSpec.like(train.settings, checkpoint=checkpoint, out=str(out / "features"),
                              samples=str(out / "samples"), overwrite=True)
    store = featurize_run(spec, progress=progress)
    write_json_atomic(out / SET_MANIFEST, {
        "format": SET_FORMAT, "format_version": 1, "aspect": aspect, "num": num, "seed": seed, "guidance": guidance,
        "sample_steps": sample_steps, "prompts": prompts, "families": families, "checkpoint": checkpoint,
        "model_fingerprint": train.settings["model_fingerprint"], "samples": "samples", "features": "features"})
    return store


def warn_shared_kernel_aspect(method, aspect: str | None) -> None:
    """Warn (one line) when an aspect's weights are learned with the SNR objective on the shared kernel, on the query
    side. In the text-to-image aspect benchmarks they collapsed onto a few groups (effective number of groups
    1.5-7 of 80) and lowered their own aspect's Recall@10 in 10 of 12 cases on two builds of the medium pipeline
    (docs/benchmarks.md, "Aspects by model size"); the family objective's weights act inside the kernel instead."""
    if aspect is not None and method.kernel_kind == "shared":
        warnings.warn(GradtraceWarning(
            f"SNR aspect weights ({aspect}) on the shared kernel tend to collapse onto a few groups and lower their "
            f"own aspect's recall; learn them with the family objective (generate several learning queries per "
            f"value) or with --kernel per-group"), stacklevel=3)


def warn_no_family_signal(aspect: str | None, signal: dict) -> None:
    """Warn (one line) that the learning queries' families agree no more than chance under uniform weights, so the
    weights stay uniform (`gradtrace.weights.family.family_signal`)."""
    what = f"aspect {aspect!r}" if aspect else "the families"
    warnings.warn(GradtraceWarning(
        f"the learning queries of {what} agree within their families no more than across them under uniform "
        f"weights (family criterion {signal['criterion']:+.4f}, permutation p = {signal['p_value']:.3f} > "
        f"{signal['threshold']:g}): these features do not carry it for these queries, so the weights stay uniform; "
        f"check that the generated queries show their values (e.g. featurize them with their conditioning)"),
        stacklevel=3)


def learn_weights_run(spec: LearnWeightsSpec, *, progress: bool = True) -> tuple[Path, dict] | None:
    """Learn group weights for a training store (or, for a method that needs the model, its checkpoint); returns
    (weights file, its document). Under torchrun the ranks split the rows and only the last one writes and returns
    them (module docstring); the others return None."""
    if get_method(spec.method).needs_model:
        return learn_weights_model_run(configure_model_method(spec, spec.method), spec, progress=progress)
    method = configure(spec.method, kernel=spec.kernel)
    rank, world = rank_and_world()
    if world > 1:
        return _learn_over_ranks(spec, method, rank, world, progress)
    train = FeatureStore.open(spec.train)
    queries = None if spec.queries is None else FeatureStore.open(spec.queries)
    aspect = spec.aspect if queries is None else recorded_aspect(queries, spec.aspect)
    out = Path(spec.out) if spec.out else default_weights_path(train, method, spec.kernel, aspect)
    if spec.generate is not None:
        prompts = read_prompts(spec.prompts) if spec.prompts else None
        where = learning_set_dir(out, train, num=spec.generate, aspect=aspect, seed=spec.sample_seed,
                                 guidance=spec.guidance, sample_steps=spec.sample_steps, prompts=prompts)
        queries = generate_learning_queries(train, where, num=spec.generate, aspect=aspect, seed=spec.sample_seed,
                                            guidance=spec.guidance, sample_steps=spec.sample_steps,
                                            progress=progress, prompts=prompts)
    train.check_compatible(queries)
    check_same_conditioning(train, queries)
    objective, families = resolve_objective(spec.objective, aspect=aspect, family=spec.family,
                                            labels_file=spec.family_labels, guard=spec.guard, queries=queries,
                                            n_train=len(train.ids), n_groups=len(train.group_names))
    inside = objective != "snr" and method.uses_lambda and method.kernel_kind == "shared"
    if objective == "snr":
        warn_shared_kernel_aspect(method, aspect)
    learner = configure(spec.method, kernel="per-group") if inside else method
    c_value, lambda_table = learning_c(train, queries, learner, spec, aspect)
    with psi_place(train, learner) as psi_path:  # Ψ of a large store: a memmap beside it, not memory
        fitted = fit_method(train, learner, kernel=learner.kernel_kind, c=c_value, progress=progress,
                            psi_path=psi_path)
        if objective == "snr":
            result = learn_weights(fitted, np.asarray(queries.features), k=spec.k, steps=spec.steps, lr=spec.lr,
                                   l2=spec.l2, guard=spec.guard, progress=progress)
        else:
            result = learn_family_weights(fitted, np.asarray(queries.features), families, objective=objective,
                                          k=spec.k, steps=spec.steps, lr=spec.lr, l2=spec.l2, progress=progress)
    provenance = _provenance(spec, train, queries, method, fitted.info, c_value, lambda_table, aspect, result)
    signal = result.info.get("family_signal")
    learned = signal is None or signal["learned"]
    if not learned:
        warn_no_family_signal(aspect, signal)
    if inside:  # learned on the per-group kernel's contributions, used inside the shared kernel at its own c; kept
        # uniform (no family signal), they are the shared kernel itself at the c the general weights use
        c_shared, table = (inside_c(train, queries, method, spec, aspect, result.weights, families, progress)
                           if learned else learning_c(train, queries, method, spec, aspect))
        provenance.update(lambda_c=c_shared, lambda_grid=table, **({"apply": "inside"} if learned else {}),
                          learned_on={"kernel": "per-group", "lambda_c": c_value, "lambda_grid": lambda_table})
    path = save_weights(out, result, provenance)
    return path, read_json(path, "weights file")


def learning_c(train: FeatureStore, queries: FeatureStore, method, spec: LearnWeightsSpec,
               aspect: str | None) -> tuple[float, object]:
    """(c, how it was chosen) of weights learned with `method`: with --lambda-c auto, an aspect's weights take the c
    of the store's general weights for the same method and kernel when those exist (c is the kernel's damping, a
    property of the store: on the text-to-image aspect benchmark the aspect's own learning queries chose c = 1e-4
    where the general ones chose 1, and the weights lost up to 0.46 Recall@10 there); else `resolve_learning_c`."""
    if aspect is not None and parse_c(spec.lambda_c) == AUTO and method.uses_lambda:
        general = default_weights_path(train, method, method.kernel_kind, None)
        try:
            _, doc = weights_for(general, train.group_names, store_identity(train), str(train.path))
            c = (doc.get("provenance") or {}).get("lambda_c")
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                return float(c), {"rule": "the general weights' c", "file": str(general.resolve())}
        except UserError:  # none there (or not this store's): choose on the aspect's learning queries
            pass
    return resolve_learning_c(train, queries, method, method.kernel_kind, spec.lambda_c, spec.k)


def inside_c(train: FeatureStore, queries: FeatureStore, method, spec: LearnWeightsSpec, aspect: str | None,
             weights: np.ndarray, families: list, progress: bool) -> tuple[float, object]:
    """(c, how it was chosen) of family weights that act inside the shared kernel: with --lambda-c auto, the c of
    `INSIDE_GRID` from the uniform kernel's c (`learning_c`: the general weights' c) upward whose inside kernel gives
    the learning queries the best family criterion (`gradtrace.weights.inside_lambda`: inside the kernel the weights
    act only through λ, so their c is chosen with them; below the uniform kernel's c the inverse whitens them away,
    and there the criterion can follow what a family's prompts share rather than what their images show: families of
    identical one-aspect prompts chose c = 1e-4 on one build and lost 0.49 Recall@10); a given c is used as given."""
    floor, rule = learning_c(train, queries, method, spec, aspect)
    if parse_c(spec.lambda_c) != AUTO:
        return floor, rule
    gram = store_gram(train, method)[0].blocks[0] if wants_cache(train, method) else None
    grid = [c for c in INSIDE_GRID if c >= floor * (1 - 1e-9)] or [INSIDE_GRID[-1]]
    c, table = choose_inside_c(train.features, train.group_slices, weights, np.asarray(queries.features), families,
                               k=spec.k, row_scale=train.row_scale if method.needs_row_scale else None, gram=gram,
                               grid=grid, progress=progress)
    if grid_edge(c, table) == "highest":  # the lowest is the floor, by design
        warnings.warn(GradtraceWarning(
            f"the inside λ scale c = {c:.0e} of the {aspect} weights is the highest value of the grid "
            f"{table[0][0]:.0e}..{table[-1][0]:.0e}: the family criterion may prefer a c beyond it; check the choice "
            f"(the grid is recorded in the weights file) or pass --lambda-c NUMBER"), stacklevel=2)
    return c, {"rule": "the family criterion inside the shared kernel", "grid": table, "floor": floor,
               "floor_rule": rule}


def _learn_over_ranks(spec: LearnWeightsSpec, method, rank: int, world: int,
                      progress: bool) -> tuple[Path, dict] | None:
    """`learn_weights_run` split over the `world` ranks of a torchrun job (module docstring)."""
    if spec.generate is not None:
        raise UserError("--generate samples and featurizes in one process; make the learning queries first (sample "
                        "and featurize them, or reuse a set learn-weights --generate wrote) and pass --queries "
                        "SET/features under torchrun")
    if spec.objective in ("family", "snr+family") or spec.family is not None:
        raise UserError(f"--objective {'family' if spec.objective == 'auto' else spec.objective} is not split over "
                        f"ranks; run learn-weights without torchrun")
    with process_group(world, "learning weights") as group:
        def prepare():
            train = FeatureStore.open(spec.train, require_complete=False)
            queries = FeatureStore.open(spec.queries)
            aspect = recorded_aspect(queries, spec.aspect)
            warn_shared_kernel_aspect(method, aspect)
            if aspect is not None and spec.objective == "auto" and rank == world - 1:
                warnings.warn(GradtraceWarning(
                    f"aspect weights ({aspect}) learned with the SNR objective: the family objective is not split "
                    f"over ranks; run learn-weights without torchrun for family weights"), stacklevel=2)
            train.check_compatible(queries)
            check_same_conditioning(train, queries)
            check_splittable(method, train, "learn-weights")
            rows = ShardRows(train.features, shard_ranges(train, rank, world))
            if len(rows) == 0:
                raise UserError(f"rank {rank} of {world} holds none of the {len(train.ids)} training rows; run "
                                f"learn-weights with fewer ranks")
            return train, queries, aspect, rows

        train, queries, aspect, rows = agree(group, prepare)
        blocks, cache = shared_gram(train, method, rows, rank=rank, world=world, group=group, progress=progress)
        shard = Shard(view=rows, n=len(train.ids), group=group)
        c_value, lambda_table = resolve_learning_c(train, queries, method, spec.kernel, spec.lambda_c, spec.k,
                                                   shard=shard, blocks=blocks)
        base = at_c(method, spec.kernel, c_value)
        show = progress and rank == world - 1
        with psi_place(train, base) as psi_path:  # this rank's Ψ, in memory or a memmap beside the store
            fitted = agree(group, lambda: fit_shard(train, base, rows, blocks, psi_path=psi_path, progress=show))
            if cache is not None:
                fitted.info["gram_cache"] = cache
            result = learn_weights(fitted, np.asarray(queries.features), k=spec.k, steps=spec.steps, lr=spec.lr,
                                   l2=spec.l2, guard=spec.guard, progress=show, shard=shard)
    if rank != world - 1:
        return None
    out = Path(spec.out) if spec.out else default_weights_path(train, method, spec.kernel, aspect)
    provenance = _provenance(spec, train, queries, method, fitted.info, c_value, lambda_table, aspect, result)
    path = save_weights(out, result, {**provenance, "ranks": world})
    return path, read_json(path, "weights file")


def _provenance(spec: LearnWeightsSpec, train: FeatureStore, queries: FeatureStore, method, method_info: dict,
                c_value: float, lambda_table, aspect: str | None, result) -> dict:
    """What the weights file records about how it was made."""
    return {
        "command": command_line(), "spec": spec.to_dict(),
        "base_method": method_info, "method": method.name, "kernel": method.kernel_kind,
        "lambda_c": c_value, "lambda_grid": lambda_table, "aspect": aspect,
        "train_store": str(train.path), "store": store_identity(train),
        "groups_preset": train.settings["groups_spec"], "k": result.info["k"], "l2": result.info["l2"],
        "steps": result.info["steps"], "lr": result.info["lr"], "guard": result.info.get("guard"),
        "learning_queries": {"store": str(queries.path), **query_set_id(queries),
                             "sampling": sampling_of(queries.settings.get("source")),
                             "set": str(queries.path.parent) if (queries.path.parent / SET_MANIFEST).exists()
                             else None},
        "objective": result.info.get("objective", "snr"),
        "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1],
        "learner": result.info,
    }
