"""A user's diffusers text-to-image pipeline (written by diffusers itself) with LoRA, through the CLI: features
against a plain autograd loop over the LoRA parameters, prompts, the latent cache, and one-line refusals."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.pipelines import tiny_pipeline
from gradtrace.adapters import adapter_of, get_adapter
from gradtrace.adapters.diffusers.latents import encode_latents, fit_resolution
from gradtrace.cli import main
from gradtrace.data import load_dataset
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")
FEAT = ["--projection", "identity", "--timesteps", "2", "--chunk", "5", "--no-progress"]
PROMPT = "a striped circle on a plain background"


def run(*argv):
    assert main([*map(str, argv), "--no-progress"] if "--no-progress" not in argv else list(map(str, argv))) == 0


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tiny_pipeline(root / "pipe")
    run("train", "--base", root / "pipe", "--lora-rank", 2, "--data", "shapes", "--n", 12, "--steps", 4,
        "--batch-size", 4, "--out", root / "ft")
    run("featurize", "--checkpoint", root / "ft", "--out", root / "feat" / "train", *FEAT)
    run("sample", "--checkpoint", root / "ft", "--prompt", PROMPT, "--num", 2, "--sample-steps", 2,
        "--out", root / "samples")
    run("featurize", "--checkpoint", root / "ft", "--samples", root / "samples", "--out", root / "feat" / "q", *FEAT)
    return root


def autograd_features(ckpt, latents, ids, texts, store) -> np.ndarray:
    """Each example's gradient of its loss over the LoRA parameters by a plain loop (no torch.func)."""
    adapter = get_adapter("diffusers")
    model, parts = ckpt.model, ckpt.model.components
    objective = adapter.objective(ckpt, "loss", 2, 0)
    m = objective.measurement
    names = [p for g in store.settings["groups"] for p in g["params"]]
    params = dict(model.named_parameters())
    ids_tok = parts.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    states = model.encode_text(ids_tok)
    rows = []
    for i in range(len(ids)):
        noise = m.noise([int(ids[i])], tuple(latents.shape[1:]))
        xt, t = m.noisy_inputs(latents[i:i + 1], noise, objective.alphas_cumprod)
        model.zero_grad()
        loss = m.reduce(model(xt[0], t, states[i:i + 1].expand(len(t), -1, -1)), noise[0])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


def test_lora_features_equal_a_plain_autograd_loop(sd):
    store = FeatureStore.open(sd / "feat" / "train")
    ckpt = get_adapter("diffusers").load(sd / "ft")
    names = [p for g in store.settings["groups"] for p in g["params"]]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)  # LoRA parameters only
    assert {g["name"] for g in store.settings["groups"]} >= {"down_blocks.1.self_attn.q.lora_A",
                                                               "mid_block.cross_attn.v.lora_B"}
    ds = load_dataset("shapes", n=12)
    parts = ckpt.model.components
    latents = encode_latents(parts.vae, parts.vae_fingerprint, ds.images, 16)
    texts = [m["text"] for m in ds.metadata]
    want = autograd_features(ckpt, latents, ds.ids, texts, store)
    np.testing.assert_allclose(np.asarray(store.features), want, rtol=2e-4, atol=1e-6)


