"""The causal-LM adapter: a folder written by transformers itself loads; per-sequence loss gradients from
gradtrace's featurizers (exact and Kronecker paths) against a plain autograd loop over Hugging Face's own loss;
LoRA-only features against the autograd loop over the LoRA parameters; padding never reaching the loss; the
`block` preset; training deterministic and saved checkpoints reloading to the same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.lms import source_of, tiny_lm_with_texts, write_jsonl
from gradtrace.adapters import adapter_of, get_adapter
from gradtrace.adapters.base import Checkpoint, OutputGrid
from gradtrace.adapters.causal_lm.groups import block_key
from gradtrace.adapters.checkpoint import model_fingerprint
from gradtrace.adapters.train_state import TrainState
from gradtrace.data import load_dataset
from gradtrace.errors import UserError
from gradtrace.features.featurize import FeatureSpec, featurizer_for

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER = get_adapter("causal-lm")
SEQ = 32


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm_with_texts(tmp_path_factory.mktemp("lm"), 40)


def moved(model, seed: int = 1, scale: float = 0.05):
    """The model with every trainable tensor moved off its initialisation (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def checkpoint(model) -> Checkpoint:
    return Checkpoint(model=model, config={"model_config": model.config}, fingerprint="test", path=None)


def features(model, examples, measurement="loss", projection="identity", groups="tensor"):
    spec = FeatureSpec(groups=groups, projection=projection, total_dim=10 ** 7, measurement=measurement)
    featurizer, group_list = featurizer_for(ADAPTER, checkpoint(model), spec)
    return featurizer.features(examples.images, examples.ids, examples.cond), group_list


def autograd_rows(model, examples, *, total: bool = False) -> np.ndarray:
    """Each sequence's gradient of Hugging Face's own loss (labels = its real tokens, no padding given to the model
    at all), by backward per sequence, over the trainable parameters in the model's order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for x, n in zip(examples.images, examples.cond):
        model.zero_grad()
        ids = x[:int(n)].unsqueeze(0)
        loss = model.lm(input_ids=ids, labels=ids).loss
        (loss * (int(n) - 1) if total else loss).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for _, p in named]).clone())
    return torch.stack(rows).double().numpy()


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_a_folder_written_by_transformers_loads(lm):
    from transformers import GPT2LMHeadModel

    folder, _ = lm
    adapter = adapter_of(folder)
    assert adapter.name == "causal-lm"
    ckpt = adapter.load(folder)
    ref = GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.randint(0, ref.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_allclose(ckpt.model(ids).numpy(), ref(ids).logits.numpy(), rtol=1e-4, atol=1e-5)
    assert ckpt.model_config["seq_len"] == 32 and ckpt.model_config["lora"] is None
    assert len(ckpt.model_config["tokenizer_fingerprint"]) == 64
    assert sum(p.numel() for p in ckpt.model.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("measurement", ["loss", "loss_sum"])
def test_loss_gradients_equal_an_autograd_loop(lm, measurement):
    folder, data = lm
    config = ADAPTER.default_model_config(load_dataset(data), base=folder, model_options={"seq_len": SEQ})
    model = moved(ADAPTER.build(config)).eval()
    ex = ADAPTER.examples(config, source_of(data), ids=np.arange(6))
    assert len(set(ex.cond.tolist())) > 2 and ex.cond.min() < SEQ  # several lengths, padding present
    got, groups = features(model, ex, measurement)
    want = autograd_rows(model, ex, total=measurement == "loss_sum")
    assert [p for g in groups for p in g.params] == [n for n, _ in model.named_parameters()]
    assert rel(got, want) < 1e-5


def test_padding_never_leaks_into_the_loss(lm):
    folder, data = lm
    config = ADAPTER.default_model_config(load_dataset(data), base=folder, model_options={"seq_len": SEQ})
    model = moved(ADAPTER.build(config)).eval()
    ex = ADAPTER.examples(config, source_of(data), ids=np.arange(5))
    short = [r for r in range(5) if ex.cond[r] < SEQ]
    assert short
    padded = ex.take(short)
    junk = padded.images.clone()  # the padding replaced by random tokens must change nothing
    gen = torch.Generator().manual_seed(3)
    for r, n in enumerate(padded.cond):
        junk[r, int(n):] = torch.randint(0, 200, (SEQ - int(n),), generator=gen)
    got_pad, _ = features(model, padded)
    got_junk, _ = features(model, padded.__class__(**{**padded.__dict__, "images": junk}))
    for r, n in enumerate(padded.cond):  # the same sequence alone, unpadded
        alone = padded.take([r])
        alone = alone.__class__(**{**alone.__dict__, "images": alone.images[:, :int(n)]})
        want, _ = features(model, alone)
        assert rel(got_pad[r:r + 1], want) < 1e-5
        assert rel(got_junk[r:r + 1], want) < 1e-5
    losses = ADAPTER.outputs(checkpoint(model), padded, OutputGrid())
    for r, n in enumerate(padded.cond):
        ids = padded.images[r:r + 1, :int(n)]
        with torch.no_grad():
            assert losses[r] == pytest.approx(float(model.lm(input_ids=ids, labels=ids).loss), rel=1e-5)


def test_lora_features_equal_the_autograd_loop_over_lora_parameters(lm):
    folder, data = lm
    config = ADAPTER.default_model_config(load_dataset(data), base=folder, lora_rank=2,
                                          model_options={"seq_len": SEQ})
    model = moved(ADAPTER.build(config, seed=4), scale=0.2).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ex = ADAPTER.examples(config, source_of(data), ids=np.arange(5))
    got, groups = features(model, ex)
    assert [p for g in groups for p in g.params] == trainable
    assert rel(got, autograd_rows(model, ex)) < 1e-5
    blocks = {g.name for g in features(model, ex, groups="block")[1]}
    assert blocks == {"block0.attn", "block0.mlp", "block1.attn", "block1.mlp"}


@pytest.mark.parametrize("lora", [False, True])
def test_kronecker_features_at_full_width_equal_the_exact_ones(lm, lora):
    """At a width >= the parameter count every Kronecker factor is the identity, so the two paths' features are
    the same numbers up to the order of columns inside a group: their Gram matrices must agree."""
    folder, data = lm
    config = ADAPTER.default_model_config(load_dataset(data), base=folder, lora_rank=2 if lora else None,
                                          model_options={"seq_len": SEQ})
    model = moved(ADAPTER.build(config, seed=2), scale=0.2).eval()
    ex = ADAPTER.examples(config, source_of(data), ids=np.arange(4))
    exact, _ = features(model, ex, groups="block")
    kron, _ = features(model, ex, projection="kronecker", groups="block")
    assert kron.shape == exact.shape
    gram_e, gram_k = exact.astype(np.float64) @ exact.T, kron.astype(np.float64) @ kron.T
    assert rel(gram_k, gram_e) < 1e-5


def test_block_preset_groups_gpt2_and_llama_names():
    gpt2 = {"lm.transformer.wte.weight": "embed.tokens", "lm.transformer.wpe.weight": "embed.positions",
            "lm.transformer.h.0.ln_1.weight": "block0.attn", "lm.transformer.h.0.attn.c_attn.weight": "block0.attn",
            "lm.transformer.h.0.attn.c_proj.bias": "block0.attn", "lm.transformer.h.0.ln_2.bias": "block0.mlp",
            "lm.transformer.h.11.mlp.c_fc.weight": "block11.mlp", "lm.transformer.ln_f.weight": "final_norm",
            "lm.base_model.model.transformer.h.3.attn.c_attn.lora_A.default.weight": "block3.attn",
            "lm.base_model.model.transformer.h.3.mlp.c_proj.lora_B.default.weight": "block3.mlp"}
    llama = {"lm.model.embed_tokens.weight": "embed.tokens", "lm.model.layers.2.self_attn.q_proj.weight":
             "block2.attn", "lm.model.layers.2.input_layernorm.weight": "block2.attn",
             "lm.model.layers.2.post_attention_layernorm.weight": "block2.mlp",
             "lm.model.layers.2.mlp.down_proj.weight": "block2.mlp", "lm.model.norm.weight": "final_norm",
             "lm.lm_head.weight": "head"}
    for name, group in {**gpt2, **llama}.items():
        assert block_key(name) == group, name


def test_a_peft_folder_written_by_peft_loads_with_its_lora_weights(lm, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    folder, _ = lm
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(folder),
                                LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True))
    moved(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert adapter_of(tmp_path / "adapter").name == "causal-lm"
    ckpt = ADAPTER.load(tmp_path / "adapter")
    assert ckpt.model_config["lora"]["rank"] == 3
    want = {n.replace(".default", ""): p for n, p in peft_model.named_parameters() if "lora_" in n}
    got = {n[len("lm."):].replace(".default", ""): p for n, p in ckpt.model.named_parameters() if p.requires_grad}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_training_is_deterministic_and_checkpoints_reload(lm, tmp_path, lora_rank):
    folder, data = lm
    ds = load_dataset(data)
    config = ADAPTER.default_model_config(ds, base=folder, lora_rank=lora_rank, model_options={"seq_len": SEQ})
    recipe = ADAPTER.train_config({"steps": 6, "batch_size": 8, "lr": 1e-2, "seed": 3})
    a = ADAPTER.train(config, ds, recipe, ids=np.arange(20), progress=False)
    b = ADAPTER.train(config, ds, recipe, ids=np.arange(20), progress=False)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(ADAPTER.build(config, seed=3))
    ADAPTER.save(tmp_path / "ckpt", a, train_config=recipe, dataset_info=None)
    ckpt = adapter_of(tmp_path / "ckpt").load(tmp_path / "ckpt")
    assert ckpt.fingerprint == model_fingerprint(a) and ckpt.train_ids.tolist() == list(range(20))
    ex = ADAPTER.examples(config, source_of(data), ids=np.arange(20, 26))
    np.testing.assert_allclose(ADAPTER.outputs(ckpt, ex, OutputGrid()),
                               ADAPTER.outputs(checkpoint(a), ex, OutputGrid()), rtol=1e-6)


def test_tokenization_truncates_appends_eos_and_refuses_empty_documents(lm, tmp_path):
    folder, _ = lm
    ckpt = ADAPTER.load(folder)
    tok = ckpt.model.tokenizer
    texts = ["short one", "word " * 100]
    data = write_jsonl(tmp_path / "t.jsonl", texts)
    ex = ADAPTER.examples(ckpt.model_config, source_of(f"jsonl:{data}"))
    first = tok(texts[0])["input_ids"] + [tok.eos_token_id]
    assert ex.cond.tolist() == [len(first), 32]
    assert ex.images[0, :len(first)].tolist() == first
    assert ex.images[1].tolist() == tok(texts[1])["input_ids"][:32]
    write_jsonl(tmp_path / "e.jsonl", ["fine", ""])
    with pytest.raises(UserError, match="document id 1 has 1 token"):
        ADAPTER.examples(ckpt.model_config, source_of(f"jsonl:{tmp_path / 'e.jsonl'}"))


def test_kronecker_blocks_of_gpt2_conv1d_weights_are_projections_of_their_gradients(lm):
    """GPT-2's Conv1D layers store W as (d_in, d_out): the Kronecker block of each must be vec(P_outᵀ Gᵀ P_in) of
    the example's autograd gradient G (d_in × d_out), with the projector's own seeded factors."""
    folder, data = lm
    config = ADAPTER.default_model_config(load_dataset(data), base=folder, model_options={"seq_len": SEQ})
    model = moved(ADAPTER.build(config)).eval()
    ex = ADAPTER.examples(config, source_of(data), ids=np.arange(4))
    spec = FeatureSpec(groups="block", projection="kronecker", total_dim=512, measurement="loss")
    featurizer, _ = featurizer_for(ADAPTER, checkpoint(model), spec)
    got = featurizer.features(ex.images, ex.ids, ex.cond)
    want = autograd_rows(model, ex)
    sizes = [(n, p) for n, p in model.named_parameters()]
    conv1d = [n for n, _ in sizes if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    assert len(conv1d) == 8 and set(conv1d) <= set(featurizer.kron)
    offsets = np.cumsum([0] + [p.numel() for _, p in sizes])
    where = {n: (int(offsets[i]), p.shape) for i, (n, p) in enumerate(sizes)}
    for name in conv1d:
        start, member = featurizer.kron[name]
        assert not member.exact
        p_in, p_out = (featurizer.projector.factor(member, side) for side in ("in", "out"))
        off, shape = where[name]
        for b in range(len(ex.ids)):
            grad = torch.from_numpy(want[b, off:off + shape.numel()]).float().reshape(shape)
            block = (grad.T if p_out is None else p_out.T @ grad.T)
            block = block if p_in is None else block @ p_in
            np.testing.assert_allclose(got[b, start + member.start:start + member.stop], block.reshape(-1).numpy(),
                                       rtol=1e-4, atol=1e-5 * float(block.abs().max()))


@pytest.mark.parametrize("lora_rank", [None, 2])
def test_training_killed_after_a_saved_state_resumes_to_the_same_weights(lm, tmp_path, lora_rank):
    class Killed(Exception):
        pass

    class StopAfter(TrainState):
        def step_done(self, step: int) -> None:
            super().step_done(step)
            if step == 5:
                raise Killed

    folder, data = lm
    ds = load_dataset(data)
    config = ADAPTER.default_model_config(ds, base=folder, lora_rank=lora_rank, model_options={"seq_len": SEQ})
    recipe = ADAPTER.train_config({"steps": 8, "batch_size": 8, "lr": 1e-2, "seed": 1})
    whole = ADAPTER.train(config, ds, recipe, progress=False)
    key = {"run": "lm"}
    with pytest.raises(Killed):
        ADAPTER.train(config, ds, recipe, progress=False, resume=StopAfter(tmp_path / "state.pt", key, every="3"))
    again = TrainState(tmp_path / "state.pt", key, every="3")
    resumed = ADAPTER.train(config, ds, recipe, progress=False, resume=again)
    assert again.resumed_from == 3
    assert model_fingerprint(resumed) == model_fingerprint(whole)
    np.testing.assert_array_equal(resumed.train_log["losses"], whole.train_log["losses"])


def test_tokenizer_fingerprint_ignores_only_the_keys_of_the_loading_call(lm, tmp_path):
    """A tokenizer loaded and saved again gains "is_local"/"local_files_only" in tokenizer_config.json: the same
    tokenizer, the same fingerprint; any other change to the file changes it."""
    import json
    import shutil

    from gradtrace.adapters.causal_lm.folder import tokenizer_fingerprint

    folder, _ = lm
    want = tokenizer_fingerprint(folder)
    for name, edit in (("loaded", {"is_local": True, "local_files_only": False}), ("other", {"model_max_length": 7})):
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        config = json.loads((copy / "tokenizer_config.json").read_text())
        config.update(edit)
        (copy / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        assert (tokenizer_fingerprint(copy) == want) == (name == "loaded")
