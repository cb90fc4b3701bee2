"""The Python front door (`gradtrace.Tracer`) against the command line: a model object and in-memory data give the
same top-k ids and scores, bit for bit at one thread, as `gradtrace featurize` + `attribute` on a folder the user
saved the same weights to and the same data saved with `save_to_disk`; the store's model fingerprint is the
folder's, so a store made from the folder and one from the same weights in memory are one store."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

import gradtrace
from fixtures.classifiers import small_cnn
from fixtures.lms import fortune_texts, write_tiny_lm
from gradtrace.cli import main
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--no-progress"]


def cli_topk(checkpoint: Path, train: Path, queries: Path, out: Path, *, method: str, top_k: int,
             featurize: list[str] = ()) -> tuple[np.ndarray, np.ndarray, str]:
    """(top-k ids, scores, the train store's model fingerprint) of the CLI on a folder and hf: data."""
    for name, data in (("feat-train", train), ("feat-queries", queries)):
        assert main(["featurize", "--checkpoint", str(checkpoint), "--data", f"hf:{data}", *featurize,
                     "--out", str(out / name), *QUIET]) == 0
    assert main(["attribute", "--train", str(out / "feat-train"), "--queries", str(out / "feat-queries"),
                 "--method", method, "--top-k", str(top_k), "--no-report", "--out", str(out / "attr"), *QUIET]) == 0
    fingerprint = FeatureStore.open(out / "feat-train").settings["model_fingerprint"]
    return np.load(out / "attr" / "topk_ids.npy"), np.load(out / "attr" / "topk_scores.npy"), fingerprint


def assert_same(result, store: Path, ids, scores, fingerprint) -> None:
    np.testing.assert_array_equal(np.load(result.path / "topk_ids.npy"), ids)
    np.testing.assert_array_equal(np.load(result.path / "topk_scores.npy"), scores)
    assert FeatureStore.open(store / "train").settings["model_fingerprint"] == fingerprint
    assert [r["train_id"] for r in result.records()] == ids.reshape(-1).tolist()


def digits_dataset(rows: slice):
    import datasets

    d = load_digits()
    images = [Image.fromarray((x * 255 / 16).astype(np.uint8)) for x in d.images[rows]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": images, "label": [int(y) for y in d.target[rows]]}, features=features)


def test_a_classifier_object_gives_the_clis_answer(tmp_path):
    train, queries = digits_dataset(slice(0, 80)), digits_dataset(slice(80, 86))
    train.save_to_disk(str(tmp_path / "train")), queries.save_to_disk(str(tmp_path / "queries"))
    kwargs = {"channels": 1, "num_classes": 10}
    assert main(["train", "--adapter", "classifier", "--model", "factory", "--data", f"hf:{tmp_path / 'train'}",
                 "--steps", "5", "--batch-size", "16", "--model-options",
                 '{"factory": "fixtures.classifiers:small_cnn", "kwargs": {"channels": 1, "num_classes": 10}}',
                 "--out", str(tmp_path / "model"), *QUIET]) == 0
    ids, scores, fingerprint = cli_topk(tmp_path / "model", tmp_path / "train", tmp_path / "queries", tmp_path / "cli",
                                        method="trak", top_k=4)
    model = small_cnn(**kwargs)  # the user's own module, holding the trained weights
    model.load_state_dict(load_file(str(tmp_path / "model" / "model.safetensors")))
    tracer = gradtrace.Tracer(model, train=train, store=tmp_path / "store", factory=small_cnn, kwargs=kwargs,
                              progress=False)
    result = tracer.attribute(queries, method="trak", top_k=4)
    assert_same(result, tmp_path / "store", ids, scores, fingerprint)
    assert result.images(result.query_ids[0])[0].size == (8, 8)

    learning = digits_dataset(slice(86, 106))  # learned group weights, then attributed with them: the CLI's too
    learning.save_to_disk(str(tmp_path / "learning"))
    assert main(["featurize", "--checkpoint", str(tmp_path / "model"), "--data", f"hf:{tmp_path / 'learning'}",
                 "--out", str(tmp_path / "cli" / "feat-learning"), *QUIET]) == 0
    assert main(["learn-weights", "--train", str(tmp_path / "cli" / "feat-train"), "--queries",
                 str(tmp_path / "cli" / "feat-learning"), "--steps", "20", "--out", str(tmp_path / "cli" / "w.json"),
                 *QUIET]) == 0
    assert main(["attribute", "--train", str(tmp_path / "cli" / "feat-train"), "--queries",
                 str(tmp_path / "cli" / "feat-queries"), "--weights", str(tmp_path / "cli" / "w.json"), "--top-k",
                 "4", "--no-report", "--out", str(tmp_path / "cli" / "weighted"), *QUIET]) == 0
    weights = tracer.learn_weights(learning, steps=20)
    weighted = tracer.attribute(queries, method="trak", top_k=4, weights=weights, out=tmp_path / "weighted")
    for name in ("topk_ids.npy", "topk_scores.npy"):
        np.testing.assert_array_equal(np.load(weighted.path / name), np.load(tmp_path / "cli" / "weighted" / name))
    assert not np.array_equal(np.load(weighted.path / "topk_scores.npy"), scores)  # the weights changed the scores


def test_a_causal_lm_object_gives_the_clis_answer_and_shares_the_folders_store(tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = write_tiny_lm(tmp_path / "lm")
    texts = fortune_texts(30)
    datasets.Dataset.from_dict({"text": texts[:26]}).save_to_disk(str(tmp_path / "train"))
    datasets.Dataset.from_dict({"text": texts[26:]}).save_to_disk(str(tmp_path / "queries"))
    ids, scores, fingerprint = cli_topk(folder, tmp_path / "train", tmp_path / "queries", tmp_path / "cli",
                                        method="tracin", top_k=3)
    store = tmp_path / "store"
    from_folder = gradtrace.Tracer(folder, train=texts[:26], store=store, progress=False).featurize()
    assert from_folder.settings["model_fingerprint"] == fingerprint
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tracer = gradtrace.Tracer(lm, train=texts[:26], tokenizer=tokenizer, store=store, progress=False)
    assert tracer.featurize().path == from_folder.path  # the same weights in memory: the folder's store, reused
    result = tracer.attribute(texts[26:], method="tracin", top_k=3)
    assert_same(result, store, ids, scores, fingerprint)
    assert result.records()[0]["query_text"] == texts[26] and result.holds_texts
    html = result._repr_html_()
    assert all(r["train_text"].split()[0] in html for r in result.records())

    with torch.no_grad():
        lm.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0  # other weights, same store: refused, nothing replaced
    with pytest.raises(UserError, match="other weights"):
        gradtrace.Tracer(lm, train=texts[:26], tokenizer=tokenizer, store=store, progress=False)
    assert FeatureStore.open(store / "train").settings["model_fingerprint"] == fingerprint
    changed = gradtrace.Tracer(lm, train=texts[:26], tokenizer=tokenizer, store=store, overwrite=True,
                               progress=False).featurize()
    assert changed.settings["model_fingerprint"] != fingerprint
    with pytest.raises(UserError, match="other train data"):
        gradtrace.Tracer(lm, train=texts[:25], tokenizer=tokenizer, store=store, progress=False)


def test_what_the_front_door_cannot_take_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="transformers causal LM .* nn.Module image classifier"):
        gradtrace.Tracer(object(), train=["a text"], store=tmp_path / "a")
    with pytest.raises(UserError, match="list of int"):
        gradtrace.Tracer(small_cnn(), train=[1, 2, 3], store=tmp_path / "b")
    with pytest.raises(UserError, match="unknown featurize option 'dims'"):
        gradtrace.Tracer(small_cnn(), train=["a"], store=tmp_path / "c", dims=8)
    assert not (tmp_path / "c").exists()
    pairs = list(zip([Image.fromarray(np.zeros((8, 8), np.uint8))] * 4, [0, 1, 0, 1]))
    with pytest.raises(UserError, match="does not rebuild this model"):
        gradtrace.Tracer(small_cnn(channels=1, num_classes=2, width=6), train=pairs, store=tmp_path / "d",
                         factory=small_cnn, kwargs={"channels": 1, "num_classes": 2}, progress=False)
    with pytest.raises(UserError, match="needs its tokenizer"):
        from transformers import GPT2Config, GPT2LMHeadModel

        gradtrace.Tracer(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)), train=["a"],
                         store=tmp_path / "e", progress=False)
