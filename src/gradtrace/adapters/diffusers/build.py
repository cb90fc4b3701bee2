"""A small Stable-Diffusion-layout text-to-image model from configs: the components of a
`diffusers.StableDiffusionPipeline`, sized for CPU.

    components = build_components(captions, image_size=16, seed=0)
    # {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
    #  "tokenizer": CLIPTokenizer, "scheduler": DDPMScheduler}
    save_pipeline(components, out)      # one StableDiffusionPipeline folder (after `pretrain.pretrain`)

The tokenizer is a real `transformers.CLIPTokenizer` whose byte-pair vocabulary is built from the captions: every
lower-cased caption word is one token, and any other text still tokenizes (into its characters). The weights are
initialised from `seed` alone, without touching the global torch generator.
"""
from __future__ import annotations

import json
import tempfile
from itertools import pairwise
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import SafetensorError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gradtrace.errors import UserError
from gradtrace.io import derive_seed, os_error_of

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END = "</w>"  # CLIP's BPE marks the last symbol of a word with this suffix
MAX_LENGTH = 77  # CLIP's context length: prompts are padded to it, as Stable Diffusion does

VAE_CHANNELS = [16, 32]
LATENT_CHANNELS = 4
TEXT_HIDDEN = 32
NORM_GROUPS = 8
# The UNet of each model size: channels per level, resnet layers per block, and which levels have cross-attention
# (the mid block always has it). `small` is the original 2-level UNet (about 250k parameters at 16x16 images);
# `medium` adds a third level, a second layer per block and attention on both lower levels.
UNET_SIZES = {
    "small": {"block_out_channels": [32, 64], "layers_per_block": 1, "attention": [False, True]},
    "medium": {"block_out_channels": [32, 64, 128], "layers_per_block": 2, "attention": [False, True, True]},
}
MODEL_SIZES = tuple(UNET_SIZES)


def byte_symbols() -> list[str]:
    """The 256 symbols of CLIP's byte-to-unicode map, in byte order (printable ASCII maps to itself)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Every byte symbol alone and at the end of a word, the merged symbols, then the special tokens."""
    symbols = byte_symbols()
    vocab: dict[str, int] = {}
    for token in symbols + [s + END for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab


def caption_words(captions: list[str], directory) -> list[str]:
    """The distinct words of the captions as CLIP's tokenizer splits them (lower-cased, byte-mapped), in order.

    A CLIPTokenizer without merges (written to `directory`) splits each caption into byte symbols, the last one
    of each word marked with </w>: its own normalisation and word splitting, whatever the transformers version.
    """
    write_vocab_files(directory, _vocab([]), [])
    probe = CLIPTokenizer.from_pretrained(directory)
    words: dict[str, None] = {}
    for caption in captions:
        word = ""
        for symbol in probe.tokenize(str(caption)):
            word += symbol
            if word.endswith(END):
                words.setdefault(word[:-len(END)], None)
                word = ""
    return list(words)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The symbols BPE makes of `word` with these merge ranks (lowest rank first, leftmost on ties)."""
    parts = list(word[:-1]) + [word[-1] + END]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), k) for k, (a, b) in enumerate(pairwise(parts))]
        pairs = [(r, k) for r, k in pairs if r is not None]
        if not pairs:
            break
        _, k = min(pairs)
        parts[k:k + 2] = [parts[k] + parts[k + 1]]
    return parts


def caption_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make each word one symbol, joining its pieces left to right.

    A word whose characters are already partly merged by earlier words' merges gets merges of those pieces,
    appended last: merges only ever apply to pairs inside a word, so a word that is already one symbol stays one.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            parts[:2] = [parts[0] + parts[1]]
    return merges


def caption_tokenizer(captions: list[str], directory) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary makes each caption word one token; vocab.json and merges.txt go to `directory`.

    The vocabulary holds every byte symbol alone and at the end of a word (so any text tokenizes), the merged
    symbols, then <|startoftext|> and <|endoftext|> (also the padding token), the order of CLIP's own vocabulary.
    """
    words = caption_words(captions, directory)
    if not words:
        raise UserError("the captions contain no words; give each image a non-empty \"text\" caption")
    merges = caption_merges(words)
    write_vocab_files(directory, _vocab(merges), merges)
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(directory)
    for word in words:
        if tokenizer.tokenize(word) != [word + END]:  # pragma: no cover - a change in CLIP's tokenizer
            raise UserError(f"caption word {word!r} is not one token of the built tokenizer; "
                            "report this with the installed transformers and tokenizers versions")
    return tokenizer


def write_vocab_files(directory, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json and merges.txt, the files every CLIPTokenizer version reads; a tokenizer.json there, which newer
    versions would read instead, is removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").unlink(missing_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")


def save_vocab_files(tokenizer: CLIPTokenizer, directory) -> None:
    """Write the tokenizer's vocab.json and merges.txt into `directory`, where save_pretrained left them out
    (transformers 5 writes tokenizer.json only)."""
    directory = Path(directory)
    if all((directory / name).exists() for name in ("vocab.json", "merges.txt")):
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    write_vocab_files(directory, model["vocab"], merges)


def _seeded(seed: int, part: int, make):
    """`make()` with torch's generator seeded from (seed, part); the global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, part))
        return make()


def vae_config(image_size: int, channels: int) -> dict:
    return {"in_channels": channels, "out_channels": channels, "sample_size": image_size,
            "down_block_types": ["DownEncoderBlock2D"] * len(VAE_CHANNELS),
            "up_block_types": ["UpDecoderBlock2D"] * len(VAE_CHANNELS),
            "block_out_channels": VAE_CHANNELS, "layers_per_block": 1, "latent_channels": LATENT_CHANNELS,
            "norm_num_groups": NORM_GROUPS}


def unet_config(image_size: int, model_size: str = "small") -> dict:
    size = UNET_SIZES[model_size]
    attention = size["attention"]
    return {"sample_size": image_size // 2 ** (len(VAE_CHANNELS) - 1), "in_channels": LATENT_CHANNELS,
            "out_channels": LATENT_CHANNELS, "block_out_channels": list(size["block_out_channels"]),
            "layers_per_block": size["layers_per_block"],
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "cross_attention_dim": TEXT_HIDDEN, "attention_head_dim": 4, "norm_num_groups": NORM_GROUPS}


def size_factor(model_size: str = "small") -> int:
    """What the image size must be a multiple of: the VAE halves it once per extra level, the UNet too."""
    return 2 ** (len(VAE_CHANNELS) - 1) * 2 ** (len(UNET_SIZES[model_size]["block_out_channels"]) - 1)


def text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def make_scheduler() -> DDPMScheduler:
    """DDPM with the cosine schedule: 1000 steps, epsilon prediction, no clipping (steps_offset 1, as in SD)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                         clip_sample=False, steps_offset=1)


