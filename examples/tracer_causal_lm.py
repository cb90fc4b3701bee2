"""A causal language model in memory, attributed in a few lines: a tiny GPT-2 made from a config with its own
tokenizer (trained here on a handful of sentences, as a stand-in for `AutoModelForCausalLM.from_pretrained(...)`),
its training texts as a plain list, and for each query text the training texts that most support it (TRAK).

    python examples/tracer_causal_lm.py [OUT_DIR]        # seconds on two CPU cores

Every name used here is documented in the README ("Library use"); the test suite runs this file and checks its
answer against the command line's on the same weights and data.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import gradtrace

ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse"]
PLACES = ["on the mat", "in the garden", "under the tree", "by the river", "near the house", "at the door"]
TEXTS = [f"The {a} sat {p}." for a in ANIMALS for p in PLACES]  # 36 training texts
QUERIES = ["The dog sat by the river.", "A bird sat under the tree.", "The mouse was near the house."]


def tiny_gpt2(texts: list[str]):
    """(model, tokenizer): a 2-layer GPT-2 from a config and a byte-level BPE tokenizer trained on `texts`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config), tokenizer


def main(out: Path):
    model, tokenizer = tiny_gpt2(TEXTS)
    tracer = gradtrace.Tracer(model, train=TEXTS, tokenizer=tokenizer, store=out / "store", progress=False)
    result = tracer.attribute(QUERIES, method="trak", top_k=3)  # in Jupyter, `result` shows itself as a table
    for row in result.records():
        print(f"{row['query_text']!r} #{row['rank']}: {row['train_text']!r} ({row['score']:.4g})")
    return model, tokenizer, result


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gradtrace-example-")))
