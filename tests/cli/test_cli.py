"""The CLI end to end on tiny settings: outputs against an independent closed form, bad input → exit 2."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FEAT  # noqa: E402
from gradtrace.adapters import get_adapter
from gradtrace.adapters.diffusion import sample
from gradtrace.cli import main
from gradtrace.data.sources import save_samples
from gradtrace.errors import UserError
from gradtrace.pipeline import DemoSpec, run_demo


def test_attributions_match_closed_form_trak(pipeline):
    """The default kernel is per-group: K = blockdiag_j (Φ_jᵀΦ_j + λ_j I)⁻¹, λ_j = c · mean diag(Φ_jᵀΦ_j)."""
    doc = json.loads((pipeline / "attr" / "attributions.json").read_text())
    assert doc["manifest"]["method"]["kernel"] == "per-group"
    phi = np.load(pipeline / "ft" / "features.npy").astype(np.float64)
    q = np.load(pipeline / "fq" / "features.npy").astype(np.float64)
    train_ids = np.load(pipeline / "ft" / "ids.npy")
    groups = json.loads((pipeline / "ft" / "manifest.json").read_text())["settings"]["groups"]
    scores = np.zeros((len(q), len(phi)))
    for g in groups:
        p_j, q_j = phi[:, g["start"]:g["stop"]], q[:, g["start"]:g["stop"]]
        gram = p_j.T @ p_j
        lam = 0.1 * np.mean(np.diag(gram))
        scores += q_j @ np.linalg.solve(gram + lam * np.eye(len(gram)), p_j.T)
    assert len(doc["queries"]) == 3 and len(train_ids) == 48
    for r, entry in enumerate(doc["queries"]):
        order = np.argsort(-scores[r], kind="stable")[:5]
        assert [t["train_id"] for t in entry["top"]] == train_ids[order].tolist()
        got = np.array([t["score"] for t in entry["top"]])
        np.testing.assert_allclose(got, scores[r, order], rtol=1e-4, atol=1e-6 * np.abs(scores).max())
        for t in entry["top"]:  # the per-group breakdown sums to the score
            assert sum(t["contributions"].values()) == pytest.approx(t["score"], rel=1e-4, abs=1e-7)
    assert (pipeline / "attr" / "report.png").stat().st_size > 0
    assert doc["manifest"]["model_fingerprint"] == json.loads(
        (pipeline / "ft" / "manifest.json").read_text())["settings"]["model_fingerprint"]


def test_train_is_cached_and_deterministic(pipeline, tmp_path):
    before = (pipeline / "run" / "model.safetensors").read_bytes()
    args = ["train", "--data", "digits", "--n", "48", "--steps", "15", "--batch-size", "16", "--no-progress"]
    assert main([*args, "--out", str(pipeline / "run")]) == 0  # same settings: reused, untouched
    assert (pipeline / "run" / "model.safetensors").read_bytes() == before
    assert main([*args, "--out", str(tmp_path / "again")]) == 0  # same seed elsewhere: same bits
    a = load_file(tmp_path / "again" / "model.safetensors")
    b = load_file(pipeline / "run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_line_error(capsys, argv, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err
    return err


def test_bad_inputs_exit_2_with_one_line(pipeline, tmp_path, capsys):
    run, ft = str(pipeline / "run"), str(pipeline / "ft")
    _one_line_error(capsys, ["attribute", "--train", str(tmp_path / "nope"), "--queries", ft,
                             "--out", str(tmp_path / "a")], "manifest.json missing")
    _one_line_error(capsys, ["train", "--data", "mnist", "--out", str(tmp_path / "r")], "unknown dataset")
    _one_line_error(capsys, ["featurize", "--checkpoint", run, "--groups", "layers",
                             "--out", str(tmp_path / "f")], "unknown group preset")
    _one_line_error(capsys, ["featurize", "--checkpoint", run, "--data", "shapes", "--n", "8",
                             "--out", str(tmp_path / "f")], "images have shape (3, 16, 16)")
    _one_line_error(capsys, ["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "s")],
                    "missing")
    # a query store featurized with another measurement is refused against the training store
    assert main(["featurize", "--checkpoint", run, "--samples", str(pipeline / "queries"), "--measurement",
                 "dtrak", "--out", str(tmp_path / "fq_dtrak"), *FEAT]) == 0
    _one_line_error(capsys, ["attribute", "--train", ft, "--queries", str(tmp_path / "fq_dtrak"),
                             "--out", str(tmp_path / "a")], "'measurement' differs")
    # re-featurizing into an existing store with other settings is refused, and the store is untouched
    before = (pipeline / "ft" / "features.npy").read_bytes()
    _one_line_error(capsys, ["featurize", "--checkpoint", run, "--out", ft, "--dim", "64", "--timesteps", "2"],
                    "other settings")
    assert (pipeline / "ft" / "features.npy").read_bytes() == before
    # NaN in the inputs → NaN gradients → refused, naming the example
    images = torch.zeros(2, 1, 8, 8)
    save_samples(tmp_path / "bad", images, None, {"checkpoint": run})
    images[1, 0, 3, 3] = float("nan")  # written by hand: save_samples itself refuses NaN
    np.save(tmp_path / "bad" / "images.npy", images.numpy())
    _one_line_error(capsys, ["featurize", "--checkpoint", run, "--samples", str(tmp_path / "bad"),
                             "--out", str(tmp_path / "fbad"), *FEAT], "NaN/Inf for example id 1")
    _one_line_error(capsys, ["attribute", "--train", ft, "--queries", str(pipeline / "fq"), "--top-k", "0",
                             "--out", str(tmp_path / "a")], "--top-k")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError):
        main(["train", "--data", "mnist", "--out", str(tmp_path / "r"), "--debug"])


def test_demo_quick_path_writes_both_files(tmp_path):
    tiny = {"n_train": 40, "steps": 10, "n_queries": 2, "sample_steps": 3, "dim": 64, "timesteps": 2, "top_k": 3}
    summary = run_demo(DemoSpec(out=str(tmp_path / "demo"), quick=True), progress=False, settings=tiny)
    doc = json.loads((tmp_path / "demo" / "attributions.json").read_text())
    assert len(doc["queries"]) == 2 and all(len(q["top"]) == 3 for q in doc["queries"])
    assert (tmp_path / "demo" / "report.png").stat().st_size > 1000
    assert summary["train_examples"] == 40


def test_sample_eta_is_used_and_recorded(pipeline, tmp_path, capsys):
    run = str(pipeline / "run")
    for eta in (0.0, 1.0):
        out = tmp_path / f"s{eta}"
        assert main(["sample", "--checkpoint", run, "--num", "2", "--sample-steps", "3", "--eta", str(eta),
                     "--seed", "5", "--out", str(out), "--no-progress"]) == 0
        assert json.loads((out / "manifest.json").read_text())["eta"] == eta
        ckpt = get_adapter("diffusion-unet").load(run)
        ref, _ = sample(ckpt.model, ckpt.extras["scheduler"], 2, steps=3, seed=5, eta=eta, progress=False)
        np.testing.assert_array_equal(np.load(out / "images.npy"), ref.numpy())
    assert not np.array_equal(np.load(tmp_path / "s0.0" / "images.npy"), np.load(tmp_path / "s1.0" / "images.npy"))
    _one_line_error(capsys, ["sample", "--checkpoint", run, "--eta", "2", "--out", str(tmp_path / "bad")],
                    "eta must be in [0, 1]")
    assert not (tmp_path / "bad").exists()


def test_text_to_image_demo_quick_path_writes_both_files(tmp_path):
    tiny = {"vae_steps": 3, "unet_steps": 3, "n_train": 12, "lora_steps": 3, "sample_steps": 2, "dim": 64,
            "timesteps": 1, "top_k": 3}
    summary = run_demo(DemoSpec(out=str(tmp_path / "t2i"), quick=True, text_to_image=True), progress=False,
                       settings=tiny)
    doc = json.loads((tmp_path / "t2i" / "attributions.json").read_text())
    assert len(doc["queries"]) == 4 and all(len(q["top"]) == 3 for q in doc["queries"])
    assert all(".lora_" in g for g in doc["groups"])  # features over the LoRA factors only
    manifest = json.loads((tmp_path / "t2i" / "queries" / "manifest.json").read_text())
    assert manifest["prompts"] == summary["prompts"]
    assert (tmp_path / "t2i" / "report.png").stat().st_size > 1000 and summary["train_examples"] == 12