def build_components(captions: list[str], *, image_size: int = 16, channels: int = 3, seed: int = 0,
                     model_size: str = "small") -> dict:
    """Untrained unet, vae, text_encoder, tokenizer (from the captions) and scheduler of an SD-layout pipeline.

    Latents are image_size / 2 on a side (4 channels); the UNet is `model_size` (UNET_SIZES). Each model's
    weights come from its own seed derived from `seed`, so the same captions, sizes and seed give identical weights.
    """
    if model_size not in UNET_SIZES:
        raise UserError(f"unknown model size {model_size!r}; use one of {', '.join(MODEL_SIZES)}")
    factor = size_factor(model_size)
    if isinstance(image_size, bool) or int(image_size) != image_size or image_size < factor \
            or image_size % factor:
        raise UserError(f"image size must be a multiple of {factor} for model size {model_size}, got {image_size}; "
                        f"pass e.g. size {2 * factor if model_size == 'medium' else 16}")
    with tempfile.TemporaryDirectory(prefix="gradtrace-tokenizer-") as tmp:
        tokenizer = caption_tokenizer(captions, tmp)
    vae = _seeded(seed, 1, lambda: AutoencoderKL(**vae_config(int(image_size), int(channels))))
    unet = _seeded(seed, 2, lambda: UNet2DConditionModel(**unet_config(int(image_size), model_size)))
    text_encoder = _seeded(seed, 3, lambda: CLIPTextModel(text_config(tokenizer)))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": make_scheduler()}


def save_pipeline(components: dict, out: Path) -> None:
    """Save the components as one `StableDiffusionPipeline` folder at `out` (`save_pretrained`: model_index.json,
    unet/, vae/, text_encoder/, tokenizer/ with CLIP's vocab.json and merges.txt, scheduler/)."""
    pipe = StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                   tokenizer=components["tokenizer"], unet=components["unet"],
                                   scheduler=components["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    try:
        pipe.save_pretrained(out)
    except SafetensorError as exc:  # diffusers writes weights with safetensors, whose I/O errors are not OSErrors
        raise (os_error_of(exc, out) or exc) from None
    save_vocab_files(components["tokenizer"], Path(out) / "tokenizer")
