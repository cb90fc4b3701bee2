"""The bad-input catalogue: wrong values, wrong or damaged artefacts and paths, for every subcommand and every
kind of artefact (checkpoint, feature store, weights file, retraining folder, samples folder, data folder,
pipeline, LoRA folder). Each case must end with exit code 2, exactly one line on stderr naming the problem, no
traceback or usage block, and every file under the artefacts' root byte-for-byte unchanged (no artefact
altered, no output written).

A case is `subcommand args`, with {name} standing for a path of the module's artefacts (see `ARTEFACTS`) or
{new} for a path that does not exist yet; the text the one line must contain; and optional environment."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures.bad_input_cases import CASES, FEAT
from fixtures.pipelines import tiny_pipeline
from fixtures.probe import probe_cases
from fixtures.reliability import ok, refused, tmpfs
from gradtrace.cli import COMMANDS, EVAL_COMMANDS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Every kind of artefact, whole and damaged, under one root (built once)."""
    root = tmp_path_factory.mktemp("artefacts")
    p = {name: root / name for name in ("ckpt", "samples", "train", "queries", "learn", "weights", "retrain",
                                        "other", "pipe", "lora")}
    ok("train", "--data", "digits", "--n", 12, "--steps", 2, "--batch-size", 4, "--out", p["ckpt"])
    ok("sample", "--checkpoint", p["ckpt"], "--num", 3, "--sample-steps", 2, "--out", p["samples"])
    feat = FEAT.split()
    ok("featurize", "--checkpoint", p["ckpt"], "--out", p["train"], *feat)
    ok("featurize", "--checkpoint", p["ckpt"], "--data", "digits", "--n", 16, "--out", p["queries"], *feat)
    ok("featurize", "--checkpoint", p["ckpt"], "--samples", p["samples"], "--out", p["learn"], *feat)
    ok("learn-weights", "--train", p["train"], "--queries", p["learn"], "--steps", 2, "--lambda-c", 0.01,
       "--out", root / "weights.json")
    ok("learn-weights", "--train", p["train"], "--generate", 2, "--sample-steps", 2, "--steps", 2, "--lambda-c", 0.01,
       "--out", root / "generated.json")  # a generated learning-query set (general: this model is unconditional)
    learn_set = Path(json.loads((root / "generated.json").read_text())["provenance"]["learning_queries"]["store"])
    ok("retrain", "--run", p["ckpt"], "--subsets", 2, "--out", p["retrain"])
    ok("train", "--data", "digits", "--n", 12, "--steps", 1, "--batch-size", 4, "--seed", 1, "--out", p["other"])
    ok("featurize", "--checkpoint", p["other"], "--data", "digits", "--n", 16, "--out", root / "other_queries",
       *feat)
    tiny_pipeline(p["pipe"])
    ok("train", "--base", p["pipe"], "--lora-rank", 2, "--data", "shapes", "--n", 4, "--steps", 1, "--batch-size",
       2, "--out", p["lora"])
    ok("attribute", "--train", p["train"], "--queries", p["queries"], "--top-k", 3, "--out", root / "attr")
    paths = {k: v for k, v in p.items() if k != "weights"} | {"weights": root / "weights.json",
                                                               "other_queries": root / "other_queries",
                                                               "attr": root / "attr", "learn_set": learn_set}
    damaged(root, paths)
    return root, paths


