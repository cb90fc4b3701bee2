"""Causal language models as a model adapter (`causal-lm`).

Checkpoints: any folder a `transformers` AutoModelForCausalLM was saved to with `save_pretrained` (its tokenizer
beside it; every parameter is attributed), a peft LoRA adapter folder whose `base_model_name_or_path` is such a
local folder (the LoRA factors alone are attributed), or a gradtrace fine-tune: a manifest (config.json) beside
`model/` (a full fine-tune, itself a save_pretrained folder with its tokenizer) or `lora/` (a peft adapter folder),
naming its base folder and that base's and tokenizer's fingerprints. Examples are documents of a text dataset
(`jsonl:PATH`, `textfolder:PATH`, `fortunes`), tokenized with the base folder's tokenizer into right-padded
sequences of `seq_len` tokens whose lengths are the conditioning. Measurements: the per-sequence mean token loss
(`loss`, the default) and its sum (`loss_sum`); the LDS output is the query's mean loss under each retrained
model (a loss: negated for the LDS). Training fine-tunes the base (all of it, or a fresh LoRA adapter).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradtrace.adapters.base import Checkpoint, ModelAdapter, OutputGrid
from gradtrace.adapters.causal_lm.folder import Base, files_state, is_lm_folder, is_peft_folder, load_base, peft_base
from gradtrace.adapters.causal_lm.groups import PRESETS, block_key
from gradtrace.adapters.causal_lm.influence import linear_twin
from gradtrace.adapters.causal_lm.model import CausalLM, attach_lora, load_lora, lora_config_of, prepared_lm
from gradtrace.adapters.causal_lm.objective import MEASUREMENTS, LMObjective, sequence_losses
from gradtrace.adapters.causal_lm.tokens import check_seq_len, tokenize
from gradtrace.adapters.causal_lm.train import TrainConfig, train_lm
from gradtrace.adapters.checkpoint import FORMAT, model_fingerprint, read_manifest, start_checkpoint, write_manifest
from gradtrace.adapters.loop import select_rows
from gradtrace.data.sources import Examples, open_dataset
from gradtrace.data.text import TextDataset
from gradtrace.errors import UserError
from gradtrace.io import sha256_arrays

KIND = "causal-lm"
MODEL_DIR = "model"
LORA_DIR = "lora"
DEFAULT_SEQ_LEN = 128  # capped at the model's context
OPTIONS = ("seq_len", "lora_alpha", "lora_targets")


def text_dataset(ds, what: str) -> TextDataset:
    if not isinstance(ds, TextDataset):
        raise UserError(f"{what} is not text; a language model takes --data jsonl:PATH (a \"text\" column), "
                        "textfolder:PATH (one .txt file per document) or fortunes")
    return ds


class CausalLMAdapter(ModelAdapter):
    name = "causal-lm"
    measurements = MEASUREMENTS
    default_measurement = "loss"
    group_presets = PRESETS
    model_kinds = (KIND,)
    output_name = "mean token loss"
    output_is_loss = True
    train_devices = ("cpu", "cuda")

    def __init__(self):
        self._bases: dict[str, Base] = {}

    # ------------------------------------------------------------------ checkpoints
    def base(self, path) -> Base:
        """The LM folder's model and tokenizer, loaded once per process (again when its files change)."""
        if not Path(path).is_dir():
            raise UserError(f"model folder not found: {path}; pass a folder saved with save_pretrained")
        key = files_state(path)
        if key not in self._bases:
            self._bases[key] = load_base(path)
        return self._bases[key]

    def base_of(self, model_config: dict) -> Base:
        base = self.base(model_config["base"])
        if base.fingerprint != model_config["base_fingerprint"]:
            raise UserError(f"the base model {model_config['base']} changed since this model was made (fingerprint "
                            "differs); pass the base it was trained on, or train again")
        if base.tokenizer_fingerprint != model_config["tokenizer_fingerprint"]:
            raise UserError(f"the tokenizer of {model_config['base']} changed since this model was made; restore "
                            "it, or train again")
        return base

    def lm_config(self, base: Base, *, lora: dict | None, seq_len: int | None = None) -> dict:
        seq_len = min(DEFAULT_SEQ_LEN, base.context) if seq_len is None else seq_len
        return {"kind": KIND, "base": str(base.path), "base_fingerprint": base.fingerprint,
                "tokenizer_fingerprint": base.tokenizer_fingerprint,
                "model_type": str(getattr(base.lm.config, "model_type", "")), "lora": lora,
                "seq_len": check_seq_len(seq_len, base.context)}

    def build(self, model_config: dict, seed: int = 0) -> CausalLM:
        base = self.base_of(model_config)
        lm = prepared_lm(base.lm)
        if model_config.get("lora"):
            lm = attach_lora(lm, model_config["lora"], seed=seed)
        return CausalLM(lm, base.tokenizer, model_config)

    def load(self, path) -> Checkpoint:
        path = Path(path)
        if is_lm_folder(path) or is_peft_folder(path):
            base = self.base(peft_base(path) if is_peft_folder(path) else path)
            if is_peft_folder(path):
                config = self.lm_config(base, lora=lora_config_of(path))
                model = CausalLM(load_lora(prepared_lm(base.lm), path), base.tokenizer, config)
            else:
                config = self.lm_config(base, lora=None)
                model = CausalLM(prepared_lm(base.lm), base.tokenizer, config)
            manifest = {"format": FORMAT, "adapter": self.name, "fingerprint": model_fingerprint(model),
                        "model_config": config, "dataset": None, "train_ids": None}
        else:
            manifest = read_manifest(path)
            config = manifest["model_config"]
            base = self.base_of(config)
            if config.get("lora"):
                lm = load_lora(prepared_lm(base.lm), path / LORA_DIR)
            else:
                lm = self._load_full(path / MODEL_DIR)
            model = CausalLM(lm, base.tokenizer, config)
            if model_fingerprint(model) != manifest.get("fingerprint"):
                raise UserError(f"the weights in {path} do not match the fingerprint in its config.json; the files "
                                "were modified or mixed, train again")
        model.eval()
        ids = manifest.get("train_ids")
        model.train_ids = None if ids is None else np.asarray(ids, np.int64)
        return Checkpoint(model=model, config=manifest, fingerprint=manifest["fingerprint"], path=path)

    @staticmethod
    def _load_full(folder: Path):
        from transformers import AutoModelForCausalLM

        if not is_lm_folder(folder):
            raise UserError(f"checkpoint model folder missing or unfinished: {folder}; train again")
        try:
            lm = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot load the model in {folder} ({str(exc).splitlines()[0][:200]}); train again") \
                from None
        lm.eval()
        return lm

    def save(self, path, model: CausalLM, *, train_config, dataset_info, train_ids=None, extra=None) -> Path:
        path = start_checkpoint(path)
        if model.is_lora:
            model.lm.save_pretrained(path / LORA_DIR)
        else:
            model.lm.save_pretrained(path / MODEL_DIR)
            model.tokenizer.save_pretrained(path / MODEL_DIR)
        return write_manifest(path, model, fingerprint=model_fingerprint(model), train_config=train_config,
                              dataset_info=dataset_info, train_ids=train_ids, extra=extra, adapter=self.name)

    # ------------------------------------------------------------------ groups and measurements
    def group_key(self, preset: str):
        return block_key if preset == "block" else None

    def objective(self, checkpoint: Checkpoint, measurement: str, repeats: int, seed: int) -> LMObjective:
        return LMObjective(measurement)

    def influence_model(self, checkpoint: Checkpoint) -> CausalLM:
        """The model with its trainable Conv1D layers as nn.Linear (`influence.py`), for EK-FAC."""
        model = checkpoint.model
        twin = CausalLM(linear_twin(model.lm), model.tokenizer, model.config)
        twin.train_ids = model.train_ids
        return twin.eval()

    # ------------------------------------------------------------------ data
    def tokens(self, model_config: dict, texts: list[str], ids) -> tuple[torch.Tensor, np.ndarray]:
        return tokenize(self.base_of(model_config).tokenizer, texts, int(model_config["seq_len"]), ids)

    def examples(self, model_config: dict, source: dict, ids=None, cache_dir=None) -> Examples:
        """Documents of a text source as token sequences (N, seq_len); the conditioning is each one's length."""
        if source.get("kind") != "dataset":
            raise UserError("a language model attributes text documents, not generated samples; pass --data "
                            "jsonl:PATH, textfolder:PATH or fortunes")
        want = source.get("tokenizer_fingerprint")
        if want is not None and want != model_config["tokenizer_fingerprint"]:
            raise UserError("these examples were tokenized with another tokenizer than the model's; featurize them "
                            "again with this model")
        ds = text_dataset(open_dataset(source), f"dataset '{source.get('spec')}'")
        if ids is not None:
            ds = ds.subset(np.asarray(ids, dtype=np.int64))
        tokens, lengths = self.tokens(model_config, ds.texts, ds.ids)
        record = {k: source.get(k) for k in ("kind", "spec", "n", "size", "seed")}
        record.update(ids_sha256=sha256_arrays([ds.ids]), fingerprint=ds.fingerprint(),
                      tokenizer_fingerprint=model_config["tokenizer_fingerprint"], seq_len=int(model_config["seq_len"]))
        captions = [" ".join(t.split())[:80] for t in ds.texts]
        return Examples(images=tokens, ids=ds.ids, cond=lengths, captions=captions, source=record, texts=ds.texts)

    # ------------------------------------------------------------------ training
    def default_model_config(self, dataset, kind: str = "auto", base=None, lora_rank=None, model_options=None) -> dict:
        """Fine-tune the LM folder `base` (all of it, or LoRA adapters of rank `lora_rank`) on text; options:
        seq_len (default min(128, the model's context)), lora_alpha (default the rank), lora_targets."""
        text_dataset(dataset, f"dataset '{getattr(dataset, 'name', '?')}'")
        if base is None:
            raise UserError("a language model is trained from a model folder: pass --base FOLDER (saved with "
                            "save_pretrained; `gradtrace build-lm` makes a small GPT-2)")
        options = dict(model_options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise UserError(f"unknown language-model setting(s) {unknown} in --model-options; valid: "
                            f"{', '.join(OPTIONS)}")
        if lora_rank is None and ("lora_alpha" in options or "lora_targets" in options):
            raise UserError("lora_alpha and lora_targets set LoRA adapters; pass --lora-rank R too")
        alpha, targets = options.get("lora_alpha", lora_rank), options.get("lora_targets")
        if lora_rank is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
            raise UserError(f"lora_alpha must be a positive number, got {alpha!r}")
        if targets is not None and not (isinstance(targets, str) or (
                isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
            raise UserError(f"lora_targets must be a list of module names (or \"all-linear\"), got {targets!r}")
        lora = None if lora_rank is None else {"rank": int(lora_rank), "alpha": float(alpha), "targets": targets}
        return self.lm_config(self.base(base), lora=lora, seq_len=options.get("seq_len"))

    def train_config(self, values: dict | None) -> TrainConfig:
        return TrainConfig.from_dict(values)

    def train(self, model_config: dict, dataset, train_config, ids=None, progress: bool = True, resume=None,
              device: torch.device | None = None) -> CausalLM:
        cfg = TrainConfig.from_dict(train_config)
        dataset = text_dataset(dataset, f"dataset '{getattr(dataset, 'name', '?')}'")
        rows = select_rows(dataset, ids)
        tokens, lengths = self.tokens(model_config, [dataset.texts[int(r)] for r in rows], dataset.ids[rows])
        model = self.build(model_config, seed=cfg.seed)
        model.train_log = train_lm(model, tokens, lengths, cfg, progress=progress, resume=resume, device=device)
        model.train_ids = None if ids is None else np.sort(np.asarray(ids, dtype=np.int64))
        return model

    # ------------------------------------------------------------------ evaluation
    def outputs(self, checkpoint: Checkpoint, examples: Examples, grid: OutputGrid) -> np.ndarray:
        """Each query's mean token loss under the checkpoint's model (deterministic: the grid is not used)."""
        return sequence_losses(checkpoint.model, examples.images, examples.cond)
