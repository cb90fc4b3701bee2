"""gradtrace.models.train: determinism, learning, id subsets, token dropout, EMA."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gradtrace.adapters.checkpoint import model_fingerprint
from gradtrace.adapters.diffusion import TrainConfig, default_model_config, train
from gradtrace.adapters.loop import batch_stream as _batch_stream
from gradtrace.errors import UserError

ATTRS = {"subject": ["a", "b", "c"], "style": ["x", "y"]}


@dataclasses.dataclass
class FakeDataset:
    """Duck-typed stand-in for gradtrace.data.ImageDataset."""

    images: torch.Tensor
    ids: np.ndarray
    attributes: dict
    codes: np.ndarray | None = None
    name: str = "fake"

    def attribute_codes(self) -> np.ndarray:
        return self.codes if self.codes is not None else np.zeros((len(self.ids), 0), np.int64)

    def subset(self, ids) -> "FakeDataset":
        pos = np.nonzero(np.isin(self.ids, ids))[0]
        codes = None if self.codes is None else self.codes[pos]
        return FakeDataset(self.images[pos].clone(), self.ids[pos], self.attributes, codes, self.name)

    def info(self) -> dict:
        return {"name": self.name, "n": len(self.ids)}


def digits_like(n=48, seed=0) -> FakeDataset:
    """8x8 one-channel images: a bright bar at a random row on a dark background, ids 100.."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 8, 8), -1.0)
    rows = torch.randint(1, 7, (n,), generator=g)
    for i in range(n):
        x[i, 0, rows[i], 1:7] = 1.0
    x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return FakeDataset(x, np.arange(100, 100 + n, dtype=np.int64), {})


def tiny_conditional(n=24, seed=0) -> tuple[dict, FakeDataset]:
    cfg = default_model_config("conditional", channels=3, size=8, attributes=ATTRS)
    cfg["unet"]["block_out_channels"] = [8, 16]
    g = torch.Generator().manual_seed(seed)
    codes = np.stack([np.arange(n) % 3, np.arange(n) % 2], axis=1).astype(np.int64)
    x = torch.rand((n, 3, 8, 8), generator=g) * 2 - 1
    return cfg, FakeDataset(x, np.arange(n, dtype=np.int64), dict(ATTRS), codes)


