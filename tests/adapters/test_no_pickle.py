"""Model folders are never unpickled and never run their own code: weights load from safetensors (or torch.load with
weights_only=True), through diffusers, transformers and peft too, and no loader passes trust_remote_code. A source
scan checks every loading call; a behavioural test puts a pickle whose unpickling would create a marker file into
each kind of model folder (a diffusers pipeline, a text-to-image pipeline, a transformers LM, a gradtrace training
folder) and checks the marker never appears, while the same payload does create it when unpickled plainly."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch

import gradtrace
from fixtures.lms import write_jsonl, write_tiny_lm
from fixtures.pipelines import tiny_ddpm, tiny_pipeline
from gradtrace.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(gradtrace.__file__).parent
NOT_WEIGHTS = ("Scheduler", "Tokenizer", "PeftConfig")  # configs and vocabularies: JSON, no pickle


class Payload:
    """Unpickling this opens `marker` for writing, i.e. creates it: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def calls():
    for file in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Call):
                yield file, node


def keywords(node: ast.Call) -> dict:
    return {k.arg: k.value.value for k in node.keywords if isinstance(k.value, ast.Constant)}


def test_the_source_loads_no_pickle_and_no_remote_code():
    seen = {"torch.load": 0, "from_pretrained": 0}
    for file, node in calls():
        func = node.func
        name = ast.unparse(func)
        where = f"{file.relative_to(SRC)}:{node.lineno}"
        assert not any(k.arg == "trust_remote_code" for k in node.keywords), where
        if name == "torch.load":
            seen["torch.load"] += 1
            assert keywords(node).get("weights_only") is True, f"{where}: torch.load without weights_only=True"
        if name in ("np.load", "numpy.load"):
            assert keywords(node).get("allow_pickle") is not True, where
        if isinstance(func, ast.Attribute) and func.attr == "from_pretrained":
            seen["from_pretrained"] += 1
            owner = ast.unparse(func.value)
            if owner == "PeftModel":  # peft has no use_safetensors: the caller checks the safetensors file first
                source = file.read_text()
                assert "adapter_model.safetensors" in source, f"{where}: PeftModel loaded without the check"
            elif not owner.endswith(NOT_WEIGHTS):
                assert keywords(node).get("use_safetensors") is True, f"{where}: {owner} may fall back to a pickle"
    for file in SRC.rglob("*.py"):
        text = file.read_text()
        assert "trust_remote_code" not in text and "import pickle" not in text, file
    assert seen["torch.load"] >= 1 and seen["from_pretrained"] >= 6  # the scan saw the loaders it guards


def _pickle_in(file: Path, marker: Path) -> None:
    torch.save({"weight": Payload(marker)}, file)


def _refused(capsys, argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv] + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_the_payload_is_live(tmp_path):
    """The test below can fail: unpickled plainly, the payload creates its marker."""
    _pickle_in(tmp_path / "w.bin", tmp_path / "marker")
    torch.load(tmp_path / "w.bin", weights_only=False)
    assert (tmp_path / "marker").exists()


def test_pickled_weights_in_any_model_folder_are_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "marker"
    ddpm = tiny_ddpm(tmp_path / "ddpm")
    (ddpm / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _pickle_in(ddpm / "unet" / "diffusion_pytorch_model.bin", marker)
    assert "never loaded" in _refused(capsys, ["featurize", "--checkpoint", ddpm, "--data", "digits", "--n", 4,
                                               "--out", tmp_path / "f"])
    assert "never loaded" in _refused(capsys, ["sample", "--checkpoint", ddpm, "--num", 1, "--out", tmp_path / "s"])

    t2i = tiny_pipeline(tmp_path / "t2i")
    for part, weights, pickled in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                                   ("text_encoder", "model", "pytorch_model.bin")):
        broken = tmp_path / f"t2i-{part}"
        shutil.copytree(t2i, broken)
        (broken / part / f"{weights}.safetensors").unlink()
        _pickle_in(broken / part / pickled, marker)
        assert "never loaded" in _refused(capsys, ["train", "--base", broken, "--lora-rank", 2, "--data", "shapes",
                                                   "--n", 4, "--steps", 1, "--out", tmp_path / f"lora-{part}"])

    lm = write_tiny_lm(tmp_path / "lm")
    (lm / "model.safetensors").unlink()
    _pickle_in(lm / "pytorch_model.bin", marker)
    docs = write_jsonl(tmp_path / "docs.jsonl", ["a first text", "a second one"])
    assert "model.safetensors" in _refused(capsys, ["featurize", "--checkpoint", lm, "--data", f"jsonl:{docs}",
                                                    "--out", tmp_path / "lm-f"])
    assert not marker.exists()


def test_a_pickled_training_state_is_never_unpickled(tmp_path):
    """`train` resumes from OUT/.train-state.pt with torch.load(weights_only=True): a planted payload is refused by
    the restricted unpickler (training starts over) and never runs."""
    out = tmp_path / "ck"
    out.mkdir()
    _pickle_in(out / ".train-state.pt", tmp_path / "marker")
    _pickle_in(out / "optimizer.pt", tmp_path / "marker")  # a stray pickle beside the weights: never read
    assert main(["train", "--data", "digits", "--n", "8", "--steps", "2", "--batch-size", "4", "--out", str(out),
                 "--no-progress"]) == 0
    assert main(["featurize", "--checkpoint", str(out), "--out", str(tmp_path / "f"), "--dim", "32", "--timesteps",
                 "1", "--no-progress"]) == 0
    assert not (tmp_path / "marker").exists()
