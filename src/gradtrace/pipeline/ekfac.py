"""EK-FAC stages (`attribute-ekfac`, `learn-weights-ekfac`) and per-group self-influence: kronfluence on the model
and data directly (`gradtrace.methods.ekfac`), so no feature store; its per-group contributions take the learned
weights exactly as TRAK's do, τ_w(q, n) = Σ_j w_j c_j(q, n), and the output is the `attribute` artefact.

The training set is the checkpoint's own (its recorded dataset and training ids); queries and learning queries are
examples of `--data` (default: the checkpoint's dataset) chosen by `--ids` (held-out images, never training ones).
The factors are fitted once per `--factors` folder (kronfluence's files and arguments + a gradtrace manifest) and
reused by every later command that passes the same folder for the same model, training set and settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gradtrace.adapters import adapter_of
from gradtrace.attribution import write_contribution_attributions
from gradtrace.data.sources import dataset_source
from gradtrace.errors import UserError
from gradtrace.evaluate.mislabel import EKFAC_FACTORS, GroupSelfInfluence, register_self_influence
from gradtrace.features.groups import make_groups
from gradtrace.io import command_line, read_json, sha256_arrays
from gradtrace.methods import lambda_grid
from gradtrace.methods.ekfac import DEFAULT_C, EkfacEngine
from gradtrace.pipeline.devices import resolve_device
from gradtrace.pipeline.specs.ekfac import AUTO, GRID, AttributeEkfacSpec, EkfacInputs, LearnWeightsEkfacSpec, parse_c
from gradtrace.pipeline.train import resolve_ids
from gradtrace.weights import DEFAULT_K, learn_weights_dense, load_weights, save_weights, snr_loss


@dataclass
class EkfacSetup:
    """The fitted engine with what the stages record about it."""

    engine: EkfacEngine
    adapter: object
    checkpoint: object
    train: object
    measurement: str
    identity: dict
    factors: dict = field(default_factory=dict)

    def fit(self) -> "EkfacSetup":
        """Fit (or reuse) the factors: after every input was read and checked, so bad input writes nothing."""
        self.factors = self.engine.fit(self.train, self.identity)
        return self

    def use_training_examples(self, examples) -> None:
        """Fit and score `examples` (e.g. with flipped labels as `cond`) instead of the checkpoint's recorded set."""
        self.train = examples
        self.identity.update(train_source=examples.source,
                             train_ids_sha256=sha256_arrays([np.asarray(examples.ids)]),
                             train_cond_sha256=sha256_arrays([np.asarray(examples.cond)]))

    def examples(self, spec: EkfacInputs, ids):
        source = self.train.source if spec.data is None else dataset_source(spec.data, n=spec.n, size=spec.size,
                                                                            seed=spec.data_seed)
        ex = self.adapter.examples(self.checkpoint.model_config, source, ids=resolve_ids(ids))
        if len(ex.ids) == 0:
            raise UserError("no examples to score (empty ids); pass at least one id")
        return ex


def setup(spec: EkfacInputs, default_factors: Path, *, progress: bool = True) -> EkfacSetup:
    """Load the checkpoint and build the engine from the adapter's objectives and groups (`.fit()` fits the factors)."""
    adapter = adapter_of(spec.checkpoint)
    ckpt = adapter.load(spec.checkpoint)
    measurement = spec.measurement or adapter.default_measurement
    if measurement not in adapter.measurements:
        raise UserError(f"unknown measurement '{measurement}' for {adapter.name} models; use one of "
                        f"{', '.join(adapter.measurements)}")
    source = (ckpt.config.get("dataset") or {}).get("source")
    if not source or not source.get("spec"):
        raise UserError(f"the checkpoint {spec.checkpoint} does not record its training data; EK-FAC needs it")
    train = adapter.examples(ckpt.model_config, source, ids=ckpt.train_ids)
    device = resolve_device(spec.device)
    model = adapter.influence_model(ckpt).to(device)
    groups = make_groups(model, spec.groups, preset_key=adapter.group_key, adapter_presets=adapter.group_presets)
    key = {p: g.name for g in groups for p in g.params}
    loss = adapter.objective(ckpt, adapter.train_loss_measurement, spec.timesteps, spec.noise_seed).to(device)
    meas = adapter.objective(ckpt, measurement, spec.timesteps, spec.noise_seed).to(device)
    fisher = {"auto": None, "true": False, "empirical": True}[spec.fisher]
    engine = EkfacEngine(model, loss, meas, key.__getitem__, [g.name for g in groups],
                         factors_dir=Path(spec.factors) if spec.factors else default_factors,
                         sign=1.0 if adapter.measurement_is_loss(measurement) else -1.0, batch_size=spec.batch_size,
                         seed=spec.noise_seed, progress=progress, empirical_fisher=fisher)
    identity = {"model_fingerprint": ckpt.fingerprint, "train_source": source,
                "train_ids_sha256": sha256_arrays([train.ids]), "train_loss": loss.info(), "groups": spec.groups,
                "timesteps": spec.timesteps, "noise_seed": spec.noise_seed}
    return EkfacSetup(engine, adapter, ckpt, train, measurement, identity)


