"""The build-lm stage: a small GPT-2 (fresh weights from a config) and a byte-level BPE tokenizer trained on a text
corpus, saved with `save_pretrained` into one model folder (or reused, when `out` already holds an identical
build).

    build_lm_run(BuildLMSpec(out="runs/lm-base"))      # fortunes, 2 layers × 64 wide, context 64: seconds

The folder is an ordinary transformers folder (config.json, model.safetensors, tokenizer.json, ...): `gradtrace
train --base` fine-tunes it on text (that is training from scratch, the weights being fresh) and every command
that takes a user's model folder takes it. `gradtrace_build.json` beside it records the spec, the command, the
corpus fingerprint and the versions; it is written last, so it marks a finished build.
"""
from __future__ import annotations

from pathlib import Path

from gradtrace.adapters.causal_lm.build import save_small_gpt2
from gradtrace.data.sources import dataset_source, open_dataset
from gradtrace.data.text import TextDataset
from gradtrace.errors import UserError
from gradtrace.io import check_can_write, command_line, versions, write_json_atomic
from gradtrace.pipeline.build_manifest import MANIFEST, finished_build
from gradtrace.pipeline.specs.build_lm import BuildLMSpec

FORMAT = "gradtrace-built-lm"


def build_lm_run(spec: BuildLMSpec, *, progress: bool = True) -> Path:
    out = Path(spec.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the model folder")
    dataset = open_dataset(dataset_source(spec.data, n=spec.n))
    if not isinstance(dataset, TextDataset):
        raise UserError(f"--data {spec.data} is not text; pass fortunes, jsonl:PATH or textfolder:PATH")
    info = dataset.info()
    if _cached(out, spec, info):
        return out
    check_can_write(out)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()
    built = save_small_gpt2(out, dataset.texts, vocab_size=spec.vocab_size, layers=spec.layers, dim=spec.dim,
                            heads=spec.heads, context=spec.context, seed=spec.seed)
    write_json_atomic(out / MANIFEST, {"format": FORMAT, "spec": spec.to_dict(), "command": command_line(),
                                       "dataset": info, "built": built, "versions": versions()})
    return out


def _cached(out: Path, spec: BuildLMSpec, info: dict) -> bool:
    return finished_build(out, FORMAT, "config.json", spec, info, ("fingerprint",))