def damaged(root, p) -> None:
    """The broken variants the cases name."""
    def copy(src, name):
        shutil.copytree(src, root / name)
        p[name] = root / name
        return root / name

    def write(name, text):
        p[name] = root / name
        p[name].write_text(text)

    write("a_file", "mine\n")
    write("empty_ids", "")
    write("far_ids", "5000\n5001\n")
    write("dup_ids", "1\n1\n")
    for name in ("empty_dir", "bad_metadata", "foreign_dir"):
        (root / name).mkdir()
        p[name] = root / name
    (root / "bad_metadata" / "metadata.jsonl").write_text("{not json\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "bad_metadata" / "a.png")
    (root / "foreign_dir" / "notes.txt").write_text("someone else's\n")
    copy(p["ckpt"], "ckpt_garbage").joinpath("model.safetensors").write_bytes(b"\0garbage" * 64)
    copy(p["ckpt"], "ckpt_no_weights").joinpath("model.safetensors").unlink()
    shutil.copy(p["other"] / "model.safetensors", copy(p["ckpt"], "ckpt_swapped") / "model.safetensors")
    copy(p["ckpt"], "ckpt_bad_json").joinpath("config.json").write_text("{\"format\": ")
    copy(p["ckpt"], "ckpt_list_json").joinpath("config.json").write_text("[]")
    copy(p["ckpt"], "ckpt_unfinished").joinpath("config.json").unlink()
    copy(p["samples"], "samples_garbage").joinpath("images.npy").write_bytes(b"garbage")
    np.save(copy(p["samples"], "samples_short") / "ids.npy", np.arange(2))
    manifest = json.loads((copy(p["train"], "train_unfinished") / "manifest.json").read_text())
    (root / "train_unfinished" / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    feats = np.load(p["queries"] / "features.npy")
    feats[3, 5] = np.nan
    np.save(copy(p["queries"], "queries_nan") / "features.npy", feats)
    copy(p["queries"], "queries_no_ids").joinpath("ids.npy").unlink()
    copy(p["queries"], "queries_bad_manifest").joinpath("manifest.json").write_text("{\"settings\": {")
    doc = json.loads(p["weights"].read_text())
    write("weights_text", "weights: all equal\n")
    write("weights_list", "[0.5, 0.5]")
    groups = dict(doc["weights"])
    renamed = {("renamed-" + k if i == 0 else k): v for i, (k, v) in enumerate(groups.items())}
    write("weights_groups", json.dumps({"weights": renamed}))
    write("weights_negative", json.dumps({"weights": {k: -1.0 for k in groups}}))
    write("weights_text_values", json.dumps({"weights": {k: "high" for k in groups}}))
    copy(p["retrain"], "retrain_unfinished")
    shutil.rmtree(root / "retrain_unfinished" / "models" / "s0001-r0")
    np.save(copy(p["retrain"], "retrain_tampered") / "subsets.npy",
            np.load(p["retrain"] / "subsets.npy")[:, ::-1].copy())
    write("text_ids", "one\ntwo\n")
    write("dict_ids", json.dumps({"ids": [1, 2]}))
    p["dict_ids"] = p["dict_ids"].rename(root / "dict_ids.json")
    write("neg_ids", "-1\n2\n")
    (root / "corrupt_image_dir").mkdir()
    p["corrupt_image_dir"] = root / "corrupt_image_dir"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "corrupt_image_dir" / "a.png")
    (root / "corrupt_image_dir" / "b.png").write_bytes((root / "corrupt_image_dir" / "a.png").read_bytes()[:30])
    cfg = json.loads((copy(p["ckpt"], "ckpt_bad_model_config") / "config.json").read_text())
    (root / "ckpt_bad_model_config" / "config.json").write_text(json.dumps({**cfg, "model_config": {"kind": "x"}}))
    write("weights_nan", json.dumps({"weights": {k: float("nan") for k in groups}}))
    write("weights_empty", json.dumps({"weights": {}}))
    copy(p["queries"], "queries_ids_garbage").joinpath("ids.npy").write_bytes(b"garbage")
    man = json.loads((copy(p["samples"], "samples_prompts") / "manifest.json").read_text())
    (root / "samples_prompts" / "manifest.json").write_text(json.dumps({**man, "prompts": ["a", "b"]}))
    write("lora_garbage", "not safetensors")
    p["lora_garbage"] = p["lora_garbage"].rename(root / "lora_garbage.safetensors")
    probe_cases(root, p, copy, write, doc)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_and_nothing_changes(art, capsys, monkeypatch, case):
    root, paths = art
    _, command, words, *env = case
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value)
    argv = [arg.format(new=root / "never-made", **paths) for arg in shlex.split(command)]
    refused(capsys, argv, words, root)
    assert not (root / "never-made").exists()


READ_ONLY = {
    "sample": "sample --checkpoint {ckpt} --num 1 --sample-steps 1 --out {ro}/s",
    "retrain": "retrain --run {ckpt} --subsets 2 --out {ro}/r",
    "eval lds": "eval lds --run {ckpt} --retrain {retrain} --train-features {train} --queries {queries} --out {ro}/l",
    "eval counterfactual": "eval counterfactual --run {ckpt} --train-features {train} --queries {queries} "
                           "--top-k 2 --num-queries 1 --out {ro}/c",
    "build-pipeline": "build-pipeline --n 8 --vae-steps 1 --unet-steps 1 --out {ro}/p",
    "import-lora": "import-lora --base {pipe} --lora {lora} --out {ro}/i",
    "demo": "demo --quick --out {ro}/d",
}


@pytest.mark.parametrize("stage", READ_ONLY)
def test_out_on_a_read_only_mount(art, capsys, tmp_path, stage):
    root, paths = art
    with tmpfs(tmp_path / "ro", "size=1m,ro", "the read-only cases need one") as mnt:
        argv = [arg.format(ro=mnt, **paths) for arg in shlex.split(READ_ONLY[stage])]
        refused(capsys, argv, "Read-only file system", root)


def test_the_catalogue_covers_every_subcommand():
    tried = {c[1].split()[0] if c[1].split()[0] != "eval" else " ".join(c[1].split()[:2]) for c in CASES}
    assert tried >= set(COMMANDS) | {f"eval {name}" for name in EVAL_COMMANDS}
    assert len(CASES) >= 60
