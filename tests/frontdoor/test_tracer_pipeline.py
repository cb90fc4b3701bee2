"""The front door on a diffusers text-to-image pipeline object with a UNet LoRA loaded by diffusers: the same top-k
ids and scores, bit for bit at one thread, as the CLI on the base folder and the LoRA weights diffusers saved
(`import-lora`, `featurize`, `attribute`), and the same model fingerprint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

import gradtrace
from fixtures.pipelines import tiny_pipeline
from gradtrace.cli import main
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--no-progress"]
WORDS = ["red", "blue", "green", "dark", "pale", "bright"]


def captioned(n: int, seed: int):
    import datasets

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
    texts = [f"a {WORDS[i % 6]} square" for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": texts}, features=features)


def test_a_pipeline_object_with_lora_gives_the_clis_answer(tmp_path):
    tiny_pipeline(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0.0, 0.2)
    StableDiffusionPipeline.save_lora_weights(  # the user's own save, read by the CLI
        save_directory=tmp_path / "lora", safe_serialization=True,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    train, queries = captioned(12, 0), captioned(3, 1)
    train.save_to_disk(str(tmp_path / "train")), queries.save_to_disk(str(tmp_path / "queries"))
    feat = ["--timesteps", "2", "--dim", "64", "--measurement", "dtrak"]
    assert main(["import-lora", "--base", str(tmp_path / "pipe"), "--lora", str(tmp_path / "lora"), "--alpha", "4",
                 "--out", str(tmp_path / "ft"), *QUIET]) == 0
    for name in ("train", "queries"):
        assert main(["featurize", "--checkpoint", str(tmp_path / "ft"), "--data", f"hf:{tmp_path / name}", *feat,
                     "--out", str(tmp_path / f"feat-{name}"), *QUIET]) == 0
    assert main(["attribute", "--train", str(tmp_path / "feat-train"), "--queries", str(tmp_path / "feat-queries"),
                 "--method", "dtrak", "--top-k", "4", "--no-report", "--out", str(tmp_path / "attr"), *QUIET]) == 0

    tracer = gradtrace.Tracer(pipe, train=train, store=tmp_path / "store", timesteps=2, dim=64,
                              measurement="dtrak", progress=False)
    result = tracer.attribute(queries, method="dtrak", top_k=4)
    for name in ("topk_ids.npy", "topk_scores.npy"):
        np.testing.assert_array_equal(np.load(result.path / name), np.load(tmp_path / "attr" / name))
    assert FeatureStore.open(tmp_path / "store" / "train").settings["model_fingerprint"] == \
        FeatureStore.open(tmp_path / "feat-train").settings["model_fingerprint"]
    assert any("lora" in g for g in result.doc["groups"]) or len(result.doc["groups"]) > 0
    assert pipe.unet.peft_config  # the user's pipeline keeps its LoRA


def test_pipeline_fingerprint_ignores_only_where_a_config_was_loaded_from(tmp_path):
    import json
    import shutil

    from gradtrace.adapters.diffusers.folder import files_fingerprint

    tiny_pipeline(tmp_path / "pipe")
    parts = ("unet", "vae", "text_encoder", "scheduler")
    want = files_fingerprint(tmp_path / "pipe", parts)
    for name, edit in (("loaded", {"_name_or_path": "/somewhere/unet"}), ("other", {"sample_size": 4})):
        shutil.copytree(tmp_path / "pipe", tmp_path / name)
        file = tmp_path / name / "unet" / "config.json"
        config = json.loads(file.read_text())
        config.update(edit)
        file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        assert (files_fingerprint(tmp_path / name, parts) == want) == (name == "loaded")


def test_prompts_are_sampled_then_attributed_as_the_cli_does(tmp_path):
    tiny_pipeline(tmp_path / "pipe")
    train = captioned(8, 0)
    train.save_to_disk(str(tmp_path / "train"))
    prompts = ["a red square", "a blue square"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    tracer = gradtrace.Tracer(StableDiffusionPipeline.from_pretrained(tmp_path / "pipe"), train=train,
                              store=tmp_path / "store", timesteps=2, dim=64, progress=False)
    result = tracer.attribute(prompts, method="trak", top_k=3, sample={"sample_steps": 3, "seed": 5})
    assert main(["sample", "--checkpoint", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--sample-steps", "3", "--seed", "5", "--out", str(tmp_path / "samples"), *QUIET]) == 0
    feat = ["--timesteps", "2", "--dim", "64", *QUIET]
    assert main(["featurize", "--checkpoint", str(tmp_path / "pipe"), "--data", f"hf:{tmp_path / 'train'}", *feat,
                 "--out", str(tmp_path / "feat-train")]) == 0
    assert main(["featurize", "--checkpoint", str(tmp_path / "pipe"), "--samples", str(tmp_path / "samples"), *feat,
                 "--out", str(tmp_path / "feat-queries")]) == 0
    assert main(["attribute", "--train", str(tmp_path / "feat-train"), "--queries", str(tmp_path / "feat-queries"),
                 "--method", "trak", "--top-k", "3", "--no-report", "--out", str(tmp_path / "attr"), *QUIET]) == 0
    for name in ("topk_ids.npy", "topk_scores.npy"):
        np.testing.assert_array_equal(np.load(result.path / name), np.load(tmp_path / "attr" / name))
    assert [q["source"].get("text") for q in result.doc["queries"]] == prompts
