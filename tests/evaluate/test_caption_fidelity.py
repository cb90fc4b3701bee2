"""Caption fidelity against a plain loop: the nearest training image by summed squared pixel differences, the share
of the prompt's words in its caption, and chance as the average over every training image; planted copies score 1,
noise scores near chance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradtrace.errors import UserError
from gradtrace.evaluate.caption_fidelity import caption_fidelity, poorly_rendered

CAPTIONS = ["a red circle on a plain background", "a red square on a plain background",
            "a blue circle on a noise background", "a blue square on a checker background", "a tree"]


def planted(n_train: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n_train, 3, 6, 6, generator=g) * 2 - 1
    rng = np.random.default_rng(seed)
    return images, [CAPTIONS[i] for i in rng.choice(len(CAPTIONS), size=n_train, p=[0.4, 0.2, 0.2, 0.15, 0.05])]


def loop_fidelity(images, prompts, train, captions) -> dict:
    """The statistic as a plain loop."""
    def share(prompt, caption):
        want = set(prompt.lower().split())
        return sum(w in caption.lower().split() for w in want) / len(want)
    words, exact, words_chance, exact_chance, neighbours = [], [], [], [], []
    for image, prompt in zip(images, prompts):
        dists = [float(((image.double() - t.double()) ** 2).sum()) for t in train]
        neighbour = captions[int(np.argmin(dists))]
        neighbours.append(neighbour)
        words.append(share(prompt, neighbour))
        exact.append(float(neighbour == prompt))
        words_chance.append(np.mean([share(prompt, c) for c in captions]))
        exact_chance.append(np.mean([c == prompt for c in captions]))
    by_word = {}
    for word in {w for p in prompts for w in p.lower().split()}:
        chance = np.mean([word in c.lower().split() for c in captions])
        if chance < 1:
            hits = [word in n.lower().split() for p, n in zip(prompts, neighbours) if word in p.lower().split()]
            by_word[word] = {"rate": np.mean(hits), "chance": chance, "images": len(hits)}
    return {"words": np.mean(words), "exact": np.mean(exact), "words_chance": np.mean(words_chance),
            "exact_chance": np.mean(exact_chance), "by_word": by_word}


def test_matches_a_plain_loop_on_perturbed_copies_and_noise():
    train, captions = planted(60, 0)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(60, (25,), generator=g)
    # perturbed copies (some nearest to another image) and pure noise, prompted with assorted captions
    images = torch.cat([train[rows] + 0.9 * torch.randn(25, 3, 6, 6, generator=g), torch.rand(10, 3, 6, 6) * 2 - 1])
    prompts = [captions[int(r)] for r in rows] + [CAPTIONS[i % len(CAPTIONS)] for i in range(10)]
    got = caption_fidelity(images, prompts, train, captions)
    want = loop_fidelity(images, prompts, train, captions)
    by_word = want.pop("by_word")
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["by_word"].keys() == by_word.keys() and "a" not in by_word and "background" in by_word
    for word, value in by_word.items():
        assert got["by_word"][word] == pytest.approx(value, abs=1e-12), word
    lift = {w: (v["rate"] - v["chance"]) / (1 - v["chance"]) for w, v in by_word.items()}
    assert [lift[w] for w in got["least_rendered"]] == sorted(lift.values())[:3]
    assert 0 < got["exact"] < 1  # the perturbation moved some images to a neighbour of another caption
    assert got["above_chance"] == pytest.approx((want["words"] - want["words_chance"]) / (1 - want["words_chance"]))
    assert got["images"] == 35 and got["prompts"] == len(set(prompts))


def test_copies_of_training_images_score_one():
    train, captions = planted(80, 2)
    rows = np.random.default_rng(3).choice(80, size=40)
    got = caption_fidelity(train[rows].clone(), [captions[r] for r in rows], train, captions)
    assert got["words"] == got["exact"] == got["above_chance"] == 1.0
    assert got["nearest"] == [int(r) for r in rows]
    assert got["exact_chance"] < 0.4 and got["words_chance"] < 0.9


def test_noise_scores_near_chance():
    train, captions = planted(200, 4)
    g = torch.Generator().manual_seed(5)
    images = torch.rand(3000, 3, 6, 6, generator=g) * 2 - 1
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(3000)]
    got = caption_fidelity(images, prompts, train, captions)
    assert abs(got["exact"] - got["exact_chance"]) < 0.03
    assert abs(got["words"] - got["words_chance"]) < 0.03
    assert abs(got["above_chance"]) < 0.1


def test_refuses_mismatched_inputs():
    train, captions = planted(10, 0)
    with pytest.raises(UserError, match="one prompt per generated image"):
        caption_fidelity(train[:3], ["a tree"] * 2, train, captions)
    with pytest.raises(UserError, match="same resolution"):
        caption_fidelity(torch.zeros(2, 3, 4, 4), ["a tree"] * 2, train, captions)


def word(rate: float, chance: float) -> dict:
    return {"rate": rate, "chance": chance, "images": 4}


@pytest.mark.parametrize("above, rates, expected", [
    (0.20, [0.9, 0.9, 0.9, 0.9], "near chance"),                      # the whole near chance
    (0.50, [0.9, 0.9, 0.9, 0.2], "1 of 4 caption words near chance (w3)"),  # lift (0.2 - 0.1) / 0.9 = 0.11
    (0.50, [0.9, 0.9, 0.9, 0.35], None),                               # lift 0.28: rendered
    (0.50, [0.9, 0.9, 0.9, 0.9], None),
    (0.50, [0.9, 0.9, 0.9, 0.9, 0.9, 0.2], None),                      # 1 of 6: under a quarter of the words
])
def test_poorly_rendered_when_the_whole_or_a_quarter_of_the_words_is_near_chance(above, rates, expected):
    by_word = {f"w{i}": word(r, 0.1) for i, r in enumerate(rates)}
    assert poorly_rendered({"above_chance": above, "by_word": by_word}) == expected
