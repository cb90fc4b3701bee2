"""Retraining harness: resumable after a limit or SIGKILL, bit-identical to an uninterrupted run, rank split."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gradtrace.cli import main
from gradtrace.evaluate.harness import is_finished
from gradtrace.evaluate.retrain import open_retraining, retrain_run
from gradtrace.pipeline import TrainSpec, train_run

SUBSETS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch single-threaded for this module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lds") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures run before the autouse one)
    try:
        return train_run(TrainSpec(data="digits", out=str(out), n=60, ids=np.arange(40), steps=6, batch_size=8),
                         progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "retrain"
    res = retrain_run(run, out, n_subsets=SUBSETS, fraction=0.5, n_seeds=1, subset_seed=3, progress=False)
    assert res["finished"] == SUBSETS and res["trained"] == SUBSETS
    return out


def assert_same_models(a: Path, b: Path) -> None:
    ra, rb = open_retraining(a), open_retraining(b)
    assert ra.jobs == rb.jobs and np.array_equal(ra.subsets, rb.subsets)
    for pa, pb in zip(ra.model_paths(), rb.model_paths()):
        sa, sb = load_file(str(pa / "model.safetensors")), load_file(str(pb / "model.safetensors"))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{pa.name} differs"


def test_models_follow_the_recipe(run, reference):
    import json

    r = open_retraining(reference)
    assert r.subsets.shape == (SUBSETS, 20) and r.seeds == [0]
    full = json.loads((Path(run) / "config.json").read_text())
    for s, path in enumerate(r.model_paths()):
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["train_ids"] == r.subsets[s].tolist()
        assert cfg["model_config"] == full["model_config"]
        assert {**cfg["train_config"], "seed": 0} == {**full["train_config"], "seed": 0}
        assert cfg["extra"]["subset"] == s


def test_resume_after_a_limit_is_bit_identical(run, reference, tmp_path):
    out = tmp_path / "retrain"
    res = retrain_run(run, out, n_subsets=SUBSETS, fraction=0.5, subset_seed=3, max_models=2, progress=False)
    assert res["trained"] == 2 and res["finished"] == 2 and len(res["missing"]) == SUBSETS - 2
    res = retrain_run(run, out, n_subsets=SUBSETS, fraction=0.5, subset_seed=3, progress=False)
    assert res["skipped"] == 2 and res["trained"] == SUBSETS - 2 and not res["missing"]
    assert_same_models(out, reference)
    res = retrain_run(run, out, n_subsets=SUBSETS, fraction=0.5, subset_seed=3, progress=False)
    assert res["trained"] == 0 and res["skipped"] == SUBSETS


def test_ranks_split_the_models(run, reference, tmp_path, monkeypatch):
    out = tmp_path / "retrain"
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        res = retrain_run(run, out, n_subsets=SUBSETS, fraction=0.5, subset_seed=3, progress=False)
        assert (res["rank"], res["world"], res["trained"]) == (rank, 2, SUBSETS // 2)
        done.append(sorted(res["model_wall_s"]))
    assert done[0] == [f"s{s:04d}-r0" for s in range(1, SUBSETS, 2)]
    assert_same_models(out, reference)


def test_sigkill_mid_run_then_resume(run, reference, tmp_path):
    out = tmp_path / "retrain"
    cmd = [sys.executable, "-m", "gradtrace.cli", "retrain", "--run", str(run), "--subsets", str(SUBSETS),
           "--subset-seed", "3", "--workers", "2", "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out / "models").is_dir() and any(is_finished(out, f"s{s:04d}-r0") for s in range(SUBSETS)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the parent only: its workers must stop with it
        proc.wait()
        time.sleep(0.5)
        finished_soon_after = sorted(p.name for p in (out / "models").glob("s*"))
        for _ in range(200):  # the workers exit on their parent's death (an idle forkserver may linger briefly)
            if len(_live_in_group(proc.pid)) <= 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"workers outlived their killed parent: {_live_in_group(proc.pid)}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert sorted(p.name for p in (out / "models").glob("s*")) == finished_soon_after  # no model after the kill
    finished = [s for s in range(SUBSETS) if is_finished(out, f"s{s:04d}-r0")]
    assert 1 <= len(finished) < SUBSETS
    # a half-written model under its final name (weights, no config.json) is not taken as finished
    todo = next(s for s in range(SUBSETS) if s not in finished)
    half = out / "models" / f"s{todo:04d}-r0"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"half")
    res = retrain_run(run, out, n_subsets=SUBSETS, fraction=0.5, subset_seed=3, progress=False)
    assert res["skipped"] == len(finished) and not res["missing"]
    assert not list((out / "models").glob(".tmp-*"))
    assert_same_models(out, reference)


def _live_in_group(pgid: int) -> list[int]:
    """Pids of the processes of a process group that are not zombies (from /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_bad_inputs_exit_2_with_one_line(run, reference, tmp_path, capsys):
    cases = [
        ["retrain", "--run", str(tmp_path / "missing")],
        ["retrain", "--run", str(run), "--fraction", "1.5", "--out", str(tmp_path / "a")],
        ["retrain", "--run", str(run), "--subsets", "1", "--out", str(tmp_path / "b")],
        ["retrain", "--run", str(run), "--workers", "0", "--out", str(tmp_path / "c")],
        ["retrain", "--run", str(run), "--subsets", "5", "--subset-seed", "3", "--out", str(reference)],
        ["eval", "lds", "--run", str(run), "--retrain", str(tmp_path / "none"), "--train-features", "x",
         "--queries", "y", "--out", str(tmp_path / "o")],
        ["eval", "lds", "--run", str(run), "--retrain", str(reference), "--train-features", str(tmp_path),
         "--queries", "y", "--out", str(tmp_path / "o"), "--lambda-c", "-1"],
        ["eval", "counterfactual", "--run", str(run), "--train-features", str(tmp_path / "nostore"),
         "--queries", "y", "--out", str(tmp_path / "o")],
    ]
    for args in cases:
        code, err = _cli(capsys, *args)
        assert code == 2, (args, err)
        assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    partial = tmp_path / "partial"
    assert main(["retrain", "--run", str(run), "--subsets", "3", "--max-models", "1", "--out", str(partial),
                 "--no-progress"]) == 0
    assert "1/3 models finished" in capsys.readouterr().out
    code, err = _cli(capsys, "eval", "lds", "--run", str(run), "--retrain", str(partial), "--train-features",
                     str(tmp_path), "--queries", "y", "--out", str(tmp_path / "o"))
    assert code == 2 and "unfinished" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exc:  # argparse: unknown method
        main(["eval", "lds", "--run", "r", "--retrain", "d", "--train-features", "x", "--queries", "y",
              "--out", "o", "--method", "nope"])
    assert exc.value.code == 2


def test_counterfactual_deltas_point_to_worse_for_losses_and_margins():
    from gradtrace.evaluate.counterfactual import counterfactual_jobs, summarize_counterfactual

    train = np.arange(10)
    jobs = counterfactual_jobs(train, [3, 7], [[0, 1], [2, 4]], [[5, 6], [8, 9]], [11])
    value = {"full-r0": [1.0, 2.0], "q3-top-r0": [1.5, 0.0], "q3-random-r0": [0.9, 0.0],
             "q7-top-r0": [0.0, 2.6], "q7-random-r0": [0.0, 2.2]}
    outputs = np.array([value[j.name] for j in jobs])
    as_loss = summarize_counterfactual(jobs, outputs, [3, 7], 1, [[0, 1], [2, 4]], [[5, 6], [8, 9]])
    assert [(r["delta_top"], r["delta_random"]) for r in as_loss["per_query"]] == \
        [pytest.approx((0.5, -0.1)), pytest.approx((0.6, 0.2))]
    assert as_loss["summary"]["fraction_top_above_random"] == 1.0
    as_margin = summarize_counterfactual(jobs, outputs, [3, 7], 1, [[0, 1], [2, 4]], [[5, 6], [8, 9]],
                                         harm_sign=-1.0)  # a margin that rose is the model doing better
    assert [(r["delta_top"], r["delta_random"]) for r in as_margin["per_query"]] == \
        [pytest.approx((-0.5, 0.1)), pytest.approx((-0.6, -0.2))]
    assert as_margin["summary"]["fraction_top_above_random"] == 0.0
    assert as_margin["per_query"][0]["output_full"] == 1.0


def test_a_folder_made_with_a_setting_no_longer_given_names_it(tmp_path):
    from gradtrace.errors import UserError
    from gradtrace.evaluate.retrain import open_or_create

    open_or_create(tmp_path / "r", {"kind": "lds", "a": 1, "b": 2}, "retraining", "choose a new --out")
    with pytest.raises(UserError, match=r"\('b' differs\); choose a new --out"):
        open_or_create(tmp_path / "r", {"kind": "lds", "a": 1}, "retraining", "choose a new --out")
