"""`gradtrace eval mislabel`: flip a seeded fraction of a classifier's training labels, train on them, and see how
well each method's self-influence finds the flipped examples, with uniform and with learned group weights.

Steps, each kept in OUT and reused by a rerun (resumable; every file written atomically):

1. ``flips.json``: round(fraction·N) training examples drawn from a seeded generator, each given a class drawn
   uniformly from the others (`gradtrace.evaluate.flips.flip_labels`);
2. ``model/``: the run's recipe (model config, train config and seed) trained on the corrupted labels (saved in a
   temp folder and renamed; a killed training resumes from ``.model.state``);
3. ``features/train``: the training set featurized with the corrupted model *at the corrupted labels* (the margin
   or loss of the label it was trained on); ``features/learn``: the learning queries, held-out labelled images
   (never training examples) at their own labels;
4. per method: λ scale c (a number, or "auto": SNR-best on the learning queries), per-group self-influence
   c_j(x_n, x_n) (N, M), group weights learned on the learning queries (``weights/``, as `learn-weights`), and
   τ_w(x_n, x_n) = Σ_j w_j c_j(x_n, x_n) for uniform and learned w;
5. ``self_influence.npz`` (training ids, flipped, and each "METHOD/KERNEL/uniform|learned" score vector, in the
   training store's row order) and ``mislabel.json``: ROC AUC (flipped = positive) and the fraction of the flipped
   found in
   the top 10%, with bootstrap 95% CIs, and the paired learned − uniform differences, per method; and the manifest.

Every method is a configured method object (`gradtrace.methods`) and the stage dispatches on its facts: a feature
kernel is fitted on the training store (`store_self_influence`), c_j(x_n, x_n) = φ_j(x_n) · ψ_j(x_n), its weights
learned from the learning store; a method that needs the model (`method.needs_model`, EK-FAC, `--methods ekfac`)
opens a session on the corrupted model, fits what it fits once on the corrupted training set (OUT/METHOD-factors),
gives its per-group self-influence (`model_self_influence`; c "auto": SNR-best on the learning queries, the same
rule as learn-weights) and its weights are learned from the learning queries' dense per-group contributions
(`learn_weights_dense`). Nothing here knows the kind of model: the adapter says which classes the model predicts
(`classes`) and trains on other labels (`relabelled`).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gradtrace.adapters import ModelAdapter
from gradtrace.adapters.train_state import TrainState
from gradtrace.attribution import fit_method, query_set_id, resolve_learning_c, resolve_model_learning_c, store_identity
from gradtrace.choices import MISLABEL_METHODS as DEFAULT_METHODS  # noqa: F401  (the CLI's choices)
from gradtrace.data.sources import Examples, dataset_source, open_dataset
from gradtrace.errors import UserError
from gradtrace.evaluate.flips import flip_labels
from gradtrace.evaluate.recipe import Recipe, load_recipe, load_run_dataset
from gradtrace.features.featurize import FeatureSpec, featurize, featurizer_for, spec_record
from gradtrace.features.store import FeatureStore
from gradtrace.io import (
    atomic_write,
    check_can_write,
    command_line,
    jsonable,
    process_alive,
    read_json,
    sha256_arrays,
    versions,
    write_json_atomic,
)
from gradtrace.methods import KERNELS, BaseMethod, FittedMethod, ModelMethod, configure, get_method, known_methods
from gradtrace.metrics.detection import N_BOOTSTRAP, TOP_FRACTION, check_fraction, detection_table
from gradtrace.weights import DEFAULT_GUARD, DEFAULT_K, DEFAULT_STEPS, learn_weights, learn_weights_dense, save_weights

RESULT, MANIFEST, FLIPS, MODEL, SCORES = "mislabel.json", "manifest.json", "flips.json", "model", "self_influence.npz"
FORMAT = "gradtrace-mislabel"
EKFAC_FACTORS = "ekfac-factors"
OWN = {RESULT, MANIFEST, FLIPS, MODEL, SCORES, "features", "weights", EKFAC_FACTORS}


def factors_folder(method: BaseMethod) -> str:
    """OUT/METHOD-factors: what a method that needs the model fits once on the corrupted model (EK-FAC: factors)."""
    return f"{method.name}-factors"


@dataclass
class SelfInfluenceInputs:
    """What a self-influence provider may use: the corrupted model, its feature stores and their examples."""

    adapter: ModelAdapter
    checkpoint: Path
    train: FeatureStore
    learn: FeatureStore
    train_examples: Examples   # cond = the corrupted labels
    learn_examples: Examples


@dataclass
class GroupSelfInfluence:
    values: np.ndarray   # (N, M) float64: c_j(x_n, x_n) in the training store's row order
    group_names: list[str]
    info: dict
    fitted: FittedMethod | None = None  # the bilinear method the weight learner scores the learning queries with
    # or, for a method that needs the model (EK-FAC): (Q, N, M) contributions of the learning queries
    learning_contributions: np.ndarray | None = None


def store_self_influence(inputs: SelfInfluenceInputs, method: BaseMethod | str, kernel: str, c: float,
                         progress: bool = False) -> GroupSelfInfluence:
    """A bilinear method fitted on the training store: c_j(x_n, x_n) = φ_j(x_n) · ψ_j(x_n)."""
    fitted = fit_method(inputs.train, method, kernel=kernel, c=c, progress=progress)
    values = fitted.self_contributions(inputs.train.features, progress=progress)
    return GroupSelfInfluence(values, fitted.group_names, fitted.info, fitted)


def model_self_influence(inputs: SelfInfluenceInputs, method: ModelMethod, lambda_c, *, factors: Path,
                         progress: bool = False) -> GroupSelfInfluence:
    """A method that needs the model, on the corrupted model: its state fitted on the training examples at their
    corrupted labels (`factors` folder, reused when it matches); the groups and measurement of the feature stores.
    Self-influence of example n = the example scored as its own query, per group (for the training loss: the loss
    on both sides; else sign · the measurement against the loss). c: "auto" = the SNR-best c on the learning
    queries (as learn-weights), a number, or None = the method's default; the learning queries' contributions at
    that c come along, to learn the weights from."""
    train = inputs.train
    measurement = train.settings["measurement"]["name"]
    configured = method.with_settings(groups=train.settings["groups_spec"], measurement=measurement)
    s = configured.session(inputs.checkpoint, default_factors=Path(factors), examples=inputs.train_examples,
                           progress=progress).fit()
    k = min(DEFAULT_K, len(train.ids))
    c, table, learn_contrib = resolve_model_learning_c(s, inputs.learn_examples, lambda_c, k)
    values = s.self_contributions(c, measurement=measurement != s.adapter.train_loss_measurement)
    info = {**s.facts(), "lambda_c": c, "lambda_grid": table, **s.lambda_facts(c), "measurement": measurement,
            "train_loss": s.identity["train_loss"], **s.fitted_record()}
    result = GroupSelfInfluence(values, list(s.group_names), info, learning_contributions=learn_contrib)
    n, m = len(train.ids), len(result.group_names)
    if values.shape != (n, m) or not set(result.group_names) <= set(train.group_names) \
            or learn_contrib.shape != (len(inputs.learn.ids), n, m):
        raise ValueError(f"self-influence of {method.name} has shape {values.shape} for groups {result.group_names}; "
                         f"expected ({n}, {m}) for groups of {train.group_names}")
    return result


def parse_methods(text: str) -> list[tuple[BaseMethod, str]]:
    """'tracin,trak:shared,trak:per-group,ekfac' → [(configured method, kernel label)]: a feature kernel with a λ
    needs its kernel; one without λ gets 'identity'; a method that needs the model has its own ('ekfac')."""
    out, seen = [], []
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        name, _, kernel = item.partition(":")
        if name not in known_methods():
            raise UserError(f"--methods: unknown method {name!r}; use {', '.join(known_methods())}")
        bare = configure(name, c=None)
        if bare.needs_model:
            if kernel not in ("", bare.kernel_kind):
                raise UserError(f"--methods: {name} has its own kernel ({name} or {name}:{bare.kernel_kind}); "
                                f"got {item!r}")
            kernel, method = bare.kernel_kind, bare
        elif not bare.uses_lambda:
            kernel, method = "identity", bare
        elif kernel not in KERNELS:
            raise UserError(f"--methods: {name} needs a kernel, {name}:shared or {name}:per-group; got {item!r}")
        else:
            method = get_method(name, kernel=kernel)
        if (name, kernel) in seen:
            raise UserError(f"--methods lists {item!r} twice")
        seen.append((name, kernel))
        out.append((method, kernel))
    if not out:
        raise UserError("--methods is empty; e.g. --methods tracin,trak:per-group")
    return out


def classes_of(recipe: Recipe) -> list[str]:
    classes = recipe.adapter.classes(recipe.model_config)
    if classes is None:
        raise UserError(f"{recipe.run} is a {recipe.adapter.name} model without class labels; eval mislabel needs "
                        "a classifier run (gradtrace train --adapter classifier ...)")
    return classes


def learning_source(recipe: Recipe, learning_data: str | None, learning_ids, num: int, seed: int):
    """(source record, ids) of the learning queries: given ids, else `num` ids drawn (seeded) from the images of
    the learning data; from the run's own dataset only ids it was not trained on."""
    src = recipe.source
    source = src if learning_data is None else dataset_source(learning_data, size=src.get("size"),
                                                              seed=src.get("seed", 0))
    same = source.get("spec") == src.get("spec")  # ids are stable across --n and --size
    if learning_ids is not None:
        ids = np.unique(np.asarray(learning_ids, dtype=np.int64))
        if same and np.isin(ids, recipe.train_ids).any():
            raise UserError(f"--learning-ids holds {int(np.isin(ids, recipe.train_ids).sum())} of the run's training "
                            "ids; learning queries must be held-out images")
        return source, ids
    pool = np.asarray(open_dataset(source).ids, dtype=np.int64)
    if same:
        pool = np.setdiff1d(pool, recipe.train_ids)
    if not len(pool):
        raise UserError("the run trained on every image of its dataset, so none is held out for the learning "
                        "queries; pass --learning-data with other labelled images (or --learning-ids)")
    pick = np.random.default_rng(int(seed)).choice(len(pool), size=min(int(num), len(pool)), replace=False)
    return source, np.sort(pool[pick])