def query_set_id(examples) -> dict:
    return {"source": examples.source, "ids_sha256": sha256_arrays([np.asarray(examples.ids, np.int64)])}


def choose_c(s: EkfacSetup, learning, k: int) -> tuple[float, list]:
    """(c, [[c, loss], ...]): the c of the grid whose uniform-weight SNR objective on the learning queries is lowest."""
    c, table, _ = choose_c_contributions(s, learning, k)
    return c, table


def choose_c_contributions(s: EkfacSetup, learning, k: int) -> tuple[float, list, np.ndarray]:
    """`choose_c` and the learning queries' (Q, N, M) contributions at the chosen c (computed on the way)."""
    table, best = [], None  # best: (loss, c, contributions), only the best so far kept
    for c in lambda_grid(GRID):
        contrib = s.engine.contributions(learning, s.train, float(c))
        m = contrib.shape[2]
        loss = float(snr_loss(torch.from_numpy(contrib), torch.full((m,), 1.0 / m, dtype=torch.float64), k))
        table.append([float(c), loss])
        if best is None or (loss, float(c)) < best[:2]:
            best = (loss, float(c), contrib)
    return best[1], table, best[2]


def learning_contributions(s: EkfacSetup, learning, lambda_c, k: int) -> tuple[float, list | None, np.ndarray]:
    """(c, its grid table or None, the learning queries' (Q, N, M) contributions at c) for weight learning: c as
    given (`parse_c`: "auto" = `choose_c_contributions` with top-k `k`, None = DEFAULT_C)."""
    c = parse_c(lambda_c)
    if c == AUTO:
        return choose_c_contributions(s, learning, k)
    c = DEFAULT_C if c is None else c
    return c, None, s.engine.contributions(learning, s.train, c)


def _manifest(s: EkfacSetup, spec, queries, extra: dict) -> dict:
    e = s.engine
    return {"method": {"method": "ekfac", "engine": "kronfluence", "kernel": "ekfac", "fisher": e.fisher,
                       "sign": e.sign, "modules": e.module_group},
            "train_source": s.train.source, "query_source": queries.source,
            "model_fingerprint": s.checkpoint.fingerprint, "groups_spec": spec.groups,
            "measurement": {"name": s.measurement, "train_loss": s.identity["train_loss"]},
            "ekfac": {"factors": str(e.factors_dir.resolve()), "factor_arguments": s.factors.get("factor_arguments"),
                      "score_arguments": getattr(e, "last_score_arguments", None),
                      "untracked_parameters": e.untracked},
            "spec": spec.to_dict(), **extra}


def _read_weights(s: EkfacSetup, path, queries) -> tuple[np.ndarray, dict]:
    """Weights in the engine's group order: a learn-weights-ekfac file learned for this model, training set,
    groups and measurement on other queries, or a plain {"weights": {group: w}}."""
    doc = read_json(path, "weights file")
    names = s.engine.group_names
    if isinstance(doc, dict) and "format" in doc:
        w, doc = load_weights(path, names)
        prov = doc.get("provenance", {})
        mine = {k: s.identity[k] for k in ("model_fingerprint", "train_ids_sha256")}
        if prov.get("method") != "ekfac" or {k: prov.get("identity", {}).get(k) for k in mine} != mine \
                or prov.get("measurement") != s.measurement:
            raise UserError(f"{path} was not learned for EK-FAC on this model, training set and measurement; "
                            "learn them with learn-weights-ekfac")
        if prov.get("learning_queries") == query_set_id(queries):
            raise UserError(f"the queries are the learning queries of {path}; evaluate on other ids")
    else:
        table = doc.get("weights") if isinstance(doc, dict) else None
        if not isinstance(table, dict) or sorted(table) != sorted(names):
            raise UserError(f"{path} must hold {{\"weights\": {{group: weight}}}} naming the EK-FAC groups "
                            f"{', '.join(names)}")
        w = np.asarray([table[n] for n in names], dtype=np.float64)
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise UserError(f"weights in {path} must be finite, non-negative and not all zero")
    prov = doc.get("provenance", {}) if isinstance(doc.get("provenance"), dict) else {}
    return w, {"path": str(Path(path).resolve()), "format": doc.get("format", "plain"), "aspect": None,
               "lambda_c": prov.get("lambda_c"), "weights": dict(zip(names, np.asarray(w).tolist()))}


