"""A classifier in Python, end to end: train a tiny ResNet on scikit-learn's digits, featurize its training images
and some held-out ones, find each held-out image's most influential training images (TRAK, per-group kernel),
learn group weights without labels, compare them fairly with uniform weights, and look at the answer as a table.

    python examples/classifier_digits.py [OUT_DIR]       # about a minute on two CPU cores

Every name used here is documented in the README ("Library use"); the test suite runs this file.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import gradtrace
from gradtrace import (
    AttributeSpec,
    AttributionResult,
    FeaturizeSpec,
    LearnWeightsSpec,
    TrainSpec,
    attribute_run,
    featurize_run,
    learn_weights_run,
    train_run,
)

TRAIN, HELD_OUT, LEARNING = np.arange(0, 200), np.arange(200, 210), np.arange(210, 240)


def main(out: Path) -> AttributionResult:
    model = train_run(TrainSpec(data="digits", n=240, ids=TRAIN, adapter="classifier", model="resnet", steps=30,
                                batch_size=32, lr=0.03, model_options='{"widths": [4, 8], "blocks": [1, 1]}',
                                out=str(out / "model")), progress=False)
    features = dict(checkpoint=str(model), projection="identity")
    train = featurize_run(FeaturizeSpec(**features, out=str(out / "train")), progress=False)  # its training images
    for name, ids in (("queries", HELD_OUT), ("learning", LEARNING)):                         # images it never saw
        featurize_run(FeaturizeSpec(**features, data="digits", n=240, ids=ids, out=str(out / name)), progress=False)
    weights, _ = learn_weights_run(LearnWeightsSpec(train=str(train.path), queries=str(out / "learning"),
                                                    steps=50, out=str(out / "weights.json")), progress=False)
    attribute_run(AttributeSpec(train=str(train.path), queries=str(out / "queries"), weights=str(weights),
                                compare_uniform=True, top_k=5, out=str(out / "attributions")), progress=False)
    learned = gradtrace.AttributionResult.open(out / "attributions")
    uniform = AttributionResult.open(out / "attributions" / "uniform")  # the same c, uniform weights
    for row in learned.records()[:5]:
        print(f"held-out {row['query_id']} ({row['query_caption']}): #{row['rank']} training {row['train_id']} "
              f"({row['train_caption']}) score {row['score']:.4g}")
    same = np.mean([a["train_id"] == b["train_id"] for a, b in zip(learned.records(), uniform.records())])
    print(f"learned and uniform weights agree on {same:.0%} of the top-5 slots")
    return learned


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gradtrace-example-")))
