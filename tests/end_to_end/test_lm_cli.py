"""Causal language models end to end through the CLI on Debian's fortunes: build a small GPT-2 and its tokenizer,
train it on text, featurize its training set and held-out queries, attribute, retrain on subsets and evaluate the
LDS and the tail-patch score — the scores against a numpy per-group TRAK of the stored features, the LDS targets
against each retrained model's loss computed by transformers itself from the saved folder, the tail-patch changes
against one SGD step taken by hand on the model transformers loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from fixtures.lms import fortune_texts, write_jsonl
from gradtrace.cli import main
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_QUERY, C = 48, 3, 0.1
QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-e2e")
    texts = fortune_texts(N_TRAIN + 2 * N_QUERY)
    write_jsonl(root / "train.jsonl", texts[:N_TRAIN])
    write_jsonl(root / "queries.jsonl", texts[N_TRAIN:N_TRAIN + N_QUERY])
    write_jsonl(root / "learn.jsonl", texts[N_TRAIN + N_QUERY:])
    assert main(["build-lm", "--data", "fortunes", "--n", "200", "--vocab-size", "400", "--dim", "32", "--heads",
                 "2", "--context", "32", "--out", str(root / "base"), *QUIET]) == 0
    assert main(["train", "--base", str(root / "base"), "--data", f"jsonl:{root / 'train.jsonl'}", "--steps", "25",
                 "--batch-size", "16", "--lr", "0.01", "--out", str(root / "run"), *QUIET]) == 0
    feat = ["--checkpoint", str(root / "run"), "--dim", "192", *QUIET]
    assert main(["featurize", *feat, "--out", str(root / "ft")]) == 0
    for name in ("queries", "learn"):
        assert main(["featurize", *feat, "--data", f"jsonl:{root / (name + '.jsonl')}", "--out",
                     str(root / f"f{name[0]}")]) == 0
    return root


def per_group_trak(phi, q, slices, c):
    out = []
    for _, s, e in slices:
        g = phi[:, s:e].T @ phi[:, s:e]
        k = np.linalg.inv(g + c * np.mean(np.diag(g)) * np.eye(e - s))
        out.append(q[:, s:e] @ k @ phi[:, s:e].T)
    return np.stack(out, axis=-1)  # (Q, N, M)


def hf_loss(model, tok, text) -> torch.Tensor:
    """A text's mean next-token loss by transformers' own loss (the text's tokens and the end-of-text token,
    truncated to the context, no padding)."""
    x = torch.tensor([(tok(text)["input_ids"] + [tok.eos_token_id])[:model.config.n_positions]])
    return model(input_ids=x, labels=x).loss


def hf_losses(folder, texts, tokenizer_folder) -> np.ndarray:
    """Each text's mean next-token loss under the model saved in `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    with torch.no_grad():
        return np.array([float(hf_loss(model, tok, text)) for text in texts])


def test_the_stores_record_the_model_and_the_tokenizer(run):
    ft, fq = FeatureStore.open(run / "ft"), FeatureStore.open(run / "fq")
    assert ft.ids.tolist() == list(range(N_TRAIN)) and fq.ids.tolist() == list(range(N_QUERY))
    config = json.loads((run / "run" / "config.json").read_text())
    assert config["adapter"] == "causal-lm" and config["model_config"]["seq_len"] == 32
    for store in (ft, fq):
        assert store.settings["source"]["tokenizer_fingerprint"] == config["model_config"]["tokenizer_fingerprint"]
        assert store.settings["measurement"]["name"] == "loss"
    assert ft.group_names == ["embed.tokens", "embed.positions", "block0.attn", "block0.mlp", "block1.attn",
                              "block1.mlp", "final_norm"]


