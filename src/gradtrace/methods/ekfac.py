"""EK-FAC influence with kronfluence as the engine, its per-module scores summed into per-group contributions.

    engine = EkfacEngine(model, train_loss, measurement, groups, factors_dir="f")   # generic: Objectives, Groups
    engine.fit(train_examples, identity={...})          # kronfluence's covariance, eigenbasis and Λ, saved once
    contrib = engine.contributions(queries, train, c)   # (Q, N, M) float64: c_j(q, n), Σ_j = kronfluence's total
    self_c = engine.self_contributions(train, c)        # (N, M) float64: per-group self-influence

kronfluence tracks every `nn.Linear` and `nn.Conv2d` whose weight is trainable (not those inside
`nn.MultiheadAttention`, which never calls its projections' forward, nor a layer whose weight another module shares,
e.g. a language model's output layer tied to its embedding; models whose layers are other modules doing the same,
such as GPT-2's `Conv1D`, are given as Linear by their adapter's `influence_model`); its score of a query q and a
training example n is ∇f(q)ᵀ (G + δI)⁻¹ ∇L(n) with G the eigenvalue-corrected Kronecker-factored curvature of the
training loss (block-diagonal over modules), so per-module scores add up to the total. A module's score goes to the
group of its weight (`features.groups`: the same presets as the projected features; a rule that puts a module's weight
and bias in different groups is refused). Parameters outside tracked modules (norms, embeddings) have no EK-FAC
score. The sign makes a positive contribution mean "helpful": kronfluence's score as is when the measurement is a
loss (a helpful example lowers it), negated when higher is better (a classifier's margin).

Damping δ = c · mean(Λ), the mean over every module of the eigenvalue-corrected curvature diagonal (the EK-FAC
analogue of TRAK's λ = c · mean diag(ΦᵀΦ)/N); default c = 0.1, kronfluence's own heuristic scale.

The factors folder holds kronfluence's own files (`kronfluence/factors_ekfac/`, its `factor_arguments.json`
included) and `gradtrace-ekfac.json`, written last: the identity of the model, the training examples and the
settings they were fitted for. A folder whose manifest differs is refused; one without a manifest is refitted.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import Dataset

from gradtrace.adapters.base import Objective
from gradtrace.choices import EKFAC_DEFAULT_C as DEFAULT_C  # noqa: F401  (the CLI's choices)
from gradtrace.errors import UserError
from gradtrace.features.kron_projection import shared_parameters
from gradtrace.io import read_json, versions, write_json_atomic

MANIFEST = "gradtrace-ekfac.json"
FORMAT = "gradtrace.ekfac-factors/1"
ANALYSIS = "kronfluence"
FACTORS = "ekfac"
TRAIN, QUERY = 0, 1


class _Rows(Dataset):
    """Positions 0..n-1 of one example set, tagged with the set (kronfluence batches them with default collate)."""

    def __init__(self, which: int, n: int):
        self.which, self.n = which, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.which, i


class ObjectiveTask(Task):
    """kronfluence's Task from two gradtrace Objectives: the training loss and the measurement (query side).

    A batch is (set tags, positions); the examples are looked up in `sets` and handed to `batch_total`.
    """

    def __init__(self, train_loss: Objective, measurement: Objective, tracked: list[str], seed: int = 0):
        self.train_loss, self.measurement, self.tracked, self.seed = train_loss, measurement, tracked, seed
        self.sets: dict[int, Any] = {}

    def _examples(self, batch):
        which, rows = batch
        ex = self.sets[int(which[0])].take(np.asarray(rows.cpu(), dtype=np.int64))
        return ex.images, ex.ids, ex.cond

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, ids, cond = self._examples(batch)
        if sample:
            return self.train_loss.sampled_total(model, inputs, ids, cond, self.seed)
        return self.train_loss.batch_total(model, inputs, ids, cond)

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        inputs, ids, cond = self._examples(batch)
        return self.measurement.batch_total(model, inputs, ids, cond)

    def get_influence_tracked_modules(self) -> list[str]:
        return list(self.tracked)

    def get_attention_mask(self, batch):
        """The training loss's padding mask (sequence models), else None: kronfluence then counts every position."""
        inputs, ids, cond = self._examples(batch)
        return self.train_loss.token_mask(inputs, ids, cond)


def tracked_modules(model: nn.Module) -> list[str]:
    """Names of the modules kronfluence scores: Linear / Conv2d with a trainable weight, outside attention, whose
    weight no other module shares (a tied output layer sees only its own part of the shared weight's gradient)."""
    inside_attention = {f"{name}.{child}" if name else child
                        for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                        for child, _ in m.named_modules() if child}
    shared = shared_parameters(model)
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad and name not in inside_attention
            and id(m.weight) not in shared]


def module_groups(model: nn.Module, modules: list[str], group_of: Callable[[str], str]) -> dict[str, str]:
    """module name → the group of its weight; refuses a group rule that splits a module's weight and bias."""
    out = {}
    for name in modules:
        m = model.get_submodule(name)
        group = group_of(f"{name}.weight")
        if getattr(m, "bias", None) is not None and m.bias.requires_grad and group_of(f"{name}.bias") != group:
            raise UserError(f"the groups put {name}.weight and {name}.bias apart; EK-FAC scores whole modules, "
                            "use --groups module or block (not tensor)")
        out[name] = group
    return out


