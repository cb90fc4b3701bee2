"""A text-to-image pipeline with a LoRA, in memory, attributed in a few lines: a tiny Stable-Diffusion-layout
pipeline made from configs (a stand-in for `StableDiffusionPipeline.from_pretrained(...)` followed by
`pipe.load_lora_weights(...)`), a LoRA on its UNet, captioned training images as a `datasets.Dataset`, and for each
query image the training images that most influenced it (D-TRAK over the LoRA parameters).

    python examples/tracer_text_to_image.py [OUT_DIR]    # seconds on two CPU cores

Every name used here is documented in the README ("Library use"); the test suite runs this file and checks its
answer against the command line's on the same weights and data.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import datasets
import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import gradtrace

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220)}


def tiny_pipeline(folder: Path) -> StableDiffusionPipeline:
    """A random 16x16 text-to-image pipeline (character tokenizer, 1-layer text encoder) with a rank-2 UNet LoRA."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, bos_token_id=0,
                                                eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                                layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for name, p in unet.named_parameters():  # a LoRA that changes the output, as a trained one does
        if "lora_B" in name:
            p.data.normal_(0.0, 0.2)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False,
                                                           steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def squares(n: int, seed: int) -> datasets.Dataset:
    """n captioned 16x16 images: a coloured square on a noisy background, the caption naming its colour."""
    rng = np.random.default_rng(seed)
    images, texts = [], []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
        pixels[4:12, 4:12] = COLOURS[colour]
        images.append(Image.fromarray(pixels))
        texts.append(f"a {colour} square")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": texts}, features=features)


def main(out: Path):
    pipe = tiny_pipeline(out / "tokenizer")
    train, queries = squares(15, 0), squares(3, 1)
    tracer = gradtrace.Tracer(pipe, train=train, store=out / "store", measurement="dtrak", timesteps=2,
                              progress=False)
    result = tracer.attribute(queries, method="dtrak", top_k=3)  # inline in Jupyter: images, scores, group bars
    for row in result.records():
        print(f"query {row['query_id']} ({row['query_text']}): #{row['rank']} training {row['train_id']} "
              f"({row['train_text']}) score {row['score']:.4g}")
    return pipe, train, queries, result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gradtrace-example-")))
