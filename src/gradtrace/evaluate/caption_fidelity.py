"""Caption fidelity: how well generated images render their prompts, judged by their nearest training images.

    fidelity = caption_fidelity(generated, prompts, train_images, train_captions)
    # {"words": 0.91, "words_chance": 0.61, "exact": 0.72, "exact_chance": 0.01, "above_chance": 0.77, ...}

For each generated image, its nearest training image by pixel distance (squared L2 over every pixel and channel)
is found, and the image scores by how well that neighbour's caption matches the prompt: `exact` counts the
neighbour's caption equal to the prompt; `words` is the fraction of the prompt's distinct words (lower-cased,
split on whitespace) that the neighbour's caption contains, so a multi-part caption ("a striped circle on a
checker background") gets partial credit for each part rendered. Each has its chance rate: the expected score
when the neighbour is a training image drawn at random (every caption weighted by how often it occurs), averaged
over the prompts. `above_chance` = (words - words_chance) / (1 - words_chance): 0 at chance, 1 when every
neighbour's caption holds all the prompt's words. Images that copy a training image of their prompt score 1.
`by_word` breaks this down per word (how often an image prompted with it shows it, against its share of the
training captions), so an unlearned part of the captions (say its subjects) shows even when the rest is rendered;
`least_rendered` names the three words least above their chance.
Nothing here needs labels or a pretrained judge; it assumes that images of the same caption look alike in pixels.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from gradtrace.errors import UserError

CHUNK = 1024  # training images per distance block
NEAR_CHANCE = 0.25  # above chance (overall or one word's) below this: barely rendered
WEAK_SHARE = 0.25   # warn when at least this share of the caption words is barely rendered


def caption_words(text: str) -> frozenset[str]:
    return frozenset(str(text).lower().split())


def word_match(prompt: str, caption: str) -> float:
    """The fraction of the prompt's distinct words found in the caption (1.0 for an equal caption)."""
    want = caption_words(prompt)
    if not want:
        return float(str(prompt) == str(caption))
    return len(want & caption_words(caption)) / len(want)


def nearest_train(images: torch.Tensor, train_images: torch.Tensor) -> np.ndarray:
    """The index of each image's nearest training image (squared pixel L2; the first one on ties)."""
    q = torch.as_tensor(images, dtype=torch.float64).flatten(1)
    t = torch.as_tensor(train_images, dtype=torch.float64).flatten(1)
    if q.shape[1] != t.shape[1]:
        raise UserError(f"generated images have {q.shape[1]} values each, the training images {t.shape[1]}; "
                        "bring both to the same resolution and channels")
    best = torch.full((len(q),), float("inf"), dtype=torch.float64)
    arg = torch.zeros(len(q), dtype=torch.long)
    q_sq = (q * q).sum(1, keepdim=True)
    for start in range(0, len(t), CHUNK):
        block = t[start:start + CHUNK]
        d = q_sq - 2.0 * q @ block.T + (block * block).sum(1)[None, :]
        value, idx = d.min(1)
        better = value < best
        best = torch.where(better, value, best)
        arg = torch.where(better, idx + start, arg)
    return arg.numpy()


def caption_fidelity(images: torch.Tensor, prompts: list[str], train_images: torch.Tensor,
                     train_captions: list[str]) -> dict:
    """The fidelity of generated `images` (one prompt each) against the training images and their captions."""
    if len(images) != len(prompts) or len(images) == 0:
        raise UserError(f"caption fidelity needs one prompt per generated image, got {len(prompts)} prompts for "
                        f"{len(images)} images")
    if len(train_images) != len(train_captions) or len(train_images) == 0:
        raise UserError(f"caption fidelity needs one caption per training image, got {len(train_captions)} for "
                        f"{len(train_images)}")
    nearest = nearest_train(images, train_images)
    counts = Counter(map(str, train_captions))
    total = sum(counts.values())
    words, exact, words_chance, exact_chance = [], [], [], []
    for prompt, n in zip(map(str, prompts), nearest):
        neighbour = str(train_captions[int(n)])
        words.append(word_match(prompt, neighbour))
        exact.append(float(neighbour == prompt))
        words_chance.append(sum(c * word_match(prompt, cap) for cap, c in counts.items()) / total)
        exact_chance.append(counts.get(prompt, 0) / total)
    w, wc = float(np.mean(words)), float(np.mean(words_chance))
    by_word = word_rates(prompts, [str(train_captions[int(n)]) for n in nearest], counts)
    return {"words": w, "words_chance": wc, "exact": float(np.mean(exact)),
            "exact_chance": float(np.mean(exact_chance)),
            "above_chance": (w - wc) / (1.0 - wc) if wc < 1.0 else 0.0, "images": len(prompts),
            "prompts": len(set(map(str, prompts))), "distance": "pixel L2", "by_word": by_word,
            "least_rendered": least_rendered(by_word), "nearest": [int(n) for n in nearest]}


def word_rates(prompts: list[str], neighbours: list[str], counts: Counter) -> dict:
    """Per prompt word that not every training caption has: how often an image prompted with it has a nearest
    training image whose caption has it too (`rate`), against the share of training images whose caption has it
    (`chance`), over `images` images."""
    total = sum(counts.values())
    out = {}
    for word in sorted({w for p in prompts for w in caption_words(p)}):
        chance = sum(c for cap, c in counts.items() if word in caption_words(cap)) / total
        hits = [word in caption_words(n) for p, n in zip(prompts, neighbours) if word in caption_words(p)]
        if chance < 1.0:
            out[word] = {"rate": float(np.mean(hits)), "chance": chance, "images": len(hits)}
    return out


def least_rendered(by_word: dict, count: int = 3) -> list[str]:
    """The words rendered least above their chance ((rate - chance) / (1 - chance), lowest first)."""
    lift = {w: (v["rate"] - v["chance"]) / (1.0 - v["chance"]) for w, v in by_word.items()}
    return sorted(lift, key=lambda w: (lift[w], w))[:count]


def poorly_rendered(result: dict) -> str | None:
    """Why the captions are rendered too poorly for aspect attribution to mean much (None when they are not): the
    whole is near chance, or at least a quarter of the caption words each is (say, every subject of the set).

    Measured on shapes (docs/benchmarks.md, "Capacity and caption fidelity"): after 800 UNet steps a 24-subject
    caption set was 0.49 above chance overall while 16 of its 28 words were below 0.25 each; trained to 1,600
    steps, and for real images, no word was."""
    if result["above_chance"] < NEAR_CHANCE:
        return "near chance"
    words = result.get("by_word") or {}
    weak = sorted(w for w, v in words.items() if (v["rate"] - v["chance"]) / (1.0 - v["chance"]) < NEAR_CHANCE)
    if words and len(weak) >= WEAK_SHARE * len(words):
        more = ", ..." if len(weak) > 6 else ""
        return f"{len(weak)} of {len(words)} caption words near chance ({', '.join(weak[:6])}{more})"
    return None


def fidelity_line(result: dict) -> str:
    """The one line that says how well a model renders its captions (and its least rendered words)."""
    words = result.get("by_word") or {}
    least = ", ".join(f"{w} {words[w]['rate']:.2f} (chance {words[w]['chance']:.2f})"
                      for w in result.get("least_rendered") or [] if w in words)
    return (f"the pipeline renders its captions at {result['words']:.2f} of their words (chance "
            f"{result['words_chance']:.2f}; whole caption {result['exact']:.2f}, chance {result['exact_chance']:.2f}"
            + (f"; least rendered: {least}" if least else "") + ")")
