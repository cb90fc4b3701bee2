"""A model folder written by `save_pretrained`: what it is, loading it once per process, and its fingerprints.

- an LM folder: transformers' config.json (a "model_type", no gradtrace manifest) with the weights and the
  tokenizer files beside them (`AutoModelForCausalLM` / `AutoTokenizer` read it);
- a peft adapter folder: adapter_config.json + adapter_model.safetensors, whose "base_model_name_or_path" is the
  LM folder it was trained on (a local folder: nothing is downloaded).

The base fingerprint is over the model's parameters (names, dtypes, shapes, bytes); the tokenizer fingerprint is
over the tokenizer files' names and bytes. Both are recorded in every model config, so a changed base or
tokenizer is refused by later stages.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from gradtrace.adapters.checkpoint import json_without_keys, model_fingerprint
from gradtrace.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.txt")
PEFT_CONFIG = "adapter_config.json"
LOAD_KEYS = ("is_local", "local_files_only")  # tokenizer_config.json keys that record how it was loaded


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def is_lm_folder(path) -> bool:
    """True for a transformers model folder (config.json with a model_type, not a gradtrace manifest)."""
    config = _json(Path(path) / "config.json")
    return bool(config) and "model_type" in config and "format" not in config and "_class_name" not in config


def is_peft_folder(path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file() and not (Path(path) / "config.json").is_file()


def peft_base(path) -> Path:
    """The local base LM folder a peft adapter folder names."""
    config = _json(Path(path) / PEFT_CONFIG) or {}
    base = config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir() or not is_lm_folder(base):
        raise UserError(f"the LoRA adapter in {path} names base model {base!r}, which is not a local model folder; "
                        f"set \"base_model_name_or_path\" in its {PEFT_CONFIG} to the folder it was trained on")
    return Path(base).resolve()


def tokenizer_fingerprint(path) -> str:
    """sha256 over the names and bytes of the tokenizer files of a model folder (refused when it has none)."""
    root = Path(path)
    files = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
    if not files:
        raise UserError(f"{root} has no tokenizer (no {', '.join(TOKENIZER_FILES[:4])}); save the tokenizer with "
                        "tokenizer.save_pretrained(folder) beside the model")
    h = hashlib.sha256(b"gradtrace.tokenizer.v1\n")
    for file in files:
        h.update(file.name.encode() + b"\n")
        h.update(_tokenizer_bytes(file))
    return h.hexdigest()


def _tokenizer_bytes(file: Path) -> bytes:
    """A tokenizer file's bytes; tokenizer_config.json without the arguments of the call that loaded the tokenizer
    (`is_local`, `local_files_only`: transformers saves them once a loaded tokenizer is saved again), written as
    transformers writes it, so a tokenizer saved from memory has the fingerprint of the folder it was loaded from."""
    data = file.read_bytes()
    if file.name != "tokenizer_config.json":
        return data
    return json_without_keys(data, LOAD_KEYS, ensure_ascii=False)


def files_state(path) -> str:
    """A key that changes when any file of the folder changes (name, size, mtime)."""
    root = Path(path).resolve()
    entries = sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in root.rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([str(root), entries]).encode()).hexdigest()


@dataclass
class Base:
    """A loaded LM folder: the model (eval mode, eager attention), its tokenizer and fingerprints."""

    lm: object
    tokenizer: object
    path: Path
    fingerprint: str
    tokenizer_fingerprint: str

    @property
    def context(self) -> int:
        config = self.lm.config
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 1024


def quiet_transformers() -> None:
    """gradtrace shows its own progress (tqdm, --no-progress): no loading bars or advice from transformers."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_base(path) -> Base:
    """Load an LM folder (model + tokenizer); anything that is not one is refused in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"model folder not found: {root}; pass a folder saved with save_pretrained")
    if not is_lm_folder(root):
        raise UserError(f"{root} is not a transformers model folder (its config.json has no model_type); pass a "
                        "folder saved with model.save_pretrained")
    root = root.resolve()
    tok_fp = tokenizer_fingerprint(root)
    try:
        lm = AutoModelForCausalLM.from_pretrained(root, attn_implementation="eager", use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(root)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the causal language model in {root} ({first}); pass a folder saved with "
                        "save_pretrained (an AutoModelForCausalLM and its tokenizer)") from None
    lm.eval()
    lm.requires_grad_(False)
    return Base(lm=lm, tokenizer=tokenizer, path=root, fingerprint=model_fingerprint(lm), tokenizer_fingerprint=tok_fp)
