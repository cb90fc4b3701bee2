"""Our TRAK scores against the `traker` package (MadryLab) on the same tiny model, output function and λ.

Exact gradients on both sides (identity projection here, traker's NoOpProjector there), restricted to
a few parameter tensors so that traker's dense p × p inverse stays small. traker rescales its inverse by
the mean absolute entry of (XᵀX + λI)⁻¹, divides gradients by √p (p = number of parameters) and multiplies
by the out-to-loss term (1 here). With traker's λ set to ours / p, the two score matrices agree up to one
positive constant, 1 / (p · mean |(XᵀX + λI)⁻¹|), which the test recovers and checks.
"""
import numpy as np
import pytest
import torch
from torch.func import functional_call

from fixtures.unet import build_featurizer
from gradtrace.adapters.diffusion import build_model, default_model_config, make_scheduler
from gradtrace.features.featurize import FeatureSpec
from gradtrace.methods import get_method

trak = pytest.importorskip("trak", reason="traker is a dev extra; `make test` installs it")
from trak.modelout_functions import AbstractModelOutput  # noqa: E402
from trak.projectors import NoOpProjector  # noqa: E402

SELECTED = r"unet\.conv_out\.|unet\.mid_block\.attentions\.0\.to_v\."


class _DiffusionLoss(AbstractModelOutput):
    """traker output function: the ε-prediction loss of one example averaged over its T noisy copies."""

    def __init__(self, timesteps):
        self.t = torch.tensor(timesteps, dtype=torch.long)

    def get_output(self, model, weights, buffers, xt, noise):
        eps = functional_call(model, (weights, buffers), (xt, self.t, None))
        return ((eps - noise) ** 2).mean()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return torch.ones(batch[0].shape[0], 1)


def test_trak_scores_match_traker(tmp_path):
    cfg = default_model_config("unconditional", channels=1, size=8)
    model, sched = build_model(cfg, seed=3), make_scheduler(cfg)
    spec = FeatureSpec(groups=f"sel={SELECTED}", projection="identity", measurement="loss", num_timesteps=3)
    fz, groups = build_featurizer(model, sched, spec)
    sel = groups[[g.name for g in groups].index("sel")]
    start = sum(s for g, s in zip(groups, fz.sizes) if g.name != "sel" and groups.index(g) < groups.index(sel))
    stop = start + fz.sizes[groups.index(sel)]

    gen = torch.Generator().manual_seed(0)
    n_train, n_query = 40, 5
    x = torch.rand((n_train + n_query, 1, 8, 8), generator=gen) * 2 - 1
    ids = np.arange(n_train + n_query)
    feats = fz.features(x, ids)[:, start:stop]
    phi, q = feats[:n_train], feats[n_train:]
    fitted = get_method("trak", c=0.05).fit(phi, [("sel", 0, stop - start)])
    ours = fitted.scores(q)  # (Q, N)

    noise = fz.objective.measurement.noise(ids, (1, 8, 8))
    xt, _ = fz.objective.measurement.noisy_inputs(x, noise, sched.alphas_cumprod)
    p = phi.shape[1]
    traker = trak.TRAKer(model=model, task=_DiffusionLoss(fz.objective.measurement.timesteps), train_set_size=n_train,
                         save_dir=str(tmp_path / "trak"), device="cpu", projector=NoOpProjector(device="cpu"),
                         use_half_precision=False, grad_wrt=list(sel.params), lambda_reg=fitted.info["lambda"] / p,
                         logging_level=40)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=(xt[:n_train], noise[:n_train]), num_samples=n_train)
    traker.finalize_features()
    traker.start_scoring_checkpoint("q", model.state_dict(), model_id=0, num_targets=n_query)
    traker.score(batch=(xt[n_train:], noise[n_train:]), num_samples=n_query)
    theirs = np.asarray(traker.finalize_scores("q")).T  # traker returns (N, Q)

    alpha = float((theirs * ours).sum() / (ours * ours).sum())
    assert alpha > 0
    rel = np.abs(theirs - alpha * ours).max() / np.abs(theirs).max()
    assert rel < 2e-3, f"max relative deviation {rel:.2e}"  # traker inverts in float32; we solve in float64
    # The constant is traker's normalisation: 1 / (p · mean |(XᵀX + λI)⁻¹|).
    xtx = phi.astype(np.float64).T @ phi.astype(np.float64) + fitted.info["lambda"] * np.eye(phi.shape[1])
    assert alpha == pytest.approx(1.0 / (p * np.abs(np.linalg.inv(xtx)).mean()), rel=2e-3)