def attribute_ekfac_run(spec: AttributeEkfacSpec, *, progress: bool = True) -> dict:
    """Top-k training examples per query with per-group EK-FAC contributions (weighted when --weights)."""
    c = parse_c(spec.lambda_c)
    if spec.learning_ids is not None and c != AUTO:
        raise UserError("--learning-ids is only used with --lambda-c auto; drop it or pass --lambda-c auto")
    if c == AUTO and spec.learning_ids is None:
        raise UserError("--lambda-c auto chooses c on learning queries; pass --learning-ids FILE (not the --ids)")
    if spec.weights is not None and not Path(spec.weights).is_file():
        raise UserError(f"weights file not found: {spec.weights}")
    s = setup(spec, Path(spec.out) / "factors", progress=progress)
    queries = s.examples(spec, spec.ids)
    weights, winfo = _read_weights(s, spec.weights, queries) if spec.weights else (None, None)
    learning = s.examples(spec, spec.learning_ids) if c == AUTO else None
    if learning is not None and query_set_id(learning) == query_set_id(queries):
        raise UserError("--learning-ids are the --ids; choose λ on other queries")
    s.fit()
    if c == AUTO:
        c, table = choose_c(s, learning, min(DEFAULT_K, len(s.train.ids)))
        lam = {"c": c, "rule": "auto: SNR-best on the learning queries", "grid": table,
               "learning_queries": query_set_id(learning)}
    elif c is None:
        c = winfo["lambda_c"] if winfo and winfo.get("lambda_c") is not None else DEFAULT_C
        lam = {"c": c, "rule": "weights file" if winfo and winfo.get("lambda_c") is not None else "default"}
    else:
        lam = {"c": c, "rule": "given"}
    lam["damping"] = s.engine.damping(c)
    contrib = s.engine.contributions(queries, s.train, c)
    return write_contribution_attributions(
        contrib, weights, train_ids=s.train.ids, query_ids=queries.ids, group_names=s.engine.group_names,
        out=spec.out, top_k=spec.top_k, manifest=_manifest(s, spec, queries, {"weights": winfo, "lambda": lam}))


