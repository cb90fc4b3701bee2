"""A small GPT-2 made from a config, with a byte-level BPE tokenizer trained locally on a corpus (`tokenizers`),
both saved with `save_pretrained` so that the same loading code reads it and a user's model folder.

    folder = save_small_gpt2(out, texts, vocab_size=512, layers=2, dim=64, heads=4, context=64, seed=0)

The weights are GPT-2's initialisation drawn from `seed` (the global RNG is left as it was), dropout off; the
tokenizer's only special token is "<|endoftext|>" (BOS, EOS and padding, as GPT-2's). Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gradtrace.adapters.causal_lm.folder import quiet_transformers
from gradtrace.errors import UserError

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A GPT-2-style fast tokenizer (byte-level BPE) trained on `texts`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise UserError("no texts to train the tokenizer on; pass a corpus with at least one document")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=int(vocab_size), min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   pad_token=EOS, model_max_length=1_000_000)


def small_gpt2(vocab_size: int, eos_id: int, *, layers: int, dim: int, heads: int, context: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    if dim % heads:
        raise UserError(f"the model width {dim} is not divisible by the number of heads {heads}; change one")
    config = GPT2Config(vocab_size=int(vocab_size), n_positions=int(context), n_embd=int(dim), n_layer=int(layers),
                        n_head=int(heads), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id,
                        eos_token_id=eos_id, pad_token_id=eos_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = GPT2LMHeadModel(config)
    return model.eval()


def save_small_gpt2(out, texts: list[str], *, vocab_size: int = 512, layers: int = 2, dim: int = 64, heads: int = 4,
                    context: int = 64, seed: int = 0) -> dict:
    """Write the tokenizer and the model into `out` (save_pretrained); returns what was built."""
    quiet_transformers()
    tokenizer = train_tokenizer(texts, vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    model = small_gpt2(len(tokenizer), eos_id, layers=layers, dim=dim, heads=heads, context=context, seed=seed)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"vocab_size": len(tokenizer), "n_parameters": sum(p.numel() for p in model.parameters()),
            "architecture": "GPT2LMHeadModel"}
