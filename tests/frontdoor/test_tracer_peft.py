"""The front door on a peft LoRA causal LM in memory (`get_peft_model(AutoModelForCausalLM, LoraConfig)`): features
over the adapter's parameters alone, and the same top-k ids and scores, bit for bit at one thread, as the CLI on the
adapter folder the user saved with peft's `save_pretrained` over the same base folder; the same model fingerprint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gradtrace
from fixtures.lms import fortune_texts, write_tiny_lm
from gradtrace.cli import main
from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--no-progress"]


def lora_lm(folder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folder)
    model = get_peft_model(lm, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)  # a trained adapter: B is not zero
    return model


def test_a_peft_lora_lm_object_gives_the_clis_answer_over_the_adapter(tmp_path):
    import datasets
    from transformers import AutoTokenizer

    base = write_tiny_lm(tmp_path / "lm")
    texts = fortune_texts(30)
    datasets.Dataset.from_dict({"text": texts[:24]}).save_to_disk(str(tmp_path / "train"))
    datasets.Dataset.from_dict({"text": texts[24:]}).save_to_disk(str(tmp_path / "queries"))
    model, tokenizer = lora_lm(base), AutoTokenizer.from_pretrained(base)
    model.save_pretrained(tmp_path / "adapter")  # the user's own save: an adapter folder naming its base folder
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base)
    for name in ("train", "queries"):
        assert main(["featurize", "--checkpoint", str(tmp_path / "adapter"), "--data", f"hf:{tmp_path / name}",
                     "--out", str(tmp_path / f"feat-{name}"), *QUIET]) == 0
    assert main(["attribute", "--train", str(tmp_path / "feat-train"), "--queries", str(tmp_path / "feat-queries"),
                 "--method", "trak", "--top-k", "4", "--no-report", "--out", str(tmp_path / "attr"), *QUIET]) == 0
    cli = FeatureStore.open(tmp_path / "feat-train")

    tracer = gradtrace.Tracer(model, train=texts[:24], tokenizer=tokenizer, store=tmp_path / "store", progress=False)
    result = tracer.attribute(texts[24:], method="trak", top_k=4)
    for name in ("topk_ids.npy", "topk_scores.npy"):
        np.testing.assert_array_equal(np.load(result.path / name), np.load(tmp_path / "attr" / name))
    ours = FeatureStore.open(tmp_path / "store" / "train")
    assert ours.settings["model_fingerprint"] == cli.settings["model_fingerprint"]
    lora = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert lora and all(".lora_" in n for n in lora)
    covered = [n for g in ours.settings["groups"] for n in g["params"]]  # the adapter's parameters, all and only
    assert sorted(covered) == sorted(f"lm.{n}" for n in lora)
    assert ours.settings["groups"] == cli.settings["groups"]
    assert result.records()[0]["query_text"] == texts[24]
    assert any(p.requires_grad for p in model.parameters())  # the user's model is left as it was
    assert sum(".lora_" in n for n, _ in model.named_parameters()) == len(lora)

    model.add_adapter("second", model.peft_config["default"])
    with pytest.raises(UserError, match="2 peft adapters"):
        gradtrace.Tracer(model, train=texts[:24], tokenizer=tokenizer, store=tmp_path / "other", progress=False)