_FROZEN: list[bool] = []  # nesting of _quiet: only the outermost freezes and unfreezes


@contextlib.contextmanager
def _quiet():
    """kronfluence's GradScaler deprecation warning and info logs are not the user's business. The objects that
    exist before the call are frozen out of the garbage collector meanwhile: kronfluence runs a full `gc.collect()`
    around every stage, which walks the whole heap (seconds once transformers is imported) and finds nothing there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*GradScaler.*")
        outer = not _FROZEN
        if outer:
            gc.freeze()
        _FROZEN.append(True)
        try:
            yield
        finally:
            _FROZEN.pop()
            if outer:
                gc.unfreeze()


class EkfacEngine:
    """kronfluence on one model: factors fitted once in `factors_dir`, then per-group scores (module docstring)."""

    def __init__(self, model: nn.Module, train_loss: Objective, measurement: Objective,
                 group_of: Callable[[str], str], group_order: list[str], *, factors_dir, sign: float = 1.0,
                 batch_size: int = 64, seed: int = 0, progress: bool = True, dtype: torch.dtype = torch.float32,
                 empirical_fisher: bool | None = None):
        modules = tracked_modules(model)
        if not modules:
            raise UserError("the model has no linear or convolution layer with trainable weights; EK-FAC "
                            "(kronfluence) scores only nn.Linear and nn.Conv2d modules — use --method trak")
        self.module_group = module_groups(model, modules, group_of)
        used = set(self.module_group.values())
        self.group_names = [g for g in group_order if g in used]
        self.untracked = sorted({n for n, p in model.named_parameters() if p.requires_grad}
                                - {f"{m}.{t}" for m in modules for t in ("weight", "bias")})
        self.sign, self.batch_size, self.progress, self.dtype = float(sign), int(batch_size), progress, dtype
        self.factors_dir = Path(factors_dir)
        self.task = ObjectiveTask(train_loss, measurement, modules, seed=seed)
        can_sample = bool(getattr(train_loss, "samples_targets", False))
        self.empirical_fisher = not can_sample if empirical_fisher is None else bool(empirical_fisher)
        if not self.empirical_fisher and not can_sample:
            raise UserError("this training loss cannot draw targets from the model (the true Fisher); use the "
                            "empirical Fisher")
        with _quiet():
            self.model = prepare_model(model, self.task)
        self._analyzer: Analyzer | None = None
        self._mean_lambda: float | None = None

    @property
    def analyzer(self) -> Analyzer:
        """kronfluence's Analyzer, made on first use (it creates its output folder)."""
        if self._analyzer is None:
            with _quiet():
                self._analyzer = Analyzer(ANALYSIS, self.model, self.task, cpu=_on_cpu(self.model),
                                          disable_tqdm=not self.progress, output_dir=str(self.factors_dir),
                                          log_level=logging.WARNING)
        return self._analyzer

    # ------------------------------------------------------------------ factors
    def factor_arguments(self) -> FactorArguments:
        d = self.dtype
        return FactorArguments(strategy="ekfac", use_empirical_fisher=self.empirical_fisher,
                               covariance_max_examples=None, lambda_max_examples=None,
                               activation_covariance_dtype=d, gradient_covariance_dtype=d,
                               per_sample_gradient_dtype=d, lambda_dtype=d)

    def fit(self, train, identity: dict) -> dict:
        """Fit (or reuse) the factors on the training examples; returns the factors manifest. `identity` (model
        fingerprint, training ids, measurement settings) must match a folder's manifest for it to be reused."""
        identity = {**identity, "modules": self.module_group, "fisher": self.fisher}
        path = self.factors_dir / MANIFEST
        if path.exists():
            doc = read_json(path, "EK-FAC factors manifest")
            if not isinstance(doc, dict) or doc.get("identity") != json.loads(json.dumps(identity)):
                raise UserError(f"the EK-FAC factors in {self.factors_dir} were fitted for another model, training "
                                "set or settings; pass another --factors folder or remove that one")
            return doc
        self.factors_dir.mkdir(parents=True, exist_ok=True)
        self.task.sets[TRAIN] = train
        with _quiet():
            self.analyzer.fit_all_factors(FACTORS, _Rows(TRAIN, len(train.ids)), per_device_batch_size=self.batch_size,
                                          factor_args=self.factor_arguments(), overwrite_output_dir=True)
        doc = {"format": FORMAT, "identity": identity, "n_train": int(len(train.ids)),
               "kronfluence_factors": f"{ANALYSIS}/factors_{FACTORS}",
               "factor_arguments": _jsonable_args(self.factor_arguments()), "untracked_parameters": self.untracked,
               "mean_lambda": self.mean_lambda(), "versions": versions()}
        write_json_atomic(path, doc)
        return doc

    @property
    def fisher(self) -> str:
        return "empirical" if self.empirical_fisher else "true (sampled targets)"

    def mean_lambda(self) -> float:
        """mean(Λ) over every tracked module's eigenvalue-corrected diagonal (the scale of the damping)."""
        if self._mean_lambda is None:
            lam = self.analyzer.load_lambda_matrices(FACTORS)
            total, count = 0.0, 0
            for name, mat in lam["lambda_matrix"].items():
                total += float(mat.double().sum() / lam["num_lambda_processed"][name].double().sum())
                count += mat.numel()
            self._mean_lambda = total / count
        return self._mean_lambda

    def damping(self, c: float) -> float:
        return float(c) * self.mean_lambda()

    # ------------------------------------------------------------------ scores
    def _score_arguments(self, c: float, per_module: bool) -> ScoreArguments:
        d = self.dtype
        return ScoreArguments(damping_factor=self.damping(c), compute_per_module_scores=per_module,
                              score_dtype=d, precondition_dtype=d, per_sample_gradient_dtype=d)

    def _pairwise(self, queries, train, c: float, per_module: bool) -> dict[str, torch.Tensor]:
        self.task.sets[TRAIN], self.task.sets[QUERY] = train, queries
        name = "pairwise-modules" if per_module else "pairwise-total"
        with _quiet():
            self.analyzer.compute_pairwise_scores(
                name, FACTORS, _Rows(QUERY, len(queries.ids)), _Rows(TRAIN, len(train.ids)),
                per_device_query_batch_size=self.batch_size, per_device_train_batch_size=self.batch_size,
                score_args=self._score_arguments(c, per_module), overwrite_output_dir=True)
            scores = self.analyzer.load_pairwise_scores(name)
        self.last_score_arguments = read_json(self.analyzer.scores_output_dir(name) / "score_arguments.json")
        shutil.rmtree(self.analyzer.scores_output_dir(name), ignore_errors=True)  # kept: our arrays + arguments
        return scores

    def contributions(self, queries, train, c: float = DEFAULT_C) -> np.ndarray:
        """(Q, N, M) float64 c_j(q, n): kronfluence's per-module scores summed per group, signed (docstring)."""
        return self._by_group(self._pairwise(queries, train, c, per_module=True), (len(queries.ids), len(train.ids)))

    def total(self, queries, train, c: float = DEFAULT_C) -> np.ndarray:
        """(Q, N) float64 kronfluence's own total score (all modules at once), signed like `contributions`."""
        total = self._pairwise(queries, train, c, per_module=False)["all_modules"]
        return self.sign * per_example(total, (len(queries.ids), len(train.ids)))

    def self_contributions(self, train, c: float = DEFAULT_C, *, measurement: bool = False) -> np.ndarray:
        """(N, M) float64 per-group self-influence ∇L(n)ᵀ (G + δI)⁻¹ ∇L(n) of the training loss (kronfluence's
        `compute_self_scores` per module; unsigned: a loss on both sides). `measurement=True`: the example scored as
        its own query, sign · ∇f(n)ᵀ (G + δI)⁻¹ ∇L(n) with f the measurement (kronfluence's
        `use_measurement_for_self_influence`), signed like `contributions`."""
        self.task.sets[TRAIN] = train
        name = "self-modules"
        args = self._score_arguments(c, True)
        args.use_measurement_for_self_influence = bool(measurement)
        with _quiet():
            self.analyzer.compute_self_scores(name, FACTORS, _Rows(TRAIN, len(train.ids)),
                                              per_device_train_batch_size=self.batch_size,
                                              score_args=args, overwrite_output_dir=True)
            scores = self.analyzer.load_self_scores(name)
        shutil.rmtree(self.analyzer.scores_output_dir(name), ignore_errors=True)
        out = np.zeros((len(train.ids), len(self.group_names)))
        for module, s in scores.items():
            if s.shape[0] != len(train.ids):
                raise UserError("self-influence needs one row per example; this objective repeats each example "
                                f"over {s.shape[0] // len(train.ids)} rows (pass timesteps 1)")
            out[:, self.group_names.index(self.module_group[module])] += s.double().numpy()
        return self.sign * out if measurement else out

    def _by_group(self, scores: dict[str, torch.Tensor], shape: tuple[int, int]) -> np.ndarray:
        out = np.zeros((*shape, len(self.group_names)))
        for module, s in scores.items():
            out[:, :, self.group_names.index(self.module_group[module])] += per_example(s, shape)
        return self.sign * out


def per_example(scores: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(Q, N) float64 from kronfluence's scores of batch rows: an objective that repeats each example over R rows
    (diffusion timesteps, example-major) gives (Q·R_q, N·R_n) row scores, and the score is bilinear in the
    gradients, so an example pair's score is the sum of its R_q × R_n block."""
    s = scores.double().numpy()
    (q, n), (rq, rn) = shape, s.shape
    if rq % q or rn % n:
        raise UserError(f"kronfluence scored {rq} x {rn} rows for {q} x {n} examples; the objective must give every "
                        "example the same number of rows")
    return s.reshape(q, rq // q, n, rn // n).sum(axis=(1, 3))


def _on_cpu(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is None or p.device.type == "cpu"


def _jsonable_args(args) -> dict:
    return {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(args).items()}