UNCOND = default_model_config("unconditional", channels=1, size=8)
QUICK = dict(steps=4, batch_size=8, warmup_steps=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded for this module


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_deterministic_for_a_seed():
    ds = digits_like()
    rng_before = torch.random.get_rng_state()
    a = train(UNCOND, ds, TrainConfig(seed=1, **QUICK), progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # no global RNG used
    b = train(UNCOND, ds, TrainConfig(seed=1, **QUICK), progress=False)
    c = train(UNCOND, ds, TrainConfig(seed=2, **QUICK), progress=False)
    assert_same_weights(a, b)
    assert np.array_equal(a.train_log["losses"], b.train_log["losses"])
    assert model_fingerprint(a) != model_fingerprint(c)
    cfg, cds = tiny_conditional()
    d = train(cfg, cds, TrainConfig(seed=1, **QUICK), progress=False)
    e = train(cfg, cds, TrainConfig(seed=1, **QUICK), progress=False)
    assert_same_weights(d, e)


def test_fused_update_follows_the_reference_adamw(monkeypatch):
    """train() uses the fused AdamW kernel; the same run with torch's per-tensor reference loop (the
    independent implementation of the same update) ends at the same weights up to float32 rounding."""
    ds = digits_like()
    kw = dict(steps=6, batch_size=8, warmup_steps=2)
    fused = train(UNCOND, ds, TrainConfig(**kw), progress=False)
    assert fused.train_log["optimizer"] == "torch.optim.AdamW(fused=True)"
    reference = torch.optim.AdamW
    made = []

    def loop_adamw(params, **options):
        options.pop("fused", None)
        made.append(reference(params, foreach=False, fused=False, **options))
        return made[-1]

    monkeypatch.setattr(torch.optim, "AdamW", loop_adamw)
    plain = train(UNCOND, ds, TrainConfig(**kw), progress=False)
    assert len(made) == 1 and made[0].defaults["fused"] in (False, None)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        if name.endswith("to_k.bias"):
            # softmax is invariant to a key bias, so its gradient is 0 up to rounding, and Adam's m/√v turns
            # that rounding into ±lr steps: implementation noise by construction, not an update to compare
            continue
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    start = train(UNCOND, ds, TrainConfig(**dict(kw, steps=1, lr=1e-12)), progress=False)
    moved = max(float((p - q).abs().max()) for p, q in zip(plain.parameters(), start.parameters()))
    assert moved > 1e-3  # the comparison is between trained weights, not two copies of the initial ones


def test_training_loss_decreases():
    ds = digits_like(64)
    model = train(UNCOND, ds, TrainConfig(steps=80, batch_size=16, lr=3e-3, warmup_steps=10), progress=False)
    losses = model.train_log["losses"]
    assert losses.shape == (80,) and np.isfinite(losses).all()
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last < 0.5 * first, (first, last)  # measured: ~0.2


def test_ids_subset_trains_only_on_those_images():
    ds = digits_like(40)
    ids = ds.ids[::3][::-1].copy()  # any order
    a = train(UNCOND, ds, TrainConfig(**QUICK), ids=ids, progress=False)
    assert a.train_ids.tolist() == sorted(ids.tolist())
    # the same as training on the subset itself
    assert_same_weights(a, train(UNCOND, ds.subset(ids), TrainConfig(**QUICK), progress=False))
    # images outside the subset never matter ...
    changed = dataclasses.replace(ds, images=ds.images.clone())
    outside = ~np.isin(ds.ids, ids)
    changed.images[torch.as_tensor(outside)] = 0.7
    assert_same_weights(a, train(UNCOND, changed, TrainConfig(**QUICK), ids=ids, progress=False))
    # ... and one inside does
    changed.images[int(np.nonzero(~outside)[0][0])] = 0.7
    b = train(UNCOND, changed, TrainConfig(**QUICK), ids=ids, progress=False)
    assert model_fingerprint(a) != model_fingerprint(b)
    full = train(UNCOND, ds, TrainConfig(**QUICK), progress=False)
    assert full.train_ids is None
    with pytest.raises(UserError, match="not in dataset"):
        train(UNCOND, ds, TrainConfig(**QUICK), ids=[100, 5000], progress=False)
    with pytest.raises(UserError, match="duplicates"):
        train(UNCOND, ds, TrainConfig(**QUICK), ids=[100, 100], progress=False)


def test_batches_cover_each_row_once_per_epoch():
    gen = torch.Generator().manual_seed(0)
    stream = _batch_stream(10, 4, gen)
    drawn = torch.cat([next(stream) for _ in range(5)])  # 20 indices = two epochs
    assert sorted(drawn[:10].tolist()) == list(range(10))
    assert sorted(drawn[10:].tolist()) == list(range(10))


def test_token_dropout():
    cfg, ds = tiny_conditional()
    other = dataclasses.replace(ds, codes=np.zeros_like(ds.codes))
    # every token dropped (one by one, or all together): the attribute codes cannot matter
    for kw in (dict(QUICK, p_drop=1.0, p_drop_all=0.0), dict(QUICK, p_drop=0.0, p_drop_all=1.0)):
        assert_same_weights(train(cfg, ds, TrainConfig(**kw), progress=False),
                            train(cfg, other, TrainConfig(**kw), progress=False))
    kw = dict(QUICK, p_drop=0.0, p_drop_all=0.0)
    a = train(cfg, ds, TrainConfig(**kw), progress=False)
    b = train(cfg, other, TrainConfig(**kw), progress=False)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_ema_with_zero_decay_equals_plain_training():
    ds = digits_like()
    plain = train(UNCOND, ds, TrainConfig(**QUICK), progress=False)
    ema = train(UNCOND, ds, TrainConfig(ema_decay=1e-12, **QUICK), progress=False)
    slow = train(UNCOND, ds, TrainConfig(ema_decay=0.9, **QUICK), progress=False)
    for (k, p), q, r in zip(plain.named_parameters(), ema.parameters(), slow.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=k)
    assert model_fingerprint(slow) != model_fingerprint(plain)


def test_bad_training_input_raises():
    ds = digits_like(8)
    with pytest.raises(UserError, match="expects"):
        train(default_model_config("unconditional", channels=3, size=8), ds, TrainConfig(**QUICK),
              progress=False)
    cfg, cds = tiny_conditional(6)
    with pytest.raises(UserError, match="attributes"):
        train(cfg, dataclasses.replace(cds, attributes={"subject": ["a", "b", "c"]}), TrainConfig(**QUICK),
              progress=False)
    bad_codes = cds.codes.copy()
    bad_codes[0, 0] = 3  # subject has 3 values: 0..2
    with pytest.raises(UserError, match="attribute codes"):
        train(cfg, dataclasses.replace(cds, codes=bad_codes), TrainConfig(**QUICK), progress=False)
    with pytest.raises(UserError, match="unknown train config keys"):
        train(UNCOND, ds, {"stepz": 3}, progress=False)
    with pytest.raises(UserError, match="p_drop"):
        train(UNCOND, ds, TrainConfig(p_drop=2.0, **QUICK), progress=False)
