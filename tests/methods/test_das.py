"""DAS (Diffusion Attribution Score) against a direct, unprojected computation of its formula on a tiny UNet:

    τ(q, n) = φ(q)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_n) · e_n

φ = the gradient of the mean predicted noise averaged over the T timesteps (plain autograd, one example at a
time), e_n = mean_t r_t / ‖r‖₂ with r_t the RMS residual of ε_θ on each timestep of the 100-point grid (one
forward per timestep), K per group or shared with λ = c · mean diag of the Gram block, inverted by numpy."""
import numpy as np
import pytest
import torch

from fixtures.unet import featurize_unet, random_inputs, tiny_model
from gradtrace.adapters.checkpoint import model_fingerprint
from gradtrace.adapters.diffusion.measure import RESIDUAL_STREAM, example_noise
from gradtrace.attribution import fit_method, score_queries
from gradtrace.cli import main
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec
from gradtrace.io import derive_seed

pytestmark = pytest.mark.usefixtures("one_thread")
TRAINABLE = ("unet.conv_in.", "unet.conv_out.", "unet.time_embedding.linear_2.bias")
T, NOISE_SEED, C = 3, 5, 0.05


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model, sched = tiny_model("conditional")
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINABLE))
    root = tmp_path_factory.mktemp("das")
    x, ids, cond = random_inputs(model, 9, seed=3)
    stores = {}
    for meas in ("das", "loss"):
        spec = FeatureSpec(groups="module", projection="identity", measurement=meas, num_timesteps=T,
                           noise_seed=NOISE_SEED, chunk_rows=4)
        for name, rows in (("train", slice(0, 6)), ("query", slice(6, 9))):
            stores[meas, name] = featurize_unet(model, sched, x[rows], ids[rows], root / meas / name, spec=spec,
                                                cond=cond[rows], model_fingerprint=model_fingerprint(model),
                                                progress=False)
    names = [p for g in stores["das", "train"].settings["groups"] for p in g["params"]]
    reference = direct(model, sched, x, ids, cond, names)
    return stores, reference, root


def direct(model, sched, x, ids, cond, names):
    """(Φ (n, p) float64 gradients of the mean output, e (n,) residual factors) by plain loops."""
    params = dict(model.named_parameters())
    abar = sched.alphas_cumprod.to(torch.float32)
    grid = [int((i + 0.5) * 1000 / T) for i in range(T)]
    residual_grid = [int((i + 0.5) * 1000 / 100) for i in range(100)]
    phi, e = [], []
    for b in range(len(ids)):
        c = torch.as_tensor(cond[b]).long().unsqueeze(0)
        noise = example_noise(NOISE_SEED, [ids[b]], grid, tuple(x.shape[1:]))[0]
        out = 0.0
        for j, t in enumerate(grid):
            xt = abar[t].sqrt() * x[b] + (1 - abar[t]).sqrt() * noise[j]
            out = out + model(xt.unsqueeze(0), torch.tensor([t]), c).mean() / T
        grads = torch.autograd.grad(out, [params[n] for n in names])
        phi.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
        rnoise = example_noise(derive_seed(RESIDUAL_STREAM, NOISE_SEED), [ids[b]], residual_grid,
                               tuple(x.shape[1:]))[0]
        r = []
        with torch.no_grad():
            for j, t in enumerate(residual_grid):
                xt = abar[t].sqrt() * x[b] + (1 - abar[t]).sqrt() * rnoise[j]
                pred = model(xt.unsqueeze(0), torch.tensor([t]), c)[0]
                r.append(float(((pred - rnoise[j]) ** 2).mean().sqrt()))
        r = np.asarray(r)
        e.append(r.mean() / np.linalg.norm(r))
    return np.stack(phi), np.asarray(e)


@pytest.mark.parametrize("kernel", ["per-group", "shared"])
def test_das_equals_its_formula_computed_directly(setup, kernel):
    stores, (phi_all, e_all), _ = setup
    train, query = stores["das", "train"], stores["das", "query"]
    phi, e, phi_q = phi_all[:6], e_all[:6], phi_all[6:]
    np.testing.assert_allclose(train.row_scale, e, rtol=1e-5)
    spans = [(0, phi.shape[1])] if kernel == "shared" else [(s, t) for _, s, t in train.group_slices]
    want = np.zeros((3, 6))
    for s, t in spans:
        gram = phi[:, s:t].T @ phi[:, s:t]
        k_mat = np.linalg.inv(gram + C * np.mean(np.diag(gram)) * np.eye(t - s))
        want += phi_q[:, s:t] @ k_mat @ phi[:, s:t].T
    want *= e[None, :]
    scored = score_queries(train, query, method="das", kernel=kernel, c=C, progress=False)
    got = scored.scores()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # bilinear per group: contributions sum to the score, and group weights scale them
    contrib = scored.fitted.contributions(scored.query_features)
    np.testing.assert_allclose(contrib.sum(-1), got, rtol=1e-5, atol=1e-6 * np.abs(got).max())
    w = np.linspace(0.5, 2.0, contrib.shape[-1])
    np.testing.assert_allclose(scored.scores(weights=w), contrib @ w, rtol=1e-4, atol=1e-5 * np.abs(got).max())


def test_das_stores_are_never_mixed_with_other_measurements(setup, capsys):
    stores, _, root = setup
    assert stores["loss", "train"].row_scale is None  # only DAS stores carry the residual factor
    with pytest.raises(UserError, match="needs features of measurement 'das'"):
        fit_method(stores["loss", "train"], "das", progress=False)
    with pytest.raises(UserError, match="'measurement' differs"):
        score_queries(stores["das", "train"], stores["loss", "query"], method="das", progress=False)
    assert main(["attribute", "--train", str(root / "loss" / "train"), "--queries", str(root / "loss" / "query"),
                 "--method", "das", "--out", str(root / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--measurement das" in err


def test_das_fit_leaves_the_callers_features_as_they_were():
    from gradtrace.methods import get_method

    phi = np.random.default_rng(0).normal(size=(20, 6))  # float64: rows are views, not copies
    before = phi.copy()
    scale = np.linspace(0.5, 1.5, 20)
    fitted = get_method("das", kernel="shared", c=0.1).fit(phi, [("a", 0, 3), ("b", 3, 6)], row_scale=scale)
    np.testing.assert_array_equal(phi, before)
    k = np.linalg.inv(phi.T @ phi + 0.1 * np.mean(np.diag(phi.T @ phi)) * np.eye(6))
    np.testing.assert_allclose(fitted.psi, (phi @ k) * scale[:, None], rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="needs each training example's factor"):
        get_method("das").fit(phi, [("a", 0, 6)])
