"""gradtrace build-pipeline: the caption tokenizer, deterministic build + pretraining, loss against the untrained
model (computed here, independently of the pretraining code), the saved folder read back by diffusers, refusals."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from gradtrace.adapters.diffusers.build import build_components, caption_tokenizer
from gradtrace.adapters.diffusers.pretrain import pretrain
from gradtrace.cli import main
from gradtrace.data.sources import dataset_source, open_dataset
from gradtrace.pipeline.build_pipeline import MANIFEST, BuildPipelineSpec, build_pipeline_run

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ("unet", "vae", "text_encoder")
# Words whose letters overlap (on/no/noise/one, a/aa/banana): BPE merges of one word act inside another.
TRICKY = ["a dotted circle on a noise background", "no one", "a banana in aa bananas", "Outlined   SQUARE"]
TINY = {"vae_steps": 3, "unet_steps": 3, "batch_size": 4, "lr": 1e-3}


def shape_captions(n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n shapes images and their captions ("text"; built from the attributes where it is absent)."""
    ds = open_dataset(dataset_source("shapes", n=n))
    return ds.images, [m.get("text") or f"a {m['style']} {m['subject']} on a {m['background']} background"
                       for m in ds.metadata]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def built(captions, images, seed, **steps) -> dict:
    components = build_components(captions, image_size=images.shape[-1], seed=seed)
    pretrain(components, images, captions, seed=seed, progress=False, **(steps or TINY))
    return components


# ---------------------------------------------------------------- tokenizer
def test_every_caption_word_is_one_token_and_decoding_round_trips(tmp_path):
    _, shapes = shape_captions(96)
    captions = shapes + TRICKY
    tok = caption_tokenizer(captions, tmp_path)
    assert isinstance(tok, CLIPTokenizer) and tok.model_max_length == 77
    words = sorted({w for c in captions for w in c.lower().split()})
    for word in words:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
        assert tok.convert_ids_to_tokens(ids) == [word + "</w>"]
    for caption in captions:
        ids = tok(caption).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(caption.split()) + 2
        assert tok.decode(ids, skip_special_tokens=True) == " ".join(caption.lower().split())
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert {"<|startoftext|>", "<|endoftext|>", "a", "a</w>", "z</w>"} <= set(vocab) and len(vocab) == len(tok)
    assert (tmp_path / "merges.txt").read_text().startswith("#version")
    again = CLIPTokenizer.from_pretrained(tmp_path)  # the files alone make the same tokenizer
    assert again(captions).input_ids == tok(captions).input_ids
    unseen = tok("a zebra", add_special_tokens=False).input_ids  # other text: characters, never unknown
    assert tok.unk_token_id not in unseen and tok.decode(unseen) == "a zebra"


# ---------------------------------------------------------------- build + pretrain
def test_same_seed_same_weights_other_seed_differs():
    images, captions = shape_captions(8)
    rng = torch.get_rng_state()
    first, second, other = (built(captions, images, seed) for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is left alone
    for name in MODELS:
        assert same_weights(state(first[name]), state(second[name])), name
        assert not same_weights(state(first[name]), state(other[name])), name
    assert first["vae"].config.scaling_factor == second["vae"].config.scaling_factor


def test_pretraining_lowers_the_losses_against_the_untrained_model():
    images, captions = shape_captions(16)
    untrained = build_components(captions, seed=3)
    trained = built(captions, images, 3, vae_steps=20, unet_steps=20, batch_size=8, lr=2e-3)
    vae = trained["vae"]

    @torch.no_grad()
    def reconstruction(model):
        return F.mse_loss(model.decode(model.encode(images).latent_dist.mean).sample, images).item()

    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    timesteps = torch.arange(len(images)) * (1000 // len(images))
    noise = torch.randn(latents.shape, generator=g)
    tok = trained["tokenizer"]
    ids = tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids

    @torch.no_grad()
    def denoising(parts):
        alpha_bar = parts["scheduler"].alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        hidden = parts["text_encoder"](ids).last_hidden_state
        return F.mse_loss(parts["unet"](noisy, timesteps, encoder_hidden_states=hidden).sample, noise).item()

    assert reconstruction(vae) < 0.5 * reconstruction(untrained["vae"])
    assert denoising(trained) < 0.8 * denoising(untrained)


# ---------------------------------------------------------------- the stage and the saved folder
def test_saved_folder_loads_as_a_stable_diffusion_pipeline(tmp_path):
    out = tmp_path / "sd"
    spec = BuildPipelineSpec(data="shapes", n=8, out=str(out), **TINY)
    assert build_pipeline_run(spec, progress=False) == out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "gradtrace-built-pipeline" and manifest["spec"] == spec.to_dict()
    images, captions = shape_captions(8)
    assert manifest["dataset"]["fingerprint"] == open_dataset(dataset_source("shapes", n=8)).fingerprint()
    assert {"vae", "unet", "wall_seconds"} <= set(manifest["log"]) and "diffusers" in manifest["versions"]
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (out / "tokenizer").iterdir()}

    pipe = StableDiffusionPipeline.from_pretrained(out)
    parts = {"unet": UNet2DConditionModel.from_pretrained(out, subfolder="unet"),
             "vae": AutoencoderKL.from_pretrained(out, subfolder="vae"),
             "text_encoder": CLIPTextModel.from_pretrained(out, subfolder="text_encoder")}
    again = built(captions, images, 0)  # the same build in memory: the saved weights are exactly these
    for name in MODELS:
        assert same_weights(state(getattr(pipe, name)), state(parts[name])), name
        assert same_weights(state(parts[name]), state(again[name])), name
    assert parts["vae"].config.scaling_factor == pytest.approx(again["vae"].config.scaling_factor)
    tok = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    assert tok(captions).input_ids == pipe.tokenizer(captions).input_ids == again["tokenizer"](captions).input_ids
    scheduler = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.prediction_type == "epsilon"
    pipe.set_progress_bar_config(disable=True)
    image = pipe(captions[0], num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3)

    weights = next((out / "unet").glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    assert build_pipeline_run(BuildPipelineSpec(data="shapes", n=8, out=str(out), **TINY), progress=False) == out
    assert weights.stat().st_mtime_ns == before  # an identical build is reused, not redone


@pytest.mark.parametrize("argv, words", [(["--data", "digits"], "text"), (["--size", "18"], "multiple of 4")])
def test_refused_with_one_line_and_exit_code_2(tmp_path, capsys, argv, words):
    out = tmp_path / "sd"
    assert main(["build-pipeline", *argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gradtrace build-pipeline: error:") and words in err
    assert not out.exists()