def open_workdir(out: Path, settings: dict) -> None:
    """Write the work manifest, or check that the one in `out` was made with the same settings."""
    path = out / MANIFEST
    if path.exists():
        old = read_json(path, "mislabel manifest")
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise UserError(f"{out} holds something other than a gradtrace mislabel evaluation; choose another --out")
        if old.get("settings") != jsonable(settings):
            key = next((k for k in settings if old["settings"].get(k) != jsonable(settings[k])), "?")
            raise UserError(f"{out} holds a mislabel evaluation made with other settings ('{key}' differs); pass the "
                            "same settings to resume, or a new --out")
        return
    if out.exists() and any(p.name not in OWN and not p.name.startswith(".") and not p.name.endswith("-factors")
                            for p in out.iterdir()):
        raise UserError(f"{out} exists and is not a mislabel evaluation; choose an empty or new --out")
    write_json_atomic(path, {"format": FORMAT, "format_version": 1, "command": command_line(),
                             "settings": jsonable(settings), "versions": versions()})


def train_corrupted(recipe: Recipe, out: Path, noisy: np.ndarray, train_ids: np.ndarray, progress: bool) -> Path:
    """Train the run's recipe on the corrupted labels into OUT/model (temp folder, then rename; resumable)."""
    final = out / MODEL
    for tmp in out.glob(".tmp-model-*"):  # left by a killed run (never reused)
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    if (final / "config.json").is_file():
        return final
    adapter = recipe.adapter
    dataset = adapter.relabelled(recipe.model_config, load_run_dataset(recipe), train_ids, noisy)
    cfg = adapter.train_config(recipe.train_config)
    state = TrainState(out / ".model.state", {"run": recipe.fingerprint, "labels": sha256_arrays([noisy]),
                                              "train_config": recipe.train_config})
    model = adapter.train(recipe.model_config, dataset, cfg, ids=train_ids, progress=progress, resume=state)
    tmp = out / f".tmp-model-{os.getpid()}"
    adapter.save(tmp, model, train_config=cfg, dataset_info={**recipe.dataset, "labels": f"corrupted: {FLIPS}"},
                 train_ids=train_ids, extra={"mislabel_of": recipe.run, "run_fingerprint": recipe.fingerprint,
                                             "labels_sha256": sha256_arrays([noisy])})
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    state.clear()
    return final


