"""Caption fidelity of a built pipeline and of a LoRA run: the number build-pipeline writes into its manifest and the
one `check-captions` prints equal the statistic recomputed from the sample stage's images of the checked captions;
the near-chance warning names the way to train longer; the default schedule follows its rule; the medium model
size builds the UNet it describes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from gradtrace.cli import main
from gradtrace.data.sources import dataset_source, open_dataset
from gradtrace.evaluate.caption_fidelity import caption_fidelity
from gradtrace.pipeline.build_pipeline import (
    MANIFEST,
    UNET_CAP,
    UNET_EPOCHS,
    UNET_FLOOR,
    VAE_EPOCHS,
    VAE_FLOOR,
    BuildPipelineSpec,
    build_pipeline_run,
    training_schedule,
)
from gradtrace.pipeline.check_captions import CheckCaptionsSpec, check_captions_run
from gradtrace.pipeline.sample import SampleSpec, sample_run
from gradtrace.pipeline.train import TrainSpec, train_run

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {"vae_steps": 3, "unet_steps": 3, "batch_size": 4}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "pipe"
    with pytest.warns(UserWarning, match="train longer: --unet-steps 6"):  # 3 steps: near chance
        build_pipeline_run(BuildPipelineSpec(data="shapes", n=12, out=str(out), check_captions=5, **TINY),
                           progress=False)
    return out


def recomputed(checkpoint, fidelity: dict, tmp_path, rows=None) -> dict:
    """The statistic from the sample stage's images of the checked captions, against the training images."""
    settings = fidelity["settings"]
    prompts = [c for c in fidelity["checked"] for _ in range(settings["per_caption"])]
    samples = sample_run(SampleSpec(checkpoint=str(checkpoint), texts=prompts, out=str(tmp_path / "s"),
                                    sample_steps=settings["sample_steps"], guidance=settings["guidance"],
                                    seed=settings["seed"]), progress=False)
    images = torch.from_numpy(np.load(samples / "images.npy"))
    ds = open_dataset(dataset_source("shapes", n=12))
    rows = list(range(len(ds))) if rows is None else rows
    return caption_fidelity(images, prompts, ds.images[rows], [ds.metadata[r]["text"] for r in rows])


def test_the_build_records_the_fidelity_of_its_captions(pipe, tmp_path):
    manifest = json.loads((pipe / MANIFEST).read_text())
    fidelity = manifest["caption_fidelity"]
    captions = [m["text"] for m in open_dataset(dataset_source("shapes", n=12)).metadata]
    assert len(fidelity["checked"]) == 5 and set(fidelity["checked"]) <= set(captions)
    assert fidelity["images"] == 10 and fidelity["settings"]["per_caption"] == 2
    want = recomputed(pipe, fidelity, tmp_path)
    for key in ("words", "words_chance", "exact", "exact_chance", "above_chance"):
        assert fidelity[key] == want[key], key
    assert manifest["schedule"] == {"vae_steps": 3, "unet_steps": 3, "images": 12, "distinct_captions": 12,
                                    "vae_rule": "given", "unet_rule": "given"}


def test_check_captions_prints_the_same_line_and_writes_json(pipe, tmp_path, capsys):
    manifest = json.loads((pipe / MANIFEST).read_text())
    assert main(["check-captions", "--checkpoint", str(pipe), "--captions", "5", "--out", str(tmp_path / "f.json"),
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    fidelity = manifest["caption_fidelity"]
    assert f"renders its captions at {fidelity['words']:.2f} of their words" in out and out.count("\n") == 1
    assert "aspect attribution on this pipeline will mean little" in err and err.count("\n") == 1
    written = json.loads((tmp_path / "f.json").read_text())
    assert written["format"] == "gradtrace-caption-fidelity"
    assert {k: v for k, v in written["fidelity"].items()} == {k: v for k, v in fidelity.items() if k != "seconds"}


def test_a_lora_run_is_checked_on_its_own_training_rows(pipe, tmp_path):
    rows = [1, 2, 3, 5, 8, 9, 10]  # ids = rows of shapes
    (tmp_path / "ids.json").write_text(json.dumps(rows))
    run = train_run(TrainSpec(data="shapes", n=12, ids=str(tmp_path / "ids.json"), base=str(pipe), lora_rank=2,
                              steps=2, batch_size=4, out=str(tmp_path / "lora")), progress=False)
    with pytest.warns(UserWarning, match="fine-tune longer: train --steps 4"):  # twice the run's 2 steps
        got = check_captions_run(CheckCaptionsSpec(checkpoint=str(run), captions=4), progress=False)
    captions = [m["text"] for m in open_dataset(dataset_source("shapes", n=12)).metadata]
    assert set(got["checked"]) <= {captions[r] for r in rows}
    want = recomputed(run, got, tmp_path, rows)
    for key in ("words", "words_chance", "exact", "exact_chance"):
        assert got[key] == want[key], key


@pytest.mark.parametrize("n, captions, batch", [(12, 12, 4), (960, 96, 32), (5000, 24, 32), (100000, 50, 32)])
def test_the_default_schedule_scales_with_the_data_and_given_steps_win(n, captions, batch):
    spec = BuildPipelineSpec(out="x", batch_size=batch)
    got = training_schedule(spec, n, captions)
    unet = min(UNET_CAP, max(UNET_FLOOR, math.ceil(UNET_EPOCHS * n / batch)))  # each image seen UNET_EPOCHS times
    assert got["unet_steps"] == unet and got["unet_rule"] == "scaled" and got["distinct_captions"] == captions
    assert got["vae_steps"] >= VAE_FLOOR and got["vae_steps"] >= min(2000, math.ceil(VAE_EPOCHS * n / batch))
    given = training_schedule(BuildPipelineSpec(out="x", batch_size=batch, unet_steps=7, vae_steps=9), n, captions)
    assert (given["unet_steps"], given["vae_steps"], given["unet_rule"]) == (7, 9, "given")


def test_the_medium_model_has_three_unet_levels(tmp_path):
    out = tmp_path / "medium"
    build_pipeline_run(BuildPipelineSpec(data="shapes", n=8, out=str(out), model_size="medium", check_captions=0,
                                         vae_steps=1, unet_steps=1, batch_size=4), progress=False)
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert list(unet.config.block_out_channels) == [32, 64, 128] and unet.config.layers_per_block == 2
    assert list(unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["spec"]["model_size"] == "medium" and manifest["caption_fidelity"] is None
