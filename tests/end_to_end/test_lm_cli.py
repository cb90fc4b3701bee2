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


def test_ekfac_attribute_learn_lds_and_tail_patch(run):
    """attribute-ekfac / learn-weights-ekfac on the LM (Conv1D as Linear), `eval lds --attributions` against the
    Spearman of its own scores, `eval tail-patch --attributions` ranking by its scores and contributions."""
    ids = run / "q.txt"
    ids.write_text("\n".join(str(i) for i in range(N_QUERY)) + "\n")
    (run / "l.txt").write_text("\n".join(str(i) for i in range(N_QUERY)) + "\n")
    common = ["--checkpoint", str(run / "run"), "--factors", str(run / "ek-factors"), *QUIET]
    assert main(["learn-weights-ekfac", *common, "--data", f"jsonl:{run / 'learn.jsonl'}", "--ids",
                 str(run / "l.txt"), "--steps", "20", "--out", str(run / "ek-w.json")]) == 0
    wdoc = json.loads((run / "ek-w.json").read_text())
    assert wdoc["group_names"] == ["block0.attn", "block0.mlp", "block1.attn", "block1.mlp"]
    assert sorted(wdoc["provenance"]["base_method"]["modules"]) == sorted(
        f"lm.transformer.h.{b}.{m}" for b in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert main(["attribute-ekfac", *common, "--data", f"jsonl:{run / 'queries.jsonl'}", "--ids", str(ids),
                 "--weights", str(run / "ek-w.json"), "--top-k", "4", "--out", str(run / "ek-attr")]) == 0
    scores, contrib = np.load(run / "ek-attr" / "scores.npy"), np.load(run / "ek-attr" / "contributions.npy")
    w = np.array([wdoc["weights"][g] for g in wdoc["group_names"]])
    np.testing.assert_allclose(scores, contrib @ w, rtol=1e-5, atol=1e-7 * np.abs(scores).max())
    retrain = run / "run" / "retrain"
    if not (retrain / "manifest.json").exists():
        assert main(["retrain", "--run", str(run / "run"), "--subsets", "5", *QUIET]) == 0
    assert main(["eval", "lds", "--run", str(run / "run"), "--retrain", str(retrain), "--attributions",
                 str(run / "ek-attr"), "--out", str(run / "ek-lds"), *QUIET]) == 0
    lds = json.loads((run / "ek-lds" / "lds.json").read_text())
    subsets = np.load(retrain / "subsets.npy")
    mask = np.stack([np.isin(np.arange(N_TRAIN), s) for s in subsets]).astype(np.float64)
    texts = fortune_texts(N_TRAIN + N_QUERY)
    jobs = json.loads((retrain / "manifest.json").read_text())["settings"]["jobs"]
    losses = np.array([hf_losses(retrain / "models" / job / "model", texts[N_TRAIN:], run / "base") for job in jobs])
    want = [spearmanr((mask @ scores.T)[:, j], -losses[:, j]).statistic for j in range(N_QUERY)]
    np.testing.assert_allclose(lds["lds"]["per_query"], want, rtol=1e-6, atol=1e-9)
    assert lds["manifest"]["method"]["method"] == "ekfac"
    assert main(["eval", "tail-patch", "--run", str(run / "run"), "--attributions", str(run / "ek-attr"), "--top-k",
                 "4", "--out", str(run / "ek-tp"), *QUIET]) == 0
    doc = json.loads((run / "ek-tp" / "tail_patch.json").read_text())
    for qi, row in enumerate(doc["per_query"]):
        assert row["learned_ids"] == np.argsort(-scores[qi], kind="stable")[:4].tolist()
        assert row["uniform_ids"] == np.argsort(-contrib[qi].astype(np.float64).sum(-1), kind="stable")[:4].tolist()
    assert set(doc["summary"]) >= {"delta_uniform", "delta_learned", "delta_random", "delta_learned_minus_uniform"}
    assert doc["manifest"]["method"]["method"] == "ekfac"
    tp = ["eval", "tail-patch", "--run", str(run / "run"), "--out", str(run / "ek-tp-bad"), *QUIET]
    assert main([*tp, "--attributions", str(run / "ek-attr"), "--weights", str(run / "ek-w.json")]) == 2
    assert main([*tp, "--attributions", str(run / "ft")]) == 2  # a feature store, not an attribute output


def test_logra_recipe_lds_and_tail_patch(run):
    """LoGra = Kronecker features with one group per layer + TRAK's per-group kernel: scores against numpy, the LDS
    and the tail-patch top-k on those features."""
    feat = ["--checkpoint", str(run / "run"), "--projection", "kronecker", "--groups", "module", "--dim", "256",
            *QUIET]
    assert main(["featurize", *feat, "--out", str(run / "logra-ft")]) == 0
    assert main(["featurize", *feat, "--data", f"jsonl:{run / 'queries.jsonl'}", "--out", str(run / "logra-fq")]) == 0
    ft = FeatureStore.open(run / "logra-ft")
    assert ft.settings["projection"]["kind"] == "kronecker"
    assert "lm.transformer.h.0.mlp.c_fc" in ft.group_names and "lm.transformer.h.1.attn.c_attn" in ft.group_names
    retrain = run / "run" / "retrain"
    if not (retrain / "manifest.json").exists():
        assert main(["retrain", "--run", str(run / "run"), "--subsets", "5", *QUIET]) == 0
    assert main(["eval", "lds", "--run", str(run / "run"), "--retrain", str(retrain), "--train-features",
                 str(run / "logra-ft"), "--queries", str(run / "logra-fq"), "--kernel", "per-group", "--lambda-c",
                 str(C), "--per-group", "--out", str(run / "logra-lds"), *QUIET]) == 0
    phi, q = (np.asarray(FeatureStore.open(run / n).features, dtype=np.float64) for n in ("logra-ft", "logra-fq"))
    scores = per_group_trak(phi, q, ft.group_slices, C).sum(-1)
    subsets = np.load(retrain / "subsets.npy")
    mask = np.stack([np.isin(np.arange(N_TRAIN), s) for s in subsets]).astype(np.float64)
    lds = json.loads((run / "logra-lds" / "lds.json").read_text())
    assert len(lds["per_group"]) == len(ft.group_names)
    texts = fortune_texts(N_TRAIN + N_QUERY)
    jobs = json.loads((retrain / "manifest.json").read_text())["settings"]["jobs"]
    losses = np.array([hf_losses(retrain / "models" / job / "model", texts[N_TRAIN:], run / "base") for job in jobs])
    want = [spearmanr((mask @ scores.T)[:, j], -losses[:, j]).statistic for j in range(N_QUERY)]
    np.testing.assert_allclose(lds["lds"]["per_query"], want, rtol=1e-6, atol=1e-9)
    assert main(["eval", "tail-patch", "--run", str(run / "run"), "--train-features", str(run / "logra-ft"),
                 "--queries", str(run / "logra-fq"), "--kernel", "per-group", "--lambda-c", str(C), "--top-k", "4",
                 "--out", str(run / "logra-tp"), *QUIET]) == 0
    doc = json.loads((run / "logra-tp" / "tail_patch.json").read_text())
    for qi, row in enumerate(doc["per_query"]):
        assert row["uniform_ids"] == np.argsort(-scores[qi], kind="stable")[:4].tolist()


def test_method_ekfac_gives_the_alias_outputs_on_the_lm(run):
    """On the LM, `learn-weights --method ekfac` and `attribute --method ekfac` write exactly the weights and arrays
    of the `learn-weights-ekfac` / `attribute-ekfac` aliases."""
    ids = run / "q.txt"
    ids.write_text("\n".join(str(i) for i in range(N_QUERY)) + "\n")
    common = ["--checkpoint", str(run / "run"), "--factors", str(run / "ek-factors"), *QUIET]
    learn = ["--data", f"jsonl:{run / 'learn.jsonl'}", "--ids", str(ids), "--steps", "20"]
    assert main(["learn-weights-ekfac", *common, *learn, "--out", str(run / "alias-w.json")]) == 0
    assert main(["learn-weights", "--method", "ekfac", *common, *learn, "--out", str(run / "new-w.json")]) == 0
    old, new = (json.loads((run / f"{n}-w.json").read_text()) for n in ("alias", "new"))
    assert new["weights"] == old["weights"] and new["provenance"]["lambda_c"] == old["provenance"]["lambda_c"]
    args = [*common, "--data", f"jsonl:{run / 'queries.jsonl'}", "--ids", str(ids), "--weights",
            str(run / "alias-w.json"), "--top-k", "4"]
    assert main(["attribute-ekfac", *args, "--out", str(run / "alias-attr")]) == 0
    assert main(["attribute", "--method", "ekfac", *args, "--out", str(run / "new-attr")]) == 0
    for array in ("scores", "contributions", "topk_ids", "topk_scores", "topk_contributions"):
        a, b = (np.load(run / f"{kind}-attr" / f"{array}.npy") for kind in ("alias", "new"))
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), array
