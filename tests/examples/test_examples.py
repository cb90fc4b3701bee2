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
