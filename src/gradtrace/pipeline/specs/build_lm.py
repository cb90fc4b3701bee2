"""The build-lm stage's spec: the small GPT-2 and its tokenizer."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive


@dataclass
class BuildLMSpec(Spec):
    data: str = option("fortunes", "corpus the tokenizer is trained on: fortunes | jsonl:PATH | textfolder:PATH")
    out: str = option(None, "model folder to write", required=True)
    n: int | None = option(None, "use the first N documents of the corpus", type=int, check=positive)
    vocab_size: int = option(512, "tokenizer vocabulary size (byte-level BPE)", check=positive)
    layers: int = option(2, "transformer blocks", check=positive)
    dim: int = option(64, "model width", check=positive)
    heads: int = option(4, "attention heads", check=positive)
    context: int = option(64, "context length (positions)", check=positive)
    seed: int = option(0, "seed of the initial weights")

    def validate(self) -> None:
        if self.vocab_size < 260:
            raise UserError(f"--vocab-size must be >= 260 (256 bytes and the end-of-text token), got {self.vocab_size}")
        if self.context < 2:
            raise UserError(f"--context must be >= 2 (a next-token loss needs two tokens), got {self.context}")
