"""Text into fixed-length token sequences: one sequence per document, right-padded, with its length.

Each document is tokenized with the model folder's tokenizer (its own special tokens, e.g. a BOS), truncated to
`seq_len` tokens, and ends with the EOS token when it fits; shorter ones are right-padded (pad token, else EOS,
else 0). The length of each sequence travels as the examples' conditioning, so the loss masks every padded
position (labels −100 in the Hugging Face convention) and, the model being causal and the padding on the right,
no real token ever attends to padding. A document of fewer than 2 tokens has no next-token loss and is refused.
"""
from __future__ import annotations

import numpy as np
import torch

from gradtrace.errors import UserError

MIN_TOKENS = 2


def check_seq_len(seq_len, context: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_TOKENS:
        raise UserError(f"sequence length must be an integer >= {MIN_TOKENS} (a next-token loss needs two tokens), "
                        f"got {seq_len!r}; set \"seq_len\" in --model-options")
    if seq_len > context:
        raise UserError(f"sequence length {seq_len} is longer than the model's context ({context} positions); "
                        f"set \"seq_len\" <= {context} in --model-options")
    return seq_len


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def tokenize(tokenizer, texts: list[str], seq_len: int, ids=None) -> tuple[torch.Tensor, np.ndarray]:
    """(input_ids (N, seq_len) long, lengths (N,) int64) of the documents (see the module docstring)."""
    if tokenizer is None:
        raise UserError("the model folder has no tokenizer; save it with tokenizer.save_pretrained(folder)")
    texts = list(texts)
    ids = np.arange(len(texts)) if ids is None else np.asarray(ids)
    out = torch.full((len(texts), seq_len), pad_id(tokenizer), dtype=torch.long)
    lengths = np.zeros(len(texts), dtype=np.int64)
    if not texts:
        return out, lengths
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    for k, seq in enumerate(encoded):
        seq = list(seq)
        if eos is not None and len(seq) < seq_len and (not seq or seq[-1] != eos):
            seq.append(int(eos))
        if len(seq) < MIN_TOKENS:
            raise UserError(f"document id {int(ids[k])} has {len(seq)} token after tokenization; a sequence needs "
                            f"at least {MIN_TOKENS} tokens for a next-token loss: drop empty documents")
        out[k, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        lengths[k] = len(seq)
    return out, lengths
