"""Resumable training (gradtrace.adapters.train_state): every trainer, interrupted after a saved state and run
again, ends with weights and losses bit-identical to an uninterrupted run; a state of another run, or one that
cannot be read, is ignored."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.pipelines import tiny_pipeline
from fixtures.toy_adapter import ToyMLPAdapter
from gradtrace.adapters import get_adapter
from gradtrace.adapters.checkpoint import model_fingerprint
from gradtrace.adapters.diffusion import TrainConfig, default_model_config, train
from gradtrace.adapters.train_state import DEFAULT_EVERY_S, TrainState, parse_every
from gradtrace.data.sources import dataset_source, open_dataset
from gradtrace.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = {"run": "test"}


class Killed(Exception):
    """Stands for the kill: raised right after step `stop` (its state saved or not)."""


class StopAfter(TrainState):
    def __init__(self, path, stop: int, every: str, key=KEY):
        super().__init__(path, key, every=every)
        self.stop = stop
        self.saved_steps: list[int] = []

    def save(self, step: int) -> None:
        super().save(step)
        self.saved_steps.append(step)

    def step_done(self, step: int) -> None:
        super().step_done(step)
        if step == self.stop:
            raise Killed


def interrupted_then_resumed(train_fn, path, stop, every):
    """Run `train_fn(resume)` until step `stop`, then again from the file; returns (model, steps saved, resumed at)."""
    first = StopAfter(path, stop, every)
    with pytest.raises(Killed):
        train_fn(first)
    again = TrainState(path, KEY, every=every)
    model = train_fn(again)
    return model, first.saved_steps, again.resumed_from


def conditional_setup():
    attrs = {"subject": ["a", "b", "c"], "style": ["x", "y"]}
    cfg = default_model_config("conditional", channels=3, size=8, attributes=attrs)
    cfg["unet"]["block_out_channels"] = [8, 16]

    class Data:
        images = torch.rand((20, 3, 8, 8), generator=torch.Generator().manual_seed(0)) * 2 - 1
        ids = np.arange(20)
        attributes = attrs
        name = "fake"

        def attribute_codes(self):
            return np.stack([np.arange(20) % 3, np.arange(20) % 2], 1)

    return cfg, Data()


def test_tiny_unet_resumes_to_the_same_bits(tmp_path):
    cfg, ds = conditional_setup()
    recipe = TrainConfig(steps=9, batch_size=6, lr=3e-3, warmup_steps=3, ema_decay=0.9, seed=4)
    whole = train(cfg, ds, recipe, progress=False)
    path = tmp_path / ".train-state.pt"
    resumed, saved, start = interrupted_then_resumed(
        lambda state: train(cfg, ds, recipe, progress=False, resume=state), path, stop=6, every="4")
    assert saved == [4] and start == 4  # step 5 and 6 ran twice: the second time from the saved state
    assert model_fingerprint(resumed) == model_fingerprint(whole)
    assert np.array_equal(resumed.train_log["losses"], whole.train_log["losses"])
    TrainState(path, KEY).clear()
    assert list(tmp_path.iterdir()) == []


def test_a_state_of_another_run_or_unreadable_is_ignored(tmp_path):
    cfg, ds = conditional_setup()
    recipe = TrainConfig(steps=6, batch_size=6, warmup_steps=2, seed=1)
    whole = train(cfg, ds, recipe, progress=False)
    path = tmp_path / "state.pt"
    with pytest.raises(Killed):  # a state saved by a run with another key (other settings)
        train(cfg, ds, TrainConfig(steps=6, batch_size=6, warmup_steps=2, seed=2), progress=False,
              resume=StopAfter(path, 3, "1", key={"run": "other"}))
    other = TrainState(path, KEY, every="1")
    assert model_fingerprint(train(cfg, ds, recipe, progress=False, resume=other)) == model_fingerprint(whole)
    assert other.resumed_from == 0
    path.write_bytes(b"not a torch file")
    garbage = TrainState(path, KEY)
    assert model_fingerprint(train(cfg, ds, recipe, progress=False, resume=garbage)) == model_fingerprint(whole)
    assert garbage.resumed_from == 0


def test_lora_fine_tune_resumes_to_the_same_bits(tmp_path):
    adapter = get_adapter("diffusers")
    ds = open_dataset(dataset_source("shapes", n=10))
    model_config = adapter.default_model_config(ds, "auto", base=str(tiny_pipeline(tmp_path / "pipe")), lora_rank=2)
    recipe = adapter.train_config({"steps": 5, "batch_size": 4, "warmup_steps": 2, "caption_dropout": 0.3})
    whole = adapter.train(model_config, ds, recipe, progress=False).lora_state()
    resumed, saved, start = interrupted_then_resumed(
        lambda state: adapter.train(model_config, ds, recipe, progress=False, resume=state),
        tmp_path / "state.pt", stop=4, every="2")
    assert saved == [2, 4] and start == 4
    got = resumed.lora_state()
    assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in got)


def test_toy_adapter_resumes_to_the_same_bits(tmp_path):
    adapter = ToyMLPAdapter()
    ds = open_dataset(dataset_source("digits", n=30))
    model_config = adapter.default_model_config(ds)
    recipe = adapter.train_config({"steps": 12, "batch_size": 5})
    whole = adapter.train(model_config, ds, recipe, progress=False)
    resumed, saved, start = interrupted_then_resumed(
        lambda state: adapter.train(model_config, ds, recipe, progress=False, resume=state),
        tmp_path / "state.pt", stop=9, every="3")
    assert saved == [3, 6, 9] and start == 9
    assert model_fingerprint(resumed) == model_fingerprint(whole)


def test_the_save_interval(monkeypatch):
    assert parse_every(None) == (None, DEFAULT_EVERY_S)
    assert parse_every("25") == (25, None) and parse_every("0.5s") == (None, 0.5)
    for bad in ("0", "-3", "x", "0s", "1.5"):
        with pytest.raises(UserError, match="GRADTRACE_TRAIN_STATE_EVERY"):
            parse_every(bad)
    monkeypatch.setenv("GRADTRACE_TRAIN_STATE_EVERY", "7")
    assert TrainState(None).every_steps == 7
