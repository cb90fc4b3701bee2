"""Per-example gradient features against a plain autograd loop; store resumption and refusal."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fixtures.unet import build_featurizer, featurize_unet, random_inputs as _inputs, tiny_model as _model
from gradtrace.adapters.checkpoint import model_fingerprint
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec
from gradtrace.features.store import FeatureStore


def _loop_gradient(model, featurizer, x, i, cond):
    """The measurement's gradient for one example by plain autograd (no torch.func)."""
    m = featurizer.objective.measurement
    noise = m.noise([i], tuple(x.shape))
    xt, t = m.noisy_inputs(x.unsqueeze(0), noise, featurizer.objective.alphas_cumprod)
    c = None if cond is None else torch.as_tensor(cond).long().unsqueeze(0).expand(len(t), -1)
    model.zero_grad()
    out = m.reduce(model(xt[0], t, c), noise[0])
    out.backward()
    return torch.cat([p.grad.reshape(-1) for g in featurizer.groups for p in
                      [dict(model.named_parameters())[n] for n in g.params]])


@pytest.mark.parametrize("kind", ["unconditional", "conditional"])
@pytest.mark.parametrize("measurement", ["loss", "dtrak"])
def test_identity_features_equal_autograd_loop(kind, measurement):
    model, sched = _model(kind)
    spec = FeatureSpec(groups="block", projection="identity", measurement=measurement, num_timesteps=3)
    fz, _ = build_featurizer(model, sched, spec)
    x, ids, cond = _inputs(model, 3)
    feats = fz.features(x, ids, cond)
    for b in range(3):
        ref = _loop_gradient(model, fz, x[b], ids[b], None if cond is None else cond[b])
        rel = float((torch.from_numpy(feats[b]) - ref).norm() / ref.norm())
        assert rel <= 1e-5, f"example {b}: relative error {rel:.2e}"


def test_features_do_not_depend_on_batch_size_or_order():
    model, sched = _model("conditional")
    fz, _ = build_featurizer(model, sched, FeatureSpec(total_dim=256, num_timesteps=2))
    x, ids, cond = _inputs(model, 6)
    full = fz.features(x, ids, cond)
    perm = np.array([4, 1, 5, 0, 3, 2])
    shuffled = fz.features(x[perm], ids[perm], cond[perm])
    pairs = np.concatenate([fz.features(x[i:i + 2], ids[i:i + 2], cond[i:i + 2]) for i in (0, 2, 4)])
    np.testing.assert_allclose(shuffled, full[perm], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pairs, full, rtol=1e-4, atol=1e-6)


def _run(tmp_path, name, model, sched, x, ids, spec, **kw):
    return featurize_unet(model, sched, x, ids, tmp_path / name, spec=spec, model_fingerprint=model_fingerprint(model),
                     progress=False, **kw)


def test_resume_after_interruption_is_bit_identical(tmp_path):
    model, sched = _model("unconditional")
    x, ids, _ = _inputs(model, 10)
    spec = FeatureSpec(total_dim=128, num_timesteps=2, chunk_rows=3)
    whole = _run(tmp_path, "whole", model, sched, x, ids, spec)
    part = _run(tmp_path, "part", model, sched, x, ids, spec, stop_after_chunks=2)
    assert part.rows_done == 6 and not part.complete
    with pytest.raises(UserError, match="unfinished"):
        FeatureStore.open(tmp_path / "part")
    resumed = _run(tmp_path, "part", model, sched, x, ids, spec)
    assert resumed.complete
    a, b = np.load(tmp_path / "whole" / "features.npy"), np.load(tmp_path / "part" / "features.npy")
    assert a.tobytes() == b.tobytes()
    assert np.array_equal(FeatureStore.open(tmp_path / "part").ids, whole.ids)


def test_store_made_with_other_settings_is_refused(tmp_path):
    model, sched = _model("unconditional")
    x, ids, _ = _inputs(model, 4)
    spec = FeatureSpec(projection="rademacher", total_dim=128, num_timesteps=2, chunk_rows=2)
    _run(tmp_path, "s", model, sched, x, ids, spec)
    before = np.load(tmp_path / "s" / "features.npy")
    with pytest.raises(UserError, match=r"made with other settings \('groups' differs\)"):
        _run(tmp_path, "s", model, sched, x, ids,
             FeatureSpec(projection="rademacher", total_dim=64, num_timesteps=2, chunk_rows=2))
    assert np.array_equal(np.load(tmp_path / "s" / "features.npy"), before)  # nothing was touched
    other = _run(tmp_path, "q", model, sched, x, ids, FeatureSpec(projection="rademacher", total_dim=128,
                                                                  num_timesteps=2, measurement="dtrak", chunk_rows=2))
    with pytest.raises(UserError, match="'measurement' differs"):
        FeatureStore.open(tmp_path / "s").check_compatible(other)
    model2, _ = _model("unconditional")
    with torch.no_grad():
        next(model2.parameters()).add_(1.0)
    q2 = _run(tmp_path, "q2", model2, sched, x, ids, spec)
    with pytest.raises(UserError, match="'model_fingerprint' differs"):
        FeatureStore.open(tmp_path / "s").check_compatible(q2)


KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from gradtrace.adapters import Checkpoint, get_adapter
    from gradtrace.adapters.checkpoint import model_fingerprint
    from gradtrace.adapters.diffusion import build_model, default_model_config, make_scheduler
    from gradtrace.features.featurize import FeatureSpec, featurize, featurizer_for
    cfg = default_model_config("unconditional", channels=1, size=8)
    model, sched = build_model(cfg, seed=1), make_scheduler(cfg)
    x = torch.rand((24, 1, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = FeatureSpec(projection="rademacher", total_dim=128, num_timesteps=2, chunk_rows=2)
    ckpt = Checkpoint(model, {"model_config": cfg}, model_fingerprint(model), None, {"scheduler": sched})
    featurizer, _ = featurizer_for(get_adapter(), ckpt, spec)
    featurize(featurizer, x, np.arange(24), sys.argv[1], spec=spec, model_fingerprint=model_fingerprint(model),
              progress=False)
""")


def test_resume_after_kill_9_is_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "whole")], check=True, env=env)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed")], env=env)
    progress = tmp_path / "killed" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists() and '"rows_done": 0' not in progress.read_text():
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = FeatureStore.create(tmp_path / "killed", FeatureStore.open(tmp_path / "whole").settings,
                                np.arange(24))
    assert 0 < store.rows_done < 24, "the kill should land mid-run"
    store.release()  # this process only looked; the rerun below is the writer
    subprocess.run([sys.executable, str(script), str(tmp_path / "killed")], check=True, env=env)
    a = np.load(tmp_path / "whole" / "features.npy")
    b = np.load(tmp_path / "killed" / "features.npy")
    assert a.tobytes() == b.tobytes()
    assert FeatureStore.open(tmp_path / "killed").complete
