"""Bad input and faults, tried as a user would: each case ends with one line on stderr, exit code 2, no
traceback, and every artefact already on disk byte-for-byte unchanged."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fixtures.reliability import digest, ok, refused, tmpfs
from gradtrace.adapters.train_state import STATE_FILE
from gradtrace.cli import main
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")
FEAT = ["--dim", "64", "--timesteps", "1", "--chunk", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    ok("train", "--data", "digits", "--n", 12, "--steps", 2, "--batch-size", 4, "--out", root / "ckpt")
    ok("featurize", "--checkpoint", root / "ckpt", "--out", root / "train", *FEAT)
    ok("featurize", "--checkpoint", root / "ckpt", "--data", "digits", "--n", 16, "--out", root / "queries", *FEAT)
    (root / "a-file").write_text("mine\n")
    return root


@pytest.mark.parametrize("argv,words", [
    (["featurize", "--checkpoint", "x", "--out", "y", "--dim", "abc"], "invalid int value"),
    (["featurize", "--checkpoint", "x", "--out", "y", "--projection", "nope"], "invalid choice"),
    (["featurize", "--out", "y"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_are_one_line(run, capsys, argv, words):
    before = digest(run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and words in err and "usage:" not in err, err
    assert digest(run) == before


@pytest.mark.parametrize("stage", ["train", "sample", "featurize", "attribute"])
def test_out_naming_a_file_is_refused(run, capsys, stage):
    out = run / "a-file"
    argv = {"train": ["train", "--data", "digits", "--n", 8, "--steps", 1, "--out", out],
            "sample": ["sample", "--checkpoint", run / "ckpt", "--num", 1, "--sample-steps", 1, "--out", out],
            "featurize": ["featurize", "--checkpoint", run / "ckpt", "--out", out / "sub", *FEAT],
            "attribute": ["attribute", "--train", run / "train", "--queries", run / "queries", "--out", out]}[stage]
    refused(capsys, argv, "is a file", run)
    assert (run / "a-file").read_text() == "mine\n"


@pytest.mark.parametrize("fault", ["truncated", "garbage", "short-ids", "manifest-list", "dtype"])
def test_corrupt_store_arrays_are_refused(run, tmp_path, capsys, fault):
    bad = tmp_path / "bad"
    shutil.copytree(run / "queries", bad)
    feats = bad / "features.npy"
    if fault == "truncated":
        feats.write_bytes(feats.read_bytes()[:200])
    elif fault == "garbage":
        feats.write_bytes(b"not an array at all" * 10)
    elif fault == "short-ids":
        np.save(bad / "ids.npy", np.load(bad / "ids.npy")[:-1])
    elif fault == "manifest-list":
        (bad / "manifest.json").write_text("[1, 2, 3]")
    else:
        np.save(feats, np.load(feats).astype(np.float64))
    words = {"truncated": "unreadable", "garbage": "unreadable", "short-ids": "ids.npy has 15 rows",
             "manifest-list": "not a feature store manifest", "dtype": "holds float64"}[fault]
    refused(capsys, ["attribute", "--train", run / "train", "--queries", bad, "--out", tmp_path / "a"], words, run)
    assert not (tmp_path / "a").exists()


def test_meaningless_input_is_refused(run, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    refused(capsys, ["featurize", "--checkpoint", run / "ckpt", "--data", "digits", "--ids", tmp_path / "empty.txt",
                     "--out", tmp_path / "f", *FEAT], "holds no ids", run)
    refused(capsys, ["featurize", "--checkpoint", run / "ckpt", "--groups", "attn=no_such_module", "--out",
                     tmp_path / "f", *FEAT], "matches no trainable parameter", run)
    refused(capsys, ["featurize", "--checkpoint", run / "ckpt", "--n", 5, "--out", tmp_path / "f", *FEAT],
            "pass --data too", run)
    refused(capsys, ["sample", "--checkpoint", run / "ckpt", "--guidance", "nan", "--out", tmp_path / "s"],
            "--guidance must be a finite number", run)
    assert not (tmp_path / "f").exists() and not (tmp_path / "s").exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_store(run, tmp_path, capsys):
    first = FeatureStore.create(tmp_path / "f", FeatureStore.open(run / "queries").settings,
                                np.arange(16))  # a writer that has not finished
    refused(capsys, ["featurize", "--checkpoint", run / "ckpt", "--data", "digits", "--n", 16, "--out",
                     tmp_path / "f", *FEAT], "another process is writing", run)
    first.release()
    ok("featurize", "--checkpoint", run / "ckpt", "--data", "digits", "--n", 16, "--out", tmp_path / "f", *FEAT,
       "--overwrite")
    assert (tmp_path / "f" / "features.npy").read_bytes() == (run / "queries" / "features.npy").read_bytes()


def test_full_disk_is_one_line_and_the_store_resumes_once_space_is_freed(run, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "size=64k", "the full-disk drill needs one") as mnt:
        argv = ["featurize", "--checkpoint", run / "ckpt", "--data", "digits", "--n", 300, "--out", mnt / "f",
                *FEAT]
        refused(capsys, argv, "no space left on the device", run)
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        ok(*argv)
        ok("featurize", "--checkpoint", run / "ckpt", "--data", "digits", "--n", 300, "--out", tmp_path / "ref",
           *FEAT)
        assert (mnt / "f" / "features.npy").read_bytes() == (tmp_path / "ref" / "features.npy").read_bytes()
        assert json.loads((mnt / "f" / "manifest.json").read_text())["status"] == "complete"


def test_attribute_on_a_full_disk_keeps_the_previous_attributions_whole(run, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "size=1m", "the full-disk drill needs one") as mnt:
        base = ["attribute", "--train", run / "train", "--queries", run / "queries", "--out", mnt / "a"]
        ok(*base, "--top-k", 3)
        before = digest(mnt / "a")
        free = subprocess.run(["df", "--output=avail", "-B1", str(mnt)], capture_output=True, text=True)
        filler = max(0, int(free.stdout.split()[-1]) - 8192)
        (mnt / "filler").write_bytes(b"\0" * filler)  # leave about 8 KB: less than the new set needs
        refused(capsys, [*base, "--top-k", 10], "no space left on the device", run)
        assert digest(mnt / "a") == before  # the previous set, whole; no staging folder left behind
        assert sorted(p.name for p in (mnt / "a").iterdir()) == sorted(before)


def test_train_never_replaces_another_checkpoint_without_overwrite(run, tmp_path, capsys):
    shutil.copytree(run / "ckpt", tmp_path / "ckpt")
    args = ["train", "--data", "digits", "--n", 12, "--batch-size", 4, "--out", tmp_path / "ckpt"]
    ok(*args, "--steps", 2)  # the same settings: the checkpoint is reused as it is
    assert digest(tmp_path / "ckpt") == digest(run / "ckpt")
    refused(capsys, [*args, "--steps", 3], "pass --overwrite", tmp_path)
    ok(*args, "--steps", 3, "--overwrite")
    assert digest(tmp_path / "ckpt") != digest(run / "ckpt")


@pytest.mark.parametrize("stage", ["train", "featurize", "attribute", "learn-weights"])
def test_out_on_a_read_only_mount_is_one_line(run, tmp_path, capsys, stage):
    with tmpfs(tmp_path / "ro", "size=1m,ro", "the read-only drill needs one") as mnt:
        argv = {"train": ["train", "--data", "digits", "--n", 8, "--steps", 1, "--out", mnt / "x"],
                "featurize": ["featurize", "--checkpoint", run / "ckpt", "--out", mnt / "x", *FEAT],
                "attribute": ["attribute", "--train", run / "train", "--queries", run / "queries", "--out", mnt / "x"],
                "learn-weights": ["learn-weights", "--train", run / "train", "--queries", run / "queries", "--steps",
                                  2, "--out", mnt / "w.json"]}[stage]
        refused(capsys, argv, "Read-only file system", run)


def test_a_directory_where_a_file_goes_is_one_line(run, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    refused(capsys, ["attribute", "--train", run / "train", "--queries", run / "queries", "--weights", tmp_path / "dir",
                     "--out", tmp_path / "a"], "is a directory", run)
    refused(capsys, ["learn-weights", "--train", run / "train", "--queries", run / "queries", "--steps", 2, "--out",
                     tmp_path / "dir"], f"{tmp_path / 'dir'} is a directory", run)
    assert list((tmp_path / "dir").iterdir()) == [] and not (tmp_path / "a").exists()


@pytest.mark.parametrize("what", ["training state", "checkpoint"])
def test_train_on_a_full_disk_is_one_line_and_resumes_once_space_is_freed(run, tmp_path, capsys, monkeypatch, what):
    """A training state saved after every step (about 2.2 MB: the second does not fit in 3 MB), or none and a
    checkpoint (720 KB) that does not fit in 512 KB: one line; then, with space, the same bytes."""
    monkeypatch.setenv("GRADTRACE_TRAIN_STATE_EVERY", "1" if what == "training state" else "100")
    args = ["train", "--data", "digits", "--n", 12, "--steps", 3, "--batch-size", 4, "--out"]
    ok(*args, tmp_path / "ref")
    with tmpfs(tmp_path / "small", "size=3m" if what == "training state" else "size=512k", "the drill needs one") \
            as mnt:
        refused(capsys, [*args, mnt / "ck"], "no space left on the device", run)
        if what == "training state":  # the first state is kept, whole; the next run continues from it
            assert torch.load(mnt / "ck" / STATE_FILE, weights_only=True)["step"] == 1
        assert sorted(p.name for p in (mnt / "ck").iterdir()) == ([STATE_FILE] if what == "training state" else [])
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        ok(*args, mnt / "ck")
        assert digest(mnt / "ck").keys() == {"config.json", "model.safetensors"}
        assert (mnt / "ck" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()


def test_build_pipeline_on_a_full_disk_is_one_line(run, tmp_path, capsys):
    """diffusers' save_pretrained writes the weights with safetensors, whose full-disk error is not an OSError."""
    with tmpfs(tmp_path / "small", "size=256k", "the full-disk drill needs one") as mnt:
        refused(capsys, ["build-pipeline", "--n", 8, "--vae-steps", 1, "--unet-steps", 1, "--batch-size", 4, "--out",
                         mnt / "p"], "no space left on the device", run)
        assert not (mnt / "p" / "gradtrace_build.json").exists()  # unfinished: not a pipeline gradtrace reuses