def test_samples_keep_their_prompt_and_are_featurized_with_it(sd):
    manifest = json.loads((sd / "samples" / "manifest.json").read_text())
    assert manifest["prompts"] == [PROMPT, PROMPT]
    store = FeatureStore.open(sd / "feat" / "q")
    parts = get_adapter("diffusers").load(sd / "ft").model.components
    want = parts.tokenizer([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    np.testing.assert_array_equal(store.cond, want.numpy())


def test_a_pipeline_written_by_diffusers_attributes_with_tracin_closed_form(sd, tmp_path):
    assert adapter_of(sd / "pipe").name == "diffusers"
    run("featurize", "--checkpoint", sd / "pipe", "--data", "shapes", "--n", 6, "--out", tmp_path / "t",
        "--projection", "rademacher", "--dim", 64, "--timesteps", 1)
    run("featurize", "--checkpoint", sd / "pipe", "--samples", sd / "samples", "--out", tmp_path / "q",
        "--projection", "rademacher", "--dim", 64, "--timesteps", 1)
    run("attribute", "--train", tmp_path / "t", "--queries", tmp_path / "q", "--method", "tracin", "--top-k", 3,
        "--out", tmp_path / "a")
    train, q = FeatureStore.open(tmp_path / "t"), FeatureStore.open(tmp_path / "q")
    assert not any("lora" in g for g in train.group_names)  # no LoRA: the whole UNet
    scores = np.asarray(q.features, np.float64) @ np.asarray(train.features, np.float64).T
    doc = json.loads((tmp_path / "a" / "attributions.json").read_text())
    for row, s in zip(doc["queries"], scores):
        assert [t["train_id"] for t in row["top"]] == np.argsort(-s, kind="stable")[:3].tolist()
        assert [t["score"] for t in row["top"]] == pytest.approx(np.sort(s)[::-1][:3].tolist(), rel=1e-4)


def test_lora_fine_tune_is_deterministic_and_refused_on_another_base(sd, tmp_path):
    args = ["train", "--base", sd / "pipe", "--lora-rank", 2, "--data", "shapes", "--n", 12, "--steps", 4,
            "--batch-size", 4, "--out"]
    run(*args, tmp_path / "again")
    a, b = load_file(sd / "ft" / "pytorch_lora_weights.safetensors"), load_file(
        tmp_path / "again" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other"
    shutil.copytree(sd / "pipe", other)
    run("train", "--base", other, "--lora-rank", 2, "--data", "shapes", "--n", 12, "--steps", 1,
        "--batch-size", 4, "--out", tmp_path / "on-other")
    weights = next((other / "unet").glob("*.safetensors"))
    state = load_file(weights)
    key = next(iter(state))
    state[key] = state[key] + 1.0
    save_file(state, weights)
    assert main(["featurize", "--checkpoint", str(tmp_path / "on-other"), "--out", str(tmp_path / "f"),
                 "--no-progress"]) == 2
    wrong_rank = tmp_path / "rank"
    shutil.copytree(tmp_path / "again", wrong_rank)
    lora = {k: torch.cat([v, v], dim=0 if ".lora_A." in k else 1) for k, v in a.items()}
    save_file(lora, wrong_rank / "pytorch_lora_weights.safetensors")
    assert main(["featurize", "--checkpoint", str(wrong_rank), "--out", str(tmp_path / "g"), "--no-progress"]) == 2


def test_latent_cache_is_keyed_by_the_vae(sd, tmp_path):
    parts = get_adapter("diffusers").load(sd / "pipe").model.components
    images = load_dataset("shapes", n=4).images
    first = encode_latents(parts.vae, "a" * 64, images, 16, tmp_path)
    files = list(tmp_path.rglob("*.npy"))
    assert len(files) == 1 and torch.equal(torch.from_numpy(np.load(files[0])), first)
    with torch.no_grad():
        direct = parts.vae.encode(fit_resolution(images, 16)).latent_dist.mean * parts.vae.config.scaling_factor
    torch.testing.assert_close(first, direct)
    changed = get_adapter("diffusers").load(sd / "pipe").model.components.vae
    with torch.no_grad():
        next(changed.parameters()).add_(0.5)
    second = encode_latents(changed, "b" * 64, images, 16, tmp_path)
    assert len(list(tmp_path.rglob("*.npy"))) == 2 and not torch.allclose(first, second)
    assert torch.equal(encode_latents(parts.vae, "a" * 64, images, 16, tmp_path), first)  # read back


@pytest.mark.parametrize("case", ["no-index", "missing-vae", "empty-prompts", "no-captions", "attr-on-text"])
def test_bad_input_is_one_line_and_exit_2(sd, tmp_path, capsys, case):
    if case == "no-index":
        argv = ["featurize", "--checkpoint", str(sd / "pipe" / "unet"), "--out", str(tmp_path / "f")]
    elif case == "missing-vae":
        broken = tmp_path / "broken"
        shutil.copytree(sd / "pipe", broken)
        shutil.rmtree(broken / "vae")
        argv = ["featurize", "--checkpoint", str(broken), "--out", str(tmp_path / "f")]
    elif case == "empty-prompts":
        (tmp_path / "p.txt").write_text("\n \n")
        argv = ["sample", "--checkpoint", str(sd / "ft"), "--prompts", str(tmp_path / "p.txt"), "--out",
                str(tmp_path / "s")]
    elif case == "no-captions":
        argv = ["train", "--base", str(sd / "pipe"), "--lora-rank", "2", "--data", "digits", "--out",
                str(tmp_path / "t")]
    else:
        argv = ["sample", "--checkpoint", str(sd / "ft"), "--attr", "style=dots", "--out", str(tmp_path / "s")]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gradtrace "), err
    words = {"no-index": "model_index.json", "missing-vae": "lacks vae", "empty-prompts": "empty",
             "no-captions": "text", "attr-on-text": "prompt"}[case]
    assert words in err
    assert not any(p.name in ("f", "s", "t") for p in tmp_path.iterdir())


def test_aspect_learning_queries_are_families_of_whole_captions(sd, tmp_path):
    """`--generate N --aspect style`: whole captions, each style value in turn (balanced) with subject and background
    drawn at random; the set's manifest records each prompt's style (its family)."""
    from gradtrace.data.shapes import ATTRIBUTES, STYLE_WORDS

    run("learn-weights", "--train", sd / "feat" / "train", "--generate", 8, "--aspect", "style", "--sample-steps", 2,
        "--steps", 5, "--out", tmp_path / "style.json")
    made = Path(json.loads((tmp_path / "style.json").read_text())["provenance"]["learning_queries"]["set"])
    prompts = json.loads((made / "samples" / "manifest.json").read_text())["prompts"]
    families = json.loads((made / "learning-queries.json").read_text())["families"]
    assert sorted(families) == sorted(ATTRIBUTES["style"] * 2)
    for prompt, style in zip(prompts, families):
        words = prompt.split()
        assert STYLE_WORDS[style] in words and words[-1] == "background", prompt
        assert any(subject in words for subject in ATTRIBUTES["subject"]), prompt
    assert len(set(prompts)) > 4  # the other factors vary within a family
    learn = FeatureStore.open(made / "features")
    parts = get_adapter("diffusers").load(sd / "ft").model.components
    want = parts.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    np.testing.assert_array_equal(learn.cond, want.numpy())
    doc = json.loads((tmp_path / "style.json").read_text())
    assert doc["provenance"]["aspect"] == "style" and sum(doc["weights"].values()) == pytest.approx(1.0)
    (tmp_path / "mine.txt").write_text("a circle\na bar\n")
    run("learn-weights", "--train", sd / "feat" / "train", "--generate", 3, "--prompts", tmp_path / "mine.txt",
        "--sample-steps", 2, "--steps", 5, "--out", tmp_path / "mine.json")
    mine = Path(json.loads((tmp_path / "mine.json").read_text())["provenance"]["learning_queries"]["set"])
    assert json.loads((mine / "samples" / "manifest.json").read_text())["prompts"] == [
        "a circle", "a bar", "a circle"]


def test_aspect_weights_of_a_text_to_image_model_learn_on_their_families(sd, tmp_path, capsys):
    """The default objective of `--aspect` weights on text-to-image learning queries: the family objective, one
    family per value of the aspect (the recorded value each whole caption was built with), equal to the family
    learner called on those values; a user's prompts that never repeat form no families, and the SNR objective is
    used with one warning line."""
    from gradtrace.attribution import fit_method
    from gradtrace.weights.family import learn_family_weights

    run("learn-weights", "--train", sd / "feat" / "train", "--generate", 8, "--aspect", "style", "--sample-steps", 2,
        "--steps", 5, "--lambda-c", "0.1", "--out", tmp_path / "fam.json")
    doc = json.loads((tmp_path / "fam.json").read_text())
    made = Path(doc["provenance"]["learning_queries"]["set"])
    families = json.loads((made / "learning-queries.json").read_text())["families"]
    assert len(set(families)) == 4 and doc["provenance"]["objective"] == "family"
    train = FeatureStore.open(sd / "feat" / "train")
    fitted = fit_method(train, "trak", kernel="per-group", c=0.1, progress=False)
    want = learn_family_weights(fitted, np.asarray(FeatureStore.open(made / "features").features), families, k=10,
                                steps=5, lr=0.05, l2=0.0, progress=False)
    np.testing.assert_allclose([doc["weights"][n] for n in train.group_names], want.weights, rtol=1e-10)

    (tmp_path / "once.txt").write_text("a dotted shape\na striped shape\n")
    capsys.readouterr()
    assert main(["learn-weights", "--train", str(sd / "feat" / "train"), "--generate", "2", "--aspect", "style",
                 "--prompts", str(tmp_path / "once.txt"), "--sample-steps", "2", "--steps", "5", "--lambda-c", "0.1",
                 "--out", str(tmp_path / "once.json"), "--no-progress"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "not the family objective" in ln]
    assert len(lines) == 1 and "two learning queries sharing a value" in lines[0], lines
    assert json.loads((tmp_path / "once.json").read_text())["provenance"]["objective"] == "snr"


def test_an_aspect_without_builtin_prompts_hints_at_prompts(sd, tmp_path, capsys):
    """`--aspect` that the training data does not have: one line pointing at --prompts, which then works."""
    args = ["learn-weights", "--train", str(sd / "feat" / "train"), "--generate", "2", "--aspect", "mood",
            "--sample-steps", "2", "--steps", "5", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "refused.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown aspect 'mood'" in err[0] and "subject, style, background" in err[0], err
    assert "pass --prompts FILE with --aspect mood" in err[0]
    assert not (tmp_path / "refused.json").exists() and not (tmp_path / "learning-queries").exists()
    (tmp_path / "mood.txt").write_text("a cheerful shape\na gloomy shape\n")
    assert main([*args, "--prompts", str(tmp_path / "mood.txt"), "--out", str(tmp_path / "mood.json")]) == 0
    mood = Path(json.loads((tmp_path / "mood.json").read_text())["provenance"]["learning_queries"]["set"])
    assert json.loads((mood / "samples" / "manifest.json").read_text())["prompts"] == [
        "a cheerful shape", "a gloomy shape"]
    assert json.loads((tmp_path / "mood.json").read_text())["provenance"]["aspect"] == "mood"


def test_a_learning_query_set_is_reused_with_its_aspect(sd, tmp_path, capsys):
    """Generated learning queries are their own artefact: another kernel reuses them (not sampled again), and
    `--queries SET/features` learns with the set's recorded aspect, which `attribute --aspect` then finds."""
    train = sd / "feat" / "train"
    args = ["learn-weights", "--train", train, "--generate", 3, "--aspect", "style", "--sample-steps", 2, "--steps", 5]
    run(*args, "--kernel", "shared", "--out", tmp_path / "a.json")
    made = Path(json.loads((tmp_path / "a.json").read_text())["provenance"]["learning_queries"]["set"])
    files = [made / "samples" / "images.npy", made / "features" / "features.npy"]
    stamps = [f.stat().st_mtime_ns for f in files]
    run(*args, "--kernel", "per-group", "--out", tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["provenance"]["learning_queries"]["set"] == str(made)
    assert [f.stat().st_mtime_ns for f in files] == stamps and len(list(made.parent.iterdir())) == 1
    record = json.loads((made / "learning-queries.json").read_text())
    assert (record["aspect"], record["num"], record["seed"], record["guidance"]) == ("style", 3, 1, 1.0)

    run("learn-weights", "--train", train, "--queries", made / "features", "--kernel", "shared", "--steps", 5)
    saved = train / "weights" / "trak-shared-style.json"  # the default path names the recorded aspect
    assert json.loads(saved.read_text())["provenance"]["aspect"] == "style"
    run("attribute", "--train", train, "--queries", sd / "feat" / "q", "--aspect", "style", "--kernel", "shared",
        "--top-k", 2, "--no-report", "--out", tmp_path / "attr")
    weights = json.loads((tmp_path / "attr" / "attributions.json").read_text())["manifest"]["weights"]
    assert weights["aspect"] == "style" and weights["path"] == str(saved.resolve())
    saved.unlink()  # the module's other tests see the store's weights folder as they left it

    capsys.readouterr()
    assert main(["learn-weights", "--train", str(train), "--queries", str(made / "features"), "--aspect", "subject",
                 "--out", str(tmp_path / "c.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generated for aspect 'style'" in err[0] and "--aspect style" in err[0], err
    assert not (tmp_path / "c.json").exists()
