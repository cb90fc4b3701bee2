"""Kill drills: each long-running command, run as a real process, is SIGKILLed early, midway and late, then run
again with the same arguments until it finishes. Its output tree must equal, byte for byte, the tree of an
uninterrupted run (JSON compared with clocks and work counters left out, see fixtures.reliability.VOLATILE; every
other file by sha256, hidden files included, so no state file, temporary file or staging folder may be left),
and after every kill nothing half-written may pass for finished: every finished-looking file reads, and every
finished unit (a checkpoint, a store, a retrained model, a cached output) equals the uninterrupted run's.

The kill points are progress the command itself writes (training state steps, store rows, finished models,
cached outputs), so they hold on a slow, loaded machine; a command that finishes before its kill point fails
the drill rather than passing it unkilled.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fixtures.reliability import canonical, ok
from fixtures.zygote import Zygote
from gradtrace.adapters.train_state import STATE_FILE
from gradtrace.errors import UserError
from gradtrace.evaluate.harness import is_finished
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")
FEAT = ["--dim", "64", "--timesteps", "1", "--chunk", "4"]
STEPS = 20        # the run's recipe: every retrained model trains this many steps
EVERY = {"GRADTRACE_TRAIN_STATE_EVERY": "5"}  # training state every 5 steps (the default is every 60 s)
KILLED = -9


@pytest.fixture(scope="module")
def zygote():
    with Zygote() as z:
        yield z


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    ok("train", "--data", "digits", "--n", 40, "--steps", STEPS, "--batch-size", 4, "--out", root / "ckpt")
    ok("featurize", "--checkpoint", root / "ckpt", "--out", root / "train", *FEAT)
    (root / "query-ids.txt").write_text("\n".join(str(i) for i in range(40, 50)))
    ok("featurize", "--checkpoint", root / "ckpt", "--data", "digits", "--n", 50, "--ids", root / "query-ids.txt",
       "--out", root / "queries", *FEAT)
    return root


def run(zygote, argv, log: Path, env=None) -> int:
    zygote.start(argv + ["--no-progress"], log, env)
    return zygote.wait()


def run_until(zygote, argv, log: Path, progress, kill_at: float, env=None, timeout: float = 300.0):
    """Start the command and SIGKILL it as soon as `progress()` reaches `kill_at` (never, for infinity); returns its
    exit code (-9 when killed) and the lowest progress seen while it ran."""
    pid = zygote.start(argv + ["--no-progress"], log, env)
    deadline, lowest = time.monotonic() + timeout, float("inf")
    while not zygote.finished() and time.monotonic() < deadline:
        try:
            value = progress()
        except (OSError, ValueError, KeyError, RuntimeError, UserError):  # a file between writes: look again
            value = None
        if value is not None:
            lowest = min(lowest, value)
            if value >= kill_at:
                os.kill(pid, signal.SIGKILL)
                break
        time.sleep(0.005)
    return zygote.wait(), lowest


def drill(zygote, tmp_path, argv_for, progress, points, *, env=None, prepare=None, check=None):
    """Run `argv_for(root)` uninterrupted under tmp/ref, then under tmp/kill: killed when `progress(kill)` reaches
    each of `points` ({name: value}), then run to the end. After each kill `check(kill_root, ref_root)`, and the
    next run must continue (its progress never reads below the progress at the kill: no restart from zero). Then
    the two trees must be equal. Returns both roots."""
    ref, kill = tmp_path / "ref", tmp_path / "kill"
    for root in (ref, kill):
        root.mkdir()
        if prepare:
            prepare(root)
    assert run(zygote, argv_for(ref), tmp_path / "ref.log", env) == 0, (tmp_path / "ref.log").read_text()
    done = 0
    for name, kill_at in [*points.items(), ("last", float("inf"))]:
        log = tmp_path / f"{name}.log"
        code, lowest = run_until(zygote, argv_for(kill), log, lambda: progress(kill), kill_at, env)
        assert lowest >= done, f"{name}: progress fell to {lowest} after a kill at {done}: the run started over"
        if name == "last":
            assert code == 0, log.read_text()
            break
        assert code == KILLED, f"{name}: exit {code} before the kill point\n{log.read_text()}"
        nothing_torn(kill)
        if check:
            check(kill, ref)
        done = progress(kill)
    assert canonical(kill, kill) == canonical(ref, ref)
    return ref, kill


def nothing_torn(root: Path) -> None:
    """Every file under a finished name reads whole: JSON parses, arrays and weights load."""
    for p in root.rglob("*"):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".npy":
            np.load(p, mmap_mode="r")
        elif p.suffix == ".safetensors":
            load_file(p)


def same_file(a: Path, b: Path) -> None:
    assert canonical(a.parent, a.parent).get(a.name) == canonical(b.parent, b.parent).get(b.name), a


_STEPS: dict = {}


def state_step(path: Path) -> int:
    """The step of a training state file (0 when there is none); read again only when the file changed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    sig = (st.st_ino, st.st_mtime_ns, st.st_size)
    if _STEPS.get(path, (None,))[0] != sig:
        _STEPS[path] = (sig, int(torch.load(path, weights_only=True)["step"]))
    return _STEPS[path][1]