def featurize_examples(adapter, checkpoint: Path, examples: Examples, out: Path, spec: FeatureSpec,
                       progress: bool) -> FeatureStore:
    ckpt = adapter.load(checkpoint)
    featurizer, _ = featurizer_for(adapter, ckpt, spec)
    provenance = {"command": command_line(), "checkpoint": str(checkpoint.resolve()), "adapter": adapter.name,
                  "labels": "as given (eval mislabel)"}
    return featurize(featurizer, examples.images, examples.ids, out, spec=spec, cond=examples.cond,
                     model_fingerprint=ckpt.fingerprint, source=examples.source, provenance=provenance,
                     progress=progress)


def learned_group_weights(inputs: SelfInfluenceInputs, si: GroupSelfInfluence, path: Path, method: BaseMethod,
                          c, *, steps: int, guard: str, progress: bool) -> tuple[np.ndarray, dict]:
    """Weights learned on the learning queries as `learn-weights` learns them (label-free objective, top-k =
    min(10, N)): on the fitted method, or from the dense contributions of a method that needs the model; saved to
    `path`; (weights in the order of `si.group_names`, a record)."""
    train, learn = inputs.train, inputs.learn
    k = min(DEFAULT_K, len(train.ids))
    if si.fitted is not None:
        result = learn_weights(si.fitted, np.asarray(learn.features), k=k, steps=steps, guard=guard,
                               progress=progress)
    else:
        result = learn_weights_dense(si.learning_contributions, si.group_names, k=k, steps=steps, guard=guard,
                                     progress=progress)
    provenance = {"command": command_line(), "base_method": si.info, "method": method.name,
                  "kernel": method.kernel_kind,
                  "lambda_c": c,
                  "train_store": str(train.path), "store": store_identity(train),
                  "groups_preset": train.settings["groups_spec"], "k": result.info["k"], "l2": result.info["l2"],
                  "steps": result.info["steps"], "lr": result.info["lr"], "guard": result.info.get("guard"),
                  "learning_queries": {"store": str(learn.path), **query_set_id(learn)},
                  "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1], "learner": result.info}
    save_weights(path, result, provenance)
    w = np.asarray(result.weights, dtype=np.float64)
    return w, {"path": str(path), "weights": dict(zip(result.group_names, w.tolist())), "guard": guard,
               "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1]}


def mislabel_run(run, out, *, fraction: float = 0.1, flip_seed: int = 0, methods: str = DEFAULT_METHODS,
                 feature_spec: FeatureSpec | None = None, learning_data: str | None = None, learning_ids=None,
                 num_learning: int = 100, lambda_c="auto", learn_steps: int = DEFAULT_STEPS,
                 guard: str = DEFAULT_GUARD, top_fraction: float = TOP_FRACTION, n_bootstrap: int = N_BOOTSTRAP,
                 seed: int = 0, progress: bool = True) -> dict:
    """Run (or resume) the evaluation into `out` and write mislabel.json; returns its document."""
    start = time.perf_counter()
    fraction, top_fraction = check_fraction(fraction), check_fraction(top_fraction, "--top-fraction")
    entries = parse_methods(methods)
    recipe = load_recipe(run)
    classes = classes_of(recipe)
    adapter = recipe.adapter
    out = Path(out)
    check_can_write(out)
    spec = feature_spec or FeatureSpec(measurement=None)
    if spec.measurement is None:  # the model's own default, recorded in the stores' spec
        spec = replace(spec, measurement=adapter.default_measurement)
    if spec.measurement not in adapter.measurements:
        raise UserError(f"unknown measurement '{spec.measurement}' for {adapter.name} models; use one of "
                        f"{', '.join(adapter.measurements)}")
    train_ex = adapter.examples(recipe.model_config, recipe.source, ids=recipe.train_ids)
    true = np.asarray(train_ex.cond, dtype=np.int64)
    noisy, flipped = flip_labels(true, len(classes), fraction=fraction, seed=flip_seed)
    l_source, l_ids = learning_source(recipe, learning_data, learning_ids, num_learning, flip_seed)
    learn_ex = adapter.examples(recipe.model_config, l_source, ids=l_ids)
    settings = {"run_fingerprint": recipe.fingerprint, "train_ids_sha256": sha256_arrays([train_ex.ids]),
                "fraction": fraction, "flip_seed": int(flip_seed), "labels_sha256": sha256_arrays([noisy]),
                "features": spec_record(spec), "learning_source": l_source,
                "learning_ids_sha256": sha256_arrays([l_ids])}
    open_workdir(out, settings)
    if not (out / FLIPS).exists():
        rows = np.flatnonzero(flipped)
        write_json_atomic(out / FLIPS, {"fraction": fraction, "flip_seed": int(flip_seed), "classes": classes,
                                        "flipped_ids": train_ex.ids[rows].tolist(), "true": true[rows].tolist(),
                                        "noisy": noisy[rows].tolist()})
    checkpoint = train_corrupted(recipe, out, noisy, train_ex.ids, progress)
    noisy_ex = replace(train_ex, cond=noisy)
    train = featurize_examples(adapter, checkpoint, noisy_ex, out / "features" / "train", spec, progress)
    learn = featurize_examples(adapter, checkpoint, learn_ex, out / "features" / "learn", spec, progress)
    inputs = SelfInfluenceInputs(adapter, checkpoint, train, learn, noisy_ex, learn_ex)
    results, arrays = [], {"ids": np.asarray(train.ids), "flipped": flipped}
    for method, kernel in entries:
        t = time.perf_counter()
        if method.needs_model:  # its session resolves c on the learning examples (from the model, not the stores)
            si = model_self_influence(inputs, method, lambda_c, factors=out / factors_folder(method),
                                      progress=progress)
            c, grid = si.info.get("lambda_c"), si.info.get("lambda_grid")
        else:
            kernel_arg = "shared" if kernel == "identity" else kernel
            c, grid = resolve_learning_c(train, learn, method, kernel_arg, lambda_c, min(DEFAULT_K, len(train.ids)))
            si = store_self_influence(inputs, method, kernel_arg, c, progress)
        w, w_info = learned_group_weights(inputs, si, out / "weights" / f"{method.name}-{kernel}.json", method,
                                          c, steps=learn_steps, guard=guard, progress=progress)
        scores = {"uniform": si.values.sum(1), "learned": si.values @ w}
        table = detection_table(scores, flipped, baseline="uniform", fraction=top_fraction, n_bootstrap=n_bootstrap,
                                seed=seed, progress=progress)
        arrays.update({f"{method.name}/{kernel}/{k}": v for k, v in scores.items()})
        results.append({"method": method.name, "kernel": kernel, "c": c, "lambda_grid": grid, "fitted": si.info,
                        "group_names": list(si.group_names),
                        "learned_weights": w_info, **table, "seconds": round(time.perf_counter() - t, 3)})
    doc = {"manifest": {"format": FORMAT, "format_version": 1, "command": command_line(), "run": recipe.run,
                        **jsonable(settings), "n_train": int(len(train_ex.ids)), "n_flipped": int(flipped.sum()),
                        "n_learning": int(len(l_ids)), "measurement": train.settings["measurement"],
                        "groups": train.group_names, "model": str(checkpoint.resolve()),
                        "learn_steps": int(learn_steps), "guard": guard, "lambda_c": str(lambda_c),
                        "versions": versions()},
           "results": results, "scores_file": SCORES, "wall_s": round(time.perf_counter() - start, 3)}
    with atomic_write(out / SCORES, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    write_json_atomic(out / RESULT, doc)
    return doc


def mislabel_table(doc: dict) -> str:
    """Markdown: per method, AUC and top-fraction found (95% CI), uniform vs learned, and the paired difference."""
    def cell(v, ci):
        return f"{v:.3f}" + ("" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")

    def signed(v, ci):
        return f"{v:+.3f}" + ("" if ci[0] is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]")

    pct = None
    lines = []
    for r in doc["results"]:
        pct = f"{100 * r['top_fraction']:g}%"
        u, lw, d = r["scores"]["uniform"], r["scores"]["learned"], r["paired"]["learned - uniform"]
        lines.append(f"| {r['method']} | {r['kernel']} | {cell(u['auc'], u['auc_ci95'])} | "
                     f"{cell(lw['auc'], lw['auc_ci95'])} | {signed(d['auc'], d['auc_ci95'])} | "
                     f"{cell(u['top_found'], u['top_found_ci95'])} | {cell(lw['top_found'], lw['top_found_ci95'])} | "
                     f"{signed(d['top_found'], d['top_found_ci95'])} |")
    head = [f"| method | kernel | AUC uniform | AUC learned | Δ AUC (paired) | found in top {pct} uniform | "
            f"learned | Δ (paired) |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + lines)
