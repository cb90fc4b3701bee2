"""An aspect objective that needs no labels on the training data: families of learning queries that share one
aspect's value should find the same training examples.

Learning queries are generated in families: every query of family f was asked for the same value of the aspect
(e.g. style = striped) with the other aspects varied. For weights w, with τ_w(q, ·) the scores of query q,
z_q = τ_w(q, ·) / ‖τ_w(q, ·)‖₂ and T_k(q) its top-k (detached, as in the SNR objective):

    A(q, q') = (1/k) Σ_{n ∈ T_k(q)} z_{q'}(n)          how high q' scores the examples q ranks first
    L_family(w) = − [ mean_{q ≠ q', same family} A(q, q') − mean_{different families} A(q, q') ]
    L(w) = L_family(w) + β · L_SNR(w),   L_SNR(w) = − mean_q A(q, q)

A(q, q) is the seed's signal-to-noise ratio, so β weighs the SNR objective in (β = 0: the family term alone).
Groups whose top-k follows the shared value rise; groups whose top-k follows the varied aspects, or that rank
the same examples first for every query, fall. Queries without a family value (None) only serve as negatives.

Before learning, `family_signal` asks whether the families agree at all under uniform weights: the criterion
−L_family(uniform) against the same criterion with the family values permuted over the queries (a permutation
test, no labels). Where the families agree no more than chance (p > 0.01), the features do not carry the aspect for
these queries, and weights could only pick up groups that follow something else; `learn_family_weights` then keeps
uniform weights and says so. On held-out shapes queried from the image alone the subject families had p = 0.15-0.17
and their learned weights lowered subject Recall@10 by 0.04-0.21; with one-aspect prompts on one text-to-image build
the background families had p = 0.72 and 0.048 (their weights: -0.09 and -0.15); every other aspect of the shapes
and text-to-image benchmarks had p <= 0.002 (docs/benchmarks.md, "The shared kernel's c for inside weights").
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gradtrace.errors import UserError
from gradtrace.methods.fitted import FittedMethod
from gradtrace.weights.learn import WeightsResult, dense_contributions, optimise_weights
from gradtrace.weights.objective import check_k, softmax_weights

OBJECTIVES = ("snr", "family", "snr+family")
MAX_DENSE_BYTES = 2 * 2**30
SIGNAL_P = 0.01          # family_signal: learn only where the families agree beyond chance at this level
SIGNAL_PERMUTATIONS = 2000


def family_codes(values: list) -> np.ndarray:
    """(Q,) int64: one code per distinct value; None gets a code of its own per query (negatives only)."""
    distinct = sorted({str(v) for v in values if v is not None})
    code = {v: i for i, v in enumerate(distinct)}
    out = np.array([code[str(v)] if v is not None else -1 - i for i, v in enumerate(values)], dtype=np.int64)
    same = (out[:, None] == out[None, :]) & ~np.eye(len(out), dtype=bool)
    if not same.any() or (out[:, None] != out[None, :]).sum() == 0:
        raise UserError("the family objective needs at least two learning queries sharing a value and two with "
                        "different values; generate families (several queries per value, the others varied)")
    return out


def family_loss(contrib: torch.Tensor, w: torch.Tensor, families: Any, k: int, snr_weight: float = 0.0):
    """L(w) above for dense contributions (Q, N, M), weights (M,), family codes (Q,) (see `family_codes`)."""
    k = check_k(k, contrib.shape[1])
    fam = torch.as_tensor(np.asarray(families))
    tau = contrib @ w.to(contrib.dtype)                                   # (Q, N)
    norm = tau.norm(dim=1, keepdim=True)
    z = tau / torch.where(norm > 0, norm, torch.ones_like(norm))
    idx = torch.topk(tau.detach(), k, dim=1).indices                      # (Q, k)
    agree = z[:, idx].mean(dim=2).T                                       # (Q, Q'): A(q, q')
    eye = torch.eye(len(fam), dtype=torch.bool)
    same = (fam[:, None] == fam[None, :]) & ~eye
    diff = fam[:, None] != fam[None, :]
    loss = -(agree[same].mean() - agree[diff].mean())
    if snr_weight:
        loss = loss - float(snr_weight) * torch.diagonal(agree).mean()
    return loss


def family_signal(scores: Any, families: list, k: int, *, permutations: int = SIGNAL_PERMUTATIONS,
                  seed: int = 0) -> tuple[float, float]:
    """(criterion, p): the family criterion of a (Q, N) score matrix (within-family minus across-family mean of
    A(q, q'), module docstring) and its permutation p-value, (1 + #{permuted >= observed}) / (permutations + 1), with
    the family values shuffled over the queries (`seed` fixes the shuffles)."""
    tau = np.asarray(scores, dtype=np.float64)
    codes = family_codes(list(families))
    norm = np.linalg.norm(tau, axis=1, keepdims=True)
    z = tau / np.where(norm > 0, norm, 1.0)
    top = torch.topk(torch.from_numpy(tau), check_k(k, tau.shape[1]), dim=1).indices.numpy()
    agree = np.stack([z[:, t].mean(axis=1) for t in top])                  # [q, q'] = A(q, q')
    off = ~np.eye(len(codes), dtype=bool)

    def criterion(c: np.ndarray) -> float:
        same = (c[:, None] == c[None, :]) & off
        return float(agree[same].mean() - agree[c[:, None] != c[None, :]].mean())

    observed = criterion(codes)
    rng = np.random.default_rng(seed)
    beyond = sum(criterion(rng.permutation(codes)) >= observed for _ in range(int(permutations)))
    return observed, (1 + beyond) / (int(permutations) + 1)


def learn_family_weights(fitted: FittedMethod, query_features: Any, families: list, *, objective: str = "family",
                         k: int, steps: int, lr: float, l2: float, seed: int = 0,
                         progress: bool = True, signal_p: float | None = SIGNAL_P) -> WeightsResult:
    """Group weights by the family objective (`objective` "family": β = 0; "snr+family": β = 1), AdamW on θ
    from uniform as `learn_weights`; dense contributions of the learning queries (a few hundred at most).

    `signal_p`: where `family_signal` of the uniform scores gives p > signal_p, the weights stay uniform (no steps;
    `info["family_signal"]["learned"]` is False); None learns regardless."""
    if objective not in OBJECTIVES[1:]:
        raise UserError(f"unknown family objective '{objective}'; use one of {', '.join(OBJECTIVES[1:])}")
    phi_q = np.asarray(query_features, dtype=np.float64)
    if len(families) != len(phi_q):
        raise UserError(f"{len(families)} family values for {len(phi_q)} learning queries; give one per query")
    if phi_q.shape[0] * fitted.n_train * fitted.n_groups * 8 > MAX_DENSE_BYTES:
        raise UserError("the family objective holds every learning query's contributions in memory; use fewer "
                        "learning queries")
    codes = family_codes(families)
    contrib = torch.from_numpy(dense_contributions(fitted, phi_q))
    beta = 1.0 if objective == "snr+family" else 0.0
    criterion, p = family_signal(contrib.sum(dim=2).numpy(), list(codes), k)
    signal = {"criterion": criterion, "p_value": p, "permutations": SIGNAL_PERMUTATIONS, "threshold": signal_p,
              "learned": signal_p is None or p <= signal_p}
    opts = {"k": check_k(k, fitted.n_train), "steps": int(steps) if signal["learned"] else 0, "lr": float(lr),
            "l2": float(l2), "seed": int(seed)}

    def make():
        return (lambda w, last=False: family_loss(contrib, w, codes, opts["k"], beta)), "dense-family"  # noqa: E731

    theta, curve, info = optimise_weights(make, tuple(contrib.shape), opts, progress)
    info.update({"objective": objective, "snr_weight": beta, "families": int(len(set(codes[codes >= 0].tolist()))),
                 "guard_mode": "none", "family_signal": signal})
    weights = softmax_weights(torch.from_numpy(theta)).numpy().astype(np.float64)
    return WeightsResult(weights=weights, theta=theta, group_names=fitted.group_names, loss_curve=curve, info=info)