def test_five_ddim_steps_at_eta_one_give_finite_images(run, tmp_path, capsys):
    """The probe's `sample --num 4 --sample-steps 5` (DDIM, η = 1) wrote NaN in every pixel."""
    ok("sample", "--checkpoint", run / "ckpt", "--num", 4, "--sample-steps", 5, "--out", tmp_path / "s")
    images = np.load(tmp_path / "s" / "images.npy")
    assert images.shape == (4, 1, 8, 8) and np.isfinite(images).all() and images.std() > 0


def test_overlapping_shards_with_the_same_bytes_merge_and_say_so(run, tmp_path, capsys):
    """A complete store plus a partial copy of it: the shared chunks are taken once, and the line says how many."""
    shard = tmp_path / "shard"
    shutil.copytree(run / "train", shard)
    manifest = json.loads((shard / "manifest.json").read_text())
    (shard / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    capsys.readouterr()
    ok("merge-features", "--shard", run / "train", "--shard", shard, "--out", tmp_path / "m")
    line = capsys.readouterr().out.strip()
    assert "3 chunk(s) were in more than one shard" in line, line
    assert (tmp_path / "m" / "features.npy").read_bytes() == (run / "train" / "features.npy").read_bytes()


def test_mixed_numerics_are_allowed_when_asked_and_recorded(run, tmp_path, capsys):
    """A store whose recorded chunks say two threads, resumed under one: refused, then allowed and recorded."""
    store = tmp_path / "s"
    shutil.copytree(run / "train", store)
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    progress = json.loads((store / "progress.json").read_text())
    for record in progress["numerics"].values():
        record["threads"] = 2
    del progress["chunks"]["2"], progress["chunk_numerics"]["2"]
    (store / "progress.json").write_text(json.dumps(progress))
    args = ["featurize", "--checkpoint", run / "ckpt", "--out", store, *FEAT]
    refused(capsys, args, "threads 2 vs 1", run)
    ok(*args, "--allow-mixed-numerics")
    done = json.loads((store / "manifest.json").read_text())
    assert done["status"] == "complete" and done["mixed_numerics_allowed"] is True
    assert sorted(n["threads"] for n in done["numerics"]) == [1, 2]