def rows_done(store: Path) -> int:
    """The rows a feature store records as done (0 before it exists)."""
    if not (store / "manifest.json").exists():
        return 0
    return FeatureStore.open(store, require_complete=False).rows_done


def models_progress(root: Path, names: list[str]) -> int:
    """Steps done over a list of models: finished ones count STEPS, the one training its saved state's step.
    The states are read before the finished models: a model is renamed into place before its state is removed, so a
    model finishing between the two reads is counted once or twice, never not at all."""
    models = root / "models"
    training = max([state_step(models / f".{n}{STATE_FILE}") for n in names], default=0)
    return training + sum(STEPS for n in names if (models / n / "config.json").exists())


def same_finished_models(kill: Path, ref: Path) -> None:
    """Every model under its final name is finished (loads) and equals the uninterrupted run's."""
    for model in (kill / "models").iterdir():
        if not model.name.startswith("."):
            assert is_finished(kill, model.name), model
            assert canonical(model, kill) == canonical(ref / "models" / model.name, ref), model


def test_train(zygote, tmp_path):
    argv = lambda root: ["train", "--data", "digits", "--n", 40, "--steps", 40, "--batch-size", 4, "--out",
                         root / "ckpt"]
    progress = lambda root: 40 if (root / "ckpt" / "config.json").exists() else state_step(root / "ckpt" / STATE_FILE)

    def check(kill, ref):
        assert not (kill / "ckpt" / "config.json").exists()  # unfinished: not a checkpoint
        assert state_step(kill / "ckpt" / STATE_FILE) > 0

    drill(zygote, tmp_path, argv, progress, {"early": 5, "midway": 20, "late": 30}, env=EVERY, check=check)


def test_featurize(zygote, inputs, tmp_path):
    argv = lambda root: ["featurize", "--checkpoint", inputs / "ckpt", "--out", root / "store", "--dim", 64,
                         "--timesteps", 1, "--chunk", 2]

    def check(kill, ref):
        store = FeatureStore.open(kill / "store", require_complete=False)
        assert not store.complete
        done = store.rows_done  # the rows recorded as done equal the uninterrupted run's
        assert 0 < done < 40
        assert np.array_equal(store.features[:done], FeatureStore.open(ref / "store").features[:done])

    drill(zygote, tmp_path, argv, lambda root: rows_done(root / "store"), {"early": 6, "midway": 20, "late": 30},
          check=check)


