"""Causal language models (any `transformers` AutoModelForCausalLM folder saved with `save_pretrained`, optionally
with a peft LoRA adapter) as a model adapter (`causal-lm`): loading and fingerprints (`folder.py`), the model as
gradtrace differentiates it (`model.py`), tokenization into fixed-length sequences (`tokens.py`), the per-sequence
token-loss measurements (`objective.py`), the `block` group preset (`groups.py`), training (`train.py`), a small
GPT-2 and its tokenizer built from a corpus (`build.py`) and the adapter itself (`adapter.py`).

Nothing here is imported until a stage asks for the adapter (transformers takes seconds to import)."""