def learn_weights_ekfac_run(spec: LearnWeightsEkfacSpec, *, progress: bool = True) -> tuple[Path, dict]:
    """Learn group weights for EK-FAC on learning queries (`--ids`); returns (weights file, its document)."""
    out = Path(spec.out)
    s = setup(spec, out.with_name(out.stem + "-factors"), progress=progress)
    learning = s.examples(spec, spec.ids)
    s.fit()
    c, table, contrib = learning_contributions(s, learning, spec.lambda_c, min(spec.k, len(s.train.ids)))
    result = learn_weights_dense(contrib, s.engine.group_names, k=spec.k, steps=spec.steps, lr=spec.lr, l2=spec.l2,
                                 guard=spec.guard, progress=progress)
    provenance = {"command": command_line(), "spec": spec.to_dict(), "method": "ekfac", "kernel": "ekfac",
                  "base_method": _manifest(s, spec, learning, {})["method"], "identity": s.identity,
                  "measurement": s.measurement, "factors": str(s.engine.factors_dir.resolve()),
                  "lambda_c": c, "damping": s.engine.damping(c), "lambda_grid": table, "aspect": None,
                  "groups_preset": spec.groups, "learning_queries": query_set_id(learning),
                  "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1], "learner": result.info}
    path = save_weights(out, result, provenance)
    return path, read_json(path, "weights file")


@dataclass
class SelfInfluence:
    """Per-group EK-FAC self-influence of training examples: `contributions[n, j]` for example `ids[n]` and group
    `group_names[j]`; the total (uniform weights) is `contributions.sum(1)`, with weights `contributions @ w`."""

    ids: np.ndarray
    group_names: list[str]
    contributions: np.ndarray
    info: dict


def self_influence(checkpoint, *, examples=None, groups: str = "block", lambda_c: float = DEFAULT_C, factors=None,
                   fisher: str = "auto", batch_size: int = 64, timesteps: int = 10, noise_seed: int = 0,
                   device: str = "auto", progress: bool = True) -> SelfInfluence:
    """Per-group EK-FAC self-influence ∇L(n)ᵀ (G + δI)⁻¹ ∇L(n) of every training example of `checkpoint` (the
    training loss on both sides), δ = lambda_c · mean(Λ). The training set is the checkpoint's recorded one, or
    `examples` (a `gradtrace.data.sources.Examples`, e.g. with flipped labels as `cond`): the factors are fitted on
    it and it is scored. `factors`: the factors folder (default: CHECKPOINT-ekfac-factors beside the checkpoint),
    fitted once and reused for the same model, examples (ids and labels) and settings."""
    spec = EkfacInputs(checkpoint=str(checkpoint), ids=np.zeros(0, np.int64), groups=groups, factors=factors,
                       fisher=fisher, timesteps=timesteps, noise_seed=noise_seed, batch_size=batch_size,
                       device=device)
    c = parse_c(lambda_c)
    if c is None or c == AUTO:
        raise UserError("self_influence takes a number lambda_c >= 0")
    path = Path(checkpoint)
    s = setup(spec, path.with_name(path.name + "-ekfac-factors"), progress=progress)
    if examples is not None:
        s.use_training_examples(examples)
    s.fit()
    contrib = s.engine.self_contributions(s.train, c)
    return SelfInfluence(ids=np.asarray(s.train.ids, np.int64), group_names=list(s.engine.group_names),
                         contributions=contrib, info={"lambda_c": c, "damping": s.engine.damping(c),
                                                      "factors": str(s.engine.factors_dir.resolve()),
                                                      "fisher": s.engine.fisher, "identity": s.identity})


def mislabel_self_influence(inputs, lambda_c, *, factors, batch_size: int = 64, progress: bool = False):
    """`eval mislabel --methods ekfac`: the EK-FAC `GroupSelfInfluence` of the corrupted model (`inputs`:
    `gradtrace.evaluate.mislabel.SelfInfluenceInputs`). The factors are fitted on its training examples at their
    corrupted labels (`factors` folder, reused when it matches); the groups and measurement are those of its
    feature stores. Self-influence of example n = the example scored as its own query, per group:
    sign · ∇f(n)ᵀ (G + δI)⁻¹ ∇L(n), f the measurement at the corrupted label; for the training loss (`loss`)
    that is ∇L(n)ᵀ (G + δI)⁻¹ ∇L(n), kronfluence's `compute_self_scores`. c: "auto" = the SNR-best c on the
    learning queries (as learn-weights-ekfac), a number, or None = DEFAULT_C. The weights are learned from the
    learning queries' contributions at that c (`learning_contributions`)."""
    train = inputs.train
    measurement = train.settings["measurement"]["name"]
    spec = EkfacInputs(checkpoint=str(inputs.checkpoint), ids=np.zeros(0, np.int64),
                       groups=train.settings["groups_spec"], measurement=measurement, factors=str(factors),
                       batch_size=batch_size)
    s = setup(spec, Path(factors), progress=progress)
    s.use_training_examples(inputs.train_examples)
    s.fit()
    k = min(DEFAULT_K, len(train.ids))
    c, table, learn_contrib = learning_contributions(s, inputs.learn_examples, lambda_c, k)
    values = s.engine.self_contributions(s.train, c, measurement=measurement != s.adapter.train_loss_measurement)
    e = s.engine
    info = {"method": "ekfac", "engine": "kronfluence", "kernel": "ekfac", "lambda_c": c, "lambda_grid": table,
            "damping": e.damping(c), "fisher": e.fisher, "sign": e.sign, "measurement": measurement,
            "train_loss": s.identity["train_loss"], "factors": str(e.factors_dir.resolve()),
            "modules": e.module_group, "untracked_parameters": e.untracked}
    return GroupSelfInfluence(values, list(e.group_names), info, learning_contributions=learn_contrib)


def _mislabel_provider(inputs, method: str, kernel: str, c, progress: bool = False) -> GroupSelfInfluence:
    """`eval mislabel --methods ekfac`: factors kept in the corrupted run's folder (EKFAC_FACTORS)."""
    return mislabel_self_influence(inputs, c, factors=Path(inputs.checkpoint).parent / EKFAC_FACTORS,
                                   progress=progress)


register_self_influence("ekfac", _mislabel_provider, kernel="ekfac")


__all__ = ["AttributeEkfacSpec", "EkfacInputs", "LearnWeightsEkfacSpec", "SelfInfluence", "attribute_ekfac_run",
           "learn_weights_ekfac_run", "mislabel_self_influence", "self_influence"]