@pytest.fixture(scope="module")
def retrained(zygote, inputs, tmp_path_factory):
    """The retrain drill's trees (its reference is the retraining the eval drills read)."""
    tmp = tmp_path_factory.mktemp("retrain")
    names = [f"s{s:04d}-r0" for s in range(4)]
    argv = lambda root: ["retrain", "--run", inputs / "ckpt", "--subsets", 4, "--out", root / "retrain"]
    progress = lambda root: models_progress(root / "retrain", names)
    check = lambda kill, ref: same_finished_models(kill / "retrain", ref / "retrain")
    return drill(zygote, tmp, argv, progress, {"early": 5, "midway": 40, "late": 65}, env=EVERY, check=check)


def test_retrain(retrained):
    ref, kill = retrained
    assert sorted(p.name for p in (kill / "retrain" / "models").iterdir()) == [f"s{s:04d}-r0" for s in range(4)]


def test_learn_weights(zygote, inputs, tmp_path):
    argv = lambda root: ["learn-weights", "--train", inputs / "train", "--generate", 8, "--sample-steps", 8,
                         "--steps", 300, "--out", root / "w.json"]
    made = lambda root: next((root / "learning-queries").glob("general-n8-*"), root / "learning-queries" / "none")

    def progress(root):  # samples written (1), learning-query rows featurized (8), store complete (1)
        store = made(root) / "features"
        return ((made(root) / "samples" / "manifest.json").exists() + rows_done(store)
                + ((store / "manifest.json").exists() and FeatureStore.open(store, require_complete=False).complete))

    def check(kill, ref):
        assert not (kill / "w.json").exists()
        if (made(kill) / "samples" / "manifest.json").exists():
            assert canonical(made(kill) / "samples", kill) == canonical(made(ref) / "samples", ref)
        if (made(kill) / "features" / "manifest.json").exists():
            store = FeatureStore.open(made(kill) / "features", require_complete=False)
            done = store.rows_done
            assert np.array_equal(store.features[:done], FeatureStore.open(made(ref) / "features").features[:done])

    drill(zygote, tmp_path, argv, progress, {"early": 1, "midway": 5, "late": 10}, check=check)


def test_eval_lds(zygote, inputs, retrained, tmp_path):
    source = retrained[0] / "retrain"
    prepare = lambda root: shutil.copytree(source, root / "retrain")  # each its own cache of model outputs
    argv = lambda root: ["eval", "lds", "--run", inputs / "ckpt", "--retrain", root / "retrain", "--train-features",
                         inputs / "train", "--queries", inputs / "queries", "--per-group", "--timesteps", 8,
                         "--draws", 8, "--out", root / "lds"]
    outputs = lambda root: root / "retrain" / "outputs"
    # the cache's manifest (1), then one file per retrained model (4); a killed write's temporary file is hidden
    progress = lambda root: len(list(outputs(root).glob("*/manifest.json")) + list(outputs(root).glob("*/[!.]*.npy")))

    def check(kill, ref):
        assert not (kill / "lds").exists() or not any((kill / "lds").iterdir())
        for npy in outputs(kill).glob("*/[!.]*.npy"):
            same_file(npy, ref / npy.relative_to(kill))

    drill(zygote, tmp_path, argv, progress, {"early": 1, "midway": 3, "late": 4}, prepare=prepare, check=check)


def test_eval_counterfactual(zygote, inputs, tmp_path):
    argv = lambda root: ["eval", "counterfactual", "--run", inputs / "ckpt", "--train-features", inputs / "train",
                         "--queries", inputs / "queries", "--num-queries", 1, "--top-k", 3, "--timesteps", 4,
                         "--draws", 4, "--out", root / "cf"]
    names = lambda root: json.loads((root / "cf" / "manifest.json").read_text())["settings"]["jobs"]
    # the models: trained on the full set, without the query's top 3, without 3 random ones
    progress = lambda root: models_progress(root / "cf", names(root)) if (root / "cf" / "manifest.json").exists() else 0

    def check(kill, ref):
        assert not (kill / "cf" / "counterfactual.json").exists()
        same_finished_models(kill / "cf", ref / "cf")

    drill(zygote, tmp_path, argv, progress, {"early": 5, "midway": 30, "late": 50}, env=EVERY, check=check)
