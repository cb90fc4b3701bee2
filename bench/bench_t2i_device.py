"""The quick text-to-image path on a GPU, checked against the CPU: LoRA-only features, cosine per example.

    .venv/bin/python bench/bench_t2i_device.py --out bench_out/t2i_device

Builds a small pipeline (`gradtrace build-pipeline`, short pretraining), fine-tunes LoRA adapters on shapes
captions (CPU), featurizes the training images on the CPU in float32 and, when torch sees a GPU, again on
`cuda` in float32 (target: cosine >= 0.999 with the CPU row of every example) and in bfloat16 (`--dtype`,
reported beside it). Without a GPU it says so, writes that into results.json and measures nothing else.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gradtrace.features.store import FeatureStore
from gradtrace.io import versions, write_json_atomic
from gradtrace.pipeline import FeaturizeSpec, TrainSpec, featurize_run, train_run
from gradtrace.pipeline.build_pipeline import BuildPipelineSpec, build_pipeline_run

TARGET = 0.999


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/t2i_device")
    p.add_argument("--n", type=int, default=64, help="training images featurized")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.is_available(), "target_cosine": TARGET, "versions": versions(),
              "command": " ".join(["python", *sys.argv])}
    if not torch.cuda.is_available():
        print("no GPU present: torch.cuda.is_available() is False, so the CUDA check did not run", file=sys.stderr)
        write_json_atomic(out / "results.json", {**result, "status": "no GPU present; nothing measured"})
        return 0
    result["gpu_name"] = torch.cuda.get_device_name(0)
    start = time.perf_counter()
    pipe = build_pipeline_run(BuildPipelineSpec(out=str(out / "pipe"), vae_steps=200, unet_steps=200),
                              progress=False)
    run = train_run(TrainSpec(data="shapes", n=args.n, base=str(pipe), lora_rank=4, steps=100, batch_size=16,
                              out=str(out / "lora")), progress=False)
    stores = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        t = time.perf_counter()
        stores[device, dtype] = featurize_run(FeaturizeSpec(
            checkpoint=str(run), out=str(out / f"features-{device}-{dtype}"), projection="rademacher", dim=2048,
            timesteps=10, device=device, dtype=dtype, overwrite=True), progress=False)
        result[f"featurize_{device}_{dtype}_s"] = round(time.perf_counter() - t, 2)
    a = np.asarray(FeatureStore.open(stores["cpu", "float32"].path).features, np.float64)
    for dtype in ("float32", "bfloat16"):
        b = np.asarray(FeatureStore.open(stores["cuda", dtype].path).features, np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        result[f"cuda_{dtype}"] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    result.update(status="measured", n=int(len(a)), target_met=bool(result["cuda_float32"]["cosine_min"] >= TARGET),
                  total_s=round(time.perf_counter() - start, 1))
    write_json_atomic(out / "results.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "versions"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
