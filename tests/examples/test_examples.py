"""The examples run as a user runs them (`python examples/NAME.py OUT`), so they cannot rot; what they compute is
the CLI's answer on the same weights and data."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from gradtrace.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_classifier_example_gives_the_clis_answer(tmp_path, monkeypatch, capsys):
    script = EXAMPLES / "classifier_digits.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and out[-1].startswith("learned and uniform weights agree on")
    assert main(["attribute", "--train", str(tmp_path / "train"), "--queries", str(tmp_path / "queries"),
                 "--weights", str(tmp_path / "weights.json"), "--top-k", "5", "--no-report",
                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    for name in ("topk_ids.npy", "topk_scores.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "attributions" / name), np.load(tmp_path / "cli" / name))
    example = json.loads((tmp_path / "attributions" / "attributions.json").read_text())
    first = example["queries"][0]["top"][0]  # the first printed line is the first query's best training image
    assert out[0].startswith(f"held-out {example['queries'][0]['query_id']} (")
    assert f"training {first['train_id']} " in out[0]
    uniform = json.loads((tmp_path / "attributions" / "uniform" / "attributions.json").read_text())
    assert uniform["manifest"]["method"]["c"] == example["manifest"]["method"]["c"]


def _cli_topk(checkpoint, train, queries, out: Path, *, method: str, top_k: int, extra=(), featurize=()) -> tuple:
    """The CLI's top-k ids and scores on a checkpoint folder and two in-memory data sets (saved with save_to_disk)."""
    for name, data in (("train", train), ("queries", queries)):
        data.save_to_disk(str(out / f"data-{name}"))
        assert main(["featurize", "--checkpoint", str(checkpoint), "--data", f"hf:{out / f'data-{name}'}",
                     *featurize, "--out", str(out / name), "--no-progress"]) == 0
    assert main(["attribute", "--train", str(out / "train"), "--queries", str(out / "queries"), "--method", method,
                 *extra, "--top-k", str(top_k), "--no-report", "--out", str(out / "attr"), "--no-progress"]) == 0
    return np.load(out / "attr" / "topk_ids.npy"), np.load(out / "attr" / "topk_scores.npy")


def test_causal_lm_tracer_example_gives_the_clis_answer(tmp_path, capsys):
    import datasets

    example = runpy.run_path(str(EXAMPLES / "tracer_causal_lm.py"), run_name="example")
    model, tokenizer, result = example["main"](tmp_path / "example")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 * len(example["QUERIES"])
    first = result.records()[0]
    assert out[0] == f"{first['query_text']!r} #1: {first['train_text']!r} ({first['score']:.4g})"
    model.save_pretrained(tmp_path / "folder")  # the user's own save of the same weights, read by the CLI
    tokenizer.save_pretrained(tmp_path / "folder")
    ids, scores = _cli_topk(tmp_path / "folder", datasets.Dataset.from_dict({"text": example["TEXTS"]}),
                            datasets.Dataset.from_dict({"text": example["QUERIES"]}), tmp_path / "cli",
                            method="trak", top_k=3)
    np.testing.assert_array_equal(np.load(result.path / "topk_ids.npy"), ids)
    np.testing.assert_array_equal(np.load(result.path / "topk_scores.npy"), scores)


def test_classifier_tracer_example_gives_the_clis_answer(tmp_path, monkeypatch, capsys):
    import types

    from gradtrace.adapters.checkpoint import model_fingerprint
    from gradtrace.pipeline.materialize import as_hf_dataset

    example = runpy.run_path(str(EXAMPLES / "tracer_classifier.py"), run_name="example")
    main_module = types.ModuleType("__main__")  # as when run as a script: its class is __main__.SmallCNN
    main_module.__dict__.update(example)
    monkeypatch.setitem(sys.modules, "__main__", main_module)
    for value in example.values():
        if isinstance(value, type) and value.__module__ == "example":
            monkeypatch.setattr(value, "__module__", "__main__")
    model, train, queries, result = example["main"](tmp_path / "example")
    out = capsys.readouterr().out.splitlines()
    rows = result.records()
    assert len(out) == 6 and out[-1].startswith(f"{len(rows)} rows")
    assert out[0].startswith(f"held-out 0 (label {rows[0]['query_caption']}): #1 training {rows[0]['train_id']} ")
    checkpoint = tmp_path / "example" / "store" / "model"
    assert json.loads((checkpoint / "config.json").read_text())["fingerprint"] == model_fingerprint(model)
    ids, scores = _cli_topk(checkpoint, as_hf_dataset(train), as_hf_dataset(queries), tmp_path / "cli",
                            method="trak", top_k=5, extra=["--kernel", "per-group"])
    np.testing.assert_array_equal(np.load(result.path / "topk_ids.npy"), ids)
    np.testing.assert_array_equal(np.load(result.path / "topk_scores.npy"), scores)


def test_text_to_image_tracer_example_gives_the_clis_answer(tmp_path, capsys):
    example = runpy.run_path(str(EXAMPLES / "tracer_text_to_image.py"), run_name="example")
    pipe, train, queries, result = example["main"](tmp_path / "example")
    out = capsys.readouterr().out.splitlines()
    rows = result.records()
    assert len(out) == len(rows) == 9
    assert out[0] == (f"query 0 ({rows[0]['query_text']}): #1 training {rows[0]['train_id']} ({rows[0]['train_text']}) "
                      f"score {rows[0]['score']:.4g}")
    assert pipe.unet.peft_config and not result.holds_texts and result._repr_html_().count("<img") >= 3 * 4
    checkpoint = tmp_path / "example" / "store" / "model"  # the LoRA fine-tune the Tracer wrote, read by the CLI
    ids, scores = _cli_topk(checkpoint, train, queries, tmp_path / "cli", method="dtrak", top_k=3,
                            featurize=["--measurement", "dtrak", "--timesteps", "2"])
    np.testing.assert_array_equal(np.load(result.path / "topk_ids.npy"), ids)
    np.testing.assert_array_equal(np.load(result.path / "topk_scores.npy"), scores)
