"""Featurization cost of a causal LM against the forward + backward floor (same run): the `build-lm` GPT-2 (2 blocks,
width 64, context 64) on the first 256 fortunes at 64 tokens, block groups, --dim 4096, the default projection and
Kronecker, for the full model and a rank-4 LoRA adapter; one torch thread; each rate the best of 3 passes after a
warm-up (the machine is shared).

    python bench/bench_lm_featurize.py [--out bench_out/lm_featurize]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from gradtrace.adapters import get_adapter
from gradtrace.adapters.base import Checkpoint
from gradtrace.adapters.causal_lm.train import batch_loss
from gradtrace.data import load_dataset
from gradtrace.features.featurize import FeatureSpec, featurizer_for
from gradtrace.pipeline.build_lm import BuildLMSpec, build_lm_run

N, CHUNK, REPEATS = 256, 64, 3


def best_of(fn, repeats: int = REPEATS) -> float:
    """The shortest of `repeats` timed calls (the machine is shared: the least disturbed pass)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(out: str, *, n: int = N, dim: int = 4096, log=print) -> list[dict]:
    """One row per (full model | LoRA r=4) x projection: sequences/s, the forward+backward floor and their ratio."""
    torch.set_num_threads(1)
    adapter = get_adapter("causal-lm")
    base = build_lm_run(BuildLMSpec(out=f"{out}/base"), progress=False)
    ds = load_dataset("fortunes")
    source = {"kind": "dataset", "spec": "fortunes", "n": None, "size": None, "seed": 0}
    rows = []
    for lora in (None, 4):
        config = adapter.default_model_config(ds, base=base, lora_rank=lora)
        model = adapter.build(config, seed=0)
        with torch.no_grad():  # off the initialisation (LoRA's B starts at zero)
            gen = torch.Generator().manual_seed(0)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        ex = adapter.examples(config, source, ids=np.arange(n))
        ckpt = Checkpoint(model=model, config={"model_config": config}, fingerprint="bench", path=base)
        def floor_pass():
            for s in range(0, n, CHUNK):
                model.zero_grad()
                batch_loss(model, ex.images[s:s + CHUNK], torch.as_tensor(ex.cond[s:s + CHUNK])).backward()

        batch_loss(model, ex.images[:4], torch.as_tensor(ex.cond[:4])).backward()  # warm-up, as the featurizers'
        floor = n / best_of(floor_pass)
        for projection in ("rademacher", "kronecker"):
            spec = FeatureSpec(groups="block", projection=projection, total_dim=dim)
            featurizer, _ = featurizer_for(adapter, ckpt, spec)
            featurizer.features(ex.images[:4], ex.ids[:4], ex.cond[:4])  # warm-up (and the Kronecker self-check)
            rate = n / best_of(lambda: [featurizer.features(ex.images[s:s + CHUNK], ex.ids[s:s + CHUNK],
                                                            ex.cond[s:s + CHUNK]) for s in range(0, n, CHUNK)])
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row = {"model": "LoRA r=4" if lora else "full model", "params": params, "projection": projection,
                   "sequences_per_s": round(rate, 1), "floor_per_s": round(floor, 1), "ratio": round(floor / rate, 2)}
            log(f"{row['model']} ({params} parameters), {projection}: {rate:.0f} sequences/s; forward+backward "
                f"{floor:.0f}/s; ratio {floor / rate:.1f}")
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/lm_featurize")
    args = parser.parse_args()
    measure(args.out, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
