"""bench/gpu_check.py in its tiny CPU mode (`--dry-run`): every step of the GPU check runs, so the script that a GPU
machine runs (`make gpu-check`) cannot rot. Its numbers are checked where they have a reference: the device's
features against the CPU's (here the same device: cosine 1), the top-k scores against a float32 product."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_the_gpu_check_runs_every_step_tiny_on_the_cpu(tmp_path):
    proc = _run("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["device"] == "cpu" and res["dry_run"]
    feat = res["featurize"]
    assert feat["cosine_float32"]["min"] > 1 - 1e-9 and feat["float32_target_met"]  # CPU against itself
    assert 0.99 < feat["cosine_bfloat16"]["min"] <= 1 + 1e-9  # bfloat16 compute: close, not equal
    assert res["lora"]["steps"] == 2
    configs = [row.split("|")[1].strip() for row in res["cifar"]["table"][2:]]
    assert configs == ["floor", "kron"]
    score = res["scoring"]
    assert score["n"] == 5000 and score["top_scores_max_rel_error"] < 1e-2
    assert "| scoring 5,000 x 256 float16" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_without_a_gpu_the_real_check_is_refused_in_one_line(tmp_path):
    proc = _run("--out", str(tmp_path))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--dry-run" in proc.stderr
    assert not (tmp_path / "results.json").exists()
