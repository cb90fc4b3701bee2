"""LoRA weights saved the way diffusers' text-to-image LoRA script saves them (`save_lora_weights` of the
diffusers-format state dict: keys `unet.…lora.down/up.weight`), imported with `gradtrace import-lora`, checked
against diffusers' own loader; and the compute dtype (`--dtype bfloat16`) of featurize, sample and train."""
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fixtures.pipelines import tiny_pipeline
from gradtrace.adapters import get_adapter
from gradtrace.cli import main
from gradtrace.features.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")


def run(*argv):
    assert main([*map(str, argv), "--no-progress"]) == 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline, and UNet LoRA weights (rank 3, random B so they change the output) saved by diffusers."""
    root = tmp_path_factory.mktemp("lora")
    tiny_pipeline(root / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(root / "pipe")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        pipe.unet.add_adapter(LoraConfig(r=3, lora_alpha=3, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0.0, 0.2)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=root / "lora", unet_lora_layers=state,
                                              safe_serialization=True)
    return root


def test_imported_lora_computes_what_diffusers_loads(saved, tmp_path):
    keys = list(load_file(saved / "lora" / "pytorch_lora_weights.safetensors"))
    assert keys and all(".lora.down." in k or ".lora.up." in k for k in keys)  # the scripts' key format
    run("import-lora", "--base", saved / "pipe", "--lora", saved / "lora", "--out", tmp_path / "ft")
    manifest = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert manifest["model_config"]["lora"] == {"rank": 3, "alpha": 3.0,
                                                "targets": ["to_k", "to_out.0", "to_q", "to_v"]}
    ckpt = get_adapter("diffusers").load(tmp_path / "ft")
    reference = StableDiffusionPipeline.from_pretrained(saved / "pipe")
    reference.load_lora_weights(saved / "lora")  # diffusers' own loader
    plain = StableDiffusionPipeline.from_pretrained(saved / "pipe").unet
    g = torch.Generator().manual_seed(0)
    x, states = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ours = ckpt.model(x, t, states)
        theirs = reference.unet(x, t, encoder_hidden_states=states).sample
        base = plain(x, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours - base).abs().max() > 1e-3  # the LoRA weights do change the output
    run("featurize", "--checkpoint", tmp_path / "ft", "--data", "shapes", "--n", 4, "--out", tmp_path / "f",
        "--dim", 64, "--timesteps", 1)
    store = FeatureStore.open(tmp_path / "f")
    assert store.features.shape[0] == 4 and all("lora" in n for n in store.group_names)


@pytest.mark.parametrize("case", ["other-base", "text-encoder", "missing", "not-empty"])
def test_bad_imports_are_one_line_and_write_nothing(saved, tmp_path, capsys, case):
    lora = saved / "lora"
    if case == "other-base":
        tiny_pipeline(tmp_path / "other", image_size=16, seed=3)
        from diffusers import UNet2DConditionModel  # a base whose attention has other widths
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 48],
                                    layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=16,
                                    attention_head_dim=4, norm_num_groups=8)
        unet.save_pretrained(tmp_path / "other" / "unet")
        base = tmp_path / "other"
    else:
        base = saved / "pipe"
    if case == "text-encoder":
        state = load_file(lora / "pytorch_lora_weights.safetensors")
        state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 16)
        (tmp_path / "te").mkdir()
        save_file(state, tmp_path / "te" / "pytorch_lora_weights.safetensors")
        lora = tmp_path / "te"
    if case == "missing":
        lora = tmp_path / "nothing-here"
    out = tmp_path / "out"
    if case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    assert main(["import-lora", "--base", str(base), "--lora", str(lora), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gradtrace import-lora: error:"), err
    assert {"other-base": "do not fit", "text-encoder": "text encoder", "missing": "no LoRA weights",
            "not-empty": "not empty"}[case] in err
    if case == "not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()


def test_bfloat16_features_are_close_to_float32_and_never_mixed(saved, tmp_path, capsys):
    run("import-lora", "--base", saved / "pipe", "--lora", saved / "lora", "--out", tmp_path / "ft")
    common = ["--checkpoint", tmp_path / "ft", "--data", "shapes", "--n", 6, "--dim", 96, "--timesteps", 2]
    capsys.readouterr()  # bfloat16 compute is the dense path's: the default (Kronecker) projection refuses it
    assert main(["featurize", *map(str, common), "--dtype", "bfloat16", "--out", str(tmp_path / "k"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--projection rademacher" in err and "\n" not in err and not (tmp_path / "k").exists()
    common += ["--projection", "rademacher"]
    run("featurize", *common, "--out", tmp_path / "f32")
    run("featurize", *common, "--dtype", "bfloat16", "--out", tmp_path / "bf16")
    a = np.asarray(FeatureStore.open(tmp_path / "f32").features, np.float64)
    b = FeatureStore.open(tmp_path / "bf16")
    assert b.settings["precision"] == "bfloat16" and b.settings["dtype"] == "float32"  # compute vs storage
    b = np.asarray(b.features, np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)  # about three significant digits, not the same bits
    capsys.readouterr()
    assert main(["attribute", "--train", str(tmp_path / "f32"), "--queries", str(tmp_path / "bf16"),
                 "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "'precision' differs" in capsys.readouterr().err


def test_bfloat16_train_and_sample(saved, tmp_path, capsys):
    common = ["train", "--base", saved / "pipe", "--lora-rank", 2, "--data", "shapes", "--n", 8, "--steps", 3,
              "--batch-size", 4]
    run(*common, "--out", tmp_path / "f32")
    run(*common, "--dtype", "bfloat16", "--out", tmp_path / "bf16")
    recipe = json.loads((tmp_path / "bf16" / "config.json").read_text())["train_config"]
    assert recipe["precision"] == "bfloat16"  # part of the recipe: subset models retrain alike
    a = load_file(tmp_path / "f32" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "bf16" / "pytorch_lora_weights.safetensors")
    assert all(b[k].dtype == torch.float32 for k in b)  # autocast: the trained factors stay float32
    assert not all(torch.equal(a[k], b[k]) for k in a)
    run("sample", "--checkpoint", tmp_path / "bf16", "--prompt", "a circle", "--num", 2, "--sample-steps", 2,
        "--dtype", "bfloat16", "--out", tmp_path / "s")
    images = np.load(tmp_path / "s" / "images.npy")
    assert images.dtype == np.float32 and np.isfinite(images).all() and images.shape == (2, 3, 16, 16)
    capsys.readouterr()
    assert main(["train", "--data", "digits", "--n", "8", "--steps", "1", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "unet"), "--no-progress"]) == 2
    assert "train in float32" in capsys.readouterr().err and not (tmp_path / "unet").exists()