def test_attribute_and_lds_match_plain_computations(run):
    ft = FeatureStore.open(run / "ft")
    phi, q = (np.asarray(FeatureStore.open(run / n).features, dtype=np.float64) for n in ("ft", "fq"))
    scores = per_group_trak(phi, q, ft.group_slices, C).sum(-1)
    assert main(["attribute", "--train", str(run / "ft"), "--queries", str(run / "fq"), "--lambda-c", str(C),
                 "--top-k", "4", "--out", str(run / "attr"), *QUIET]) == 0
    doc = json.loads((run / "attr" / "attributions.json").read_text())
    for qi, row in enumerate(doc["queries"]):
        assert [t["train_id"] for t in row["top"]] == np.argsort(-scores[qi], kind="stable")[:4].tolist()
    texts = fortune_texts(N_TRAIN + N_QUERY)
    report = (run / "attr" / "report.md").read_text()
    assert texts[N_TRAIN].splitlines()[0] in report
    # LDS: each query's target is minus its loss under each retrained model, computed by transformers itself
    assert main(["retrain", "--run", str(run / "run"), "--subsets", "5", *QUIET]) == 0
    assert main(["eval", "lds", "--run", str(run / "run"), "--retrain", str(run / "run" / "retrain"),
                 "--train-features", str(run / "ft"), "--queries", str(run / "fq"), "--lambda-c", str(C),
                 "--out", str(run / "lds"), *QUIET]) == 0
    lds = json.loads((run / "lds" / "lds.json").read_text())
    retrain = run / "run" / "retrain"
    jobs = json.loads((retrain / "manifest.json").read_text())["settings"]["jobs"]
    subsets = np.load(retrain / "subsets.npy")
    losses = np.array([hf_losses(retrain / "models" / job / "model", texts[N_TRAIN:], run / "base") for job in jobs])
    assert losses.std(0).min() > 0  # the subsets do change each query's loss
    predictions = np.stack([np.isin(np.arange(N_TRAIN), s) for s in subsets]).astype(np.float64) @ scores.T
    want = [spearmanr(predictions[:, j], -losses[:, j]).statistic for j in range(N_QUERY)]
    np.testing.assert_allclose(lds["lds"]["per_query"], want, rtol=1e-6, atol=1e-9)
    assert lds["manifest"]["model_output"]["name"] == "mean token loss"
    assert lds["manifest"]["model_output"]["target"].startswith("negative loss")


def test_tail_patch_matches_one_step_taken_by_hand(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["learn-weights", "--train", str(run / "ft"), "--queries", str(run / "fl"), "--lambda-c", str(C),
                 "--steps", "20", "--out", str(run / "weights.json"), *QUIET]) == 0
    lr, k = 0.05, 4
    assert main(["eval", "tail-patch", "--run", str(run / "run"), "--train-features", str(run / "ft"), "--queries",
                 str(run / "fq"), "--lambda-c", str(C), "--weights", str(run / "weights.json"), "--top-k", str(k),
                 "--lr", str(lr), "--out", str(run / "tp"), *QUIET]) == 0
    doc = json.loads((run / "tp" / "tail_patch.json").read_text())
    ft = FeatureStore.open(run / "ft")
    phi, q = (np.asarray(FeatureStore.open(run / n).features, dtype=np.float64) for n in ("ft", "fq"))
    scores = per_group_trak(phi, q, ft.group_slices, C).sum(-1)
    texts = fortune_texts(N_TRAIN + N_QUERY)
    tok = AutoTokenizer.from_pretrained(run / "base")
    for qi, row in enumerate(doc["per_query"]):
        assert row["uniform_ids"] == np.argsort(-scores[qi], kind="stable")[:k].tolist()
        assert len(set(row["random_ids"])) == k and len(set(row["learned_ids"])) == k
        for kind in ("uniform", "learned", "random"):
            model = AutoModelForCausalLM.from_pretrained(run / "run" / "model").eval()
            query = texts[N_TRAIN + qi]
            with torch.no_grad():
                before = float(hf_loss(model, tok, query))
            loss = sum(hf_loss(model, tok, texts[i]) for i in row[f"{kind}_ids"]) / k
            grads = torch.autograd.grad(loss, list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p.sub_(lr * g)
                after = float(hf_loss(model, tok, query))
            assert row[f"delta_{kind}"] == pytest.approx(before - after, rel=1e-3, abs=1e-6)
    deltas = {kind: np.array([r[f"delta_{kind}"] for r in doc["per_query"]]) for kind in ("uniform", "random")}
    assert doc["summary"]["delta_uniform_minus_random"]["mean"] == pytest.approx(
        float(np.mean(deltas["uniform"] - deltas["random"])), rel=1e-9)
    assert doc["manifest"]["model_output"]["delta"] == "decrease of the loss"
