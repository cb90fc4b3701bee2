"""Your own `nn.Module` classifier in memory, attributed in a few lines: a small CNN trained here for a few steps on
scikit-learn's digits (as a stand-in for the model you already have), its training images as a list of
(PIL image, label) pairs, and for each held-out image the training images that most support its prediction (TRAK's
margin, per-group kernel), shown inline in Jupyter and as a table.

    python examples/tracer_classifier.py [OUT_DIR]       # seconds on two CPU cores

gradtrace rebuilds the model for its later stages with `factory(**kwargs)` (default: its own class, no
arguments). Every name used here is documented in the README ("Library use"); the test suite runs this file.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

import gradtrace


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


def digits(n: int) -> list[tuple[Image.Image, int]]:
    d = load_digits()
    return [(Image.fromarray((x * 255 / 16).astype(np.uint8)), int(y)) for x, y in zip(d.images[:n], d.target[:n])]


def trained(pairs, steps: int = 60) -> SmallCNN:
    """A few full-batch Adam steps on the pairs (images scaled to [-1, 1], as gradtrace feeds them)."""
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.tensor(np.stack([np.asarray(im, np.float32) for im, _ in pairs]))[:, None] / 127.5 - 1
    y = torch.tensor([label for _, label in pairs])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def main(out: Path):
    pairs = digits(220)
    train, queries = pairs[:200], pairs[200:]
    model = trained(train)
    tracer = gradtrace.Tracer(model, train=train, store=out / "store", progress=False)
    result = tracer.attribute(queries, method="trak", kernel="per-group", top_k=5)  # inline in Jupyter
    table = result.to_pandas()                                                      # one row per (query, rank)
    query, top = result.images(result.query_ids[0])                                 # PIL images
    for row in result.records()[:5]:
        print(f"held-out {row['query_id']} (label {row['query_caption']}): #{row['rank']} training "
              f"{row['train_id']} (label {row['train_caption']}) score {row['score']:.4g}")
    print(f"{len(table)} rows; the best match of held-out 0 is a {top[0].size[0]}x{top[0].size[1]} image")
    return model, train, queries, result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gradtrace-example-")))
