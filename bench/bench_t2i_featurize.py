"""Featurization cost of a text-to-image LoRA fine-tune: LoRA-only per-example features against the
forward+backward floor of the same pipeline, and against full-UNet features of the base pipeline.

    .venv/bin/python bench/bench_t2i_featurize.py --out bench_out/t2i_featurize [--pipeline PIPE]

Each configuration runs in its own process (peak RSS is per process), torch on one thread, on the same N
training images × T timesteps; rates are examples × timesteps per CPU second of the process (one thread, so
robust to other jobs on shared cores; wall time is reported too) and ratios are against the floor measured
in the same run: one ordinary batched forward + backward of the LoRA model over the same rows
(what training costs, and what no per-example method can beat).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import peak_rss_mb
from gradtrace.adapters import get_adapter
from gradtrace.features.featurize import FeatureSpec, featurize, featurizer_for
from gradtrace.io import versions, write_json_atomic
from gradtrace.pipeline import TrainSpec, train_run
from gradtrace.pipeline.build_pipeline import BuildPipelineSpec, build_pipeline_run

CONFIGS = ("floor", "lora", "full-unet")


def worker(config: str, checkpoint: str, n: int, T: int, chunk: int, out: Path) -> dict:
    torch.set_num_threads(1)
    adapter = get_adapter("diffusers")
    ckpt = adapter.load(checkpoint)
    source = {"kind": "dataset", "spec": "shapes", "n": n, "size": None, "seed": 0}
    ex = adapter.examples(ckpt.model_config, source, cache_dir=out / "cache")
    spec = FeatureSpec(projection="rademacher", total_dim=2048, num_timesteps=T, chunk_rows=chunk)
    featurizer, _ = featurizer_for(adapter, ckpt, spec)
    rss0 = peak_rss_mb()
    start, cpu0 = time.perf_counter(), time.process_time()
    if config == "floor":
        model, objective = ckpt.model, featurizer.objective
        params = [p for p in model.parameters() if p.requires_grad]
        for s in range(0, n, chunk):
            total = objective.batch_total(model, ex.images[s:s + chunk], ex.ids[s:s + chunk], ex.cond[s:s + chunk])
            torch.autograd.grad(total, params)
        k = 0
    else:
        store = featurize(featurizer, ex.images, ex.ids, out / f"store-{config}", spec=spec, cond=ex.cond,
                          model_fingerprint=ckpt.fingerprint, overwrite=True, progress=False)
        k = store.features.shape[1]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    trainable = sum(p.numel() for p in ckpt.model.parameters() if p.requires_grad)
    return {"config": config, "wall_s": wall, "cpu_s": cpu, "rows": n * T, "k": int(k),
            "trainable_params": int(trainable), "peak_rss_mb": peak_rss_mb(), "pre_rss_mb": rss0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/t2i_featurize")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--pipeline", default=None, help="an existing base pipeline folder (default: build one in --out)")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.n, args.timesteps, args.chunk, out)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    pipe = args.pipeline or build_pipeline_run(BuildPipelineSpec(out=str(out / "pipe")), progress=False)
    lora = train_run(TrainSpec(data="shapes", n=args.n, base=str(pipe), lora_rank=4, steps=100, batch_size=16,
                               out=str(out / "lora"), overwrite=True), progress=False)
    rows = []
    for config in CONFIGS:
        checkpoint = str(pipe if config == "full-unet" else lora)
        cmd = [sys.executable, __file__, "--out", str(out), "--n", str(args.n), "--timesteps", str(args.timesteps),
               "--chunk", str(args.chunk), "--worker", config, checkpoint]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["rate"] = res["rows"] / res["cpu_s"]
        rows.append(res)
        print(f"{config}: {res['rate']:.1f} examples x timesteps / s, peak RSS {res['peak_rss_mb']:.0f} MB",
              file=sys.stderr)
    floor, floor_rss = rows[0]["cpu_s"], rows[0]["peak_rss_mb"]
    for r in rows:
        r["time_vs_floor"] = r["cpu_s"] / floor
        r["rss_vs_floor"] = r["peak_rss_mb"] / floor_rss
    doc = {"settings": vars(args), "rows": rows, "versions": versions(), "command": " ".join(["python", *sys.argv]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(out / "results.json", doc)
    lines = ["| config | trainable params | k | ex·timesteps / CPU s | CPU time vs floor | wall s | peak RSS MB | "
             "RSS vs floor |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['trainable_params']:,} | {r['k'] or '-'} | {r['rate']:.1f} | "
                     f"{r['time_vs_floor']:.2f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_vs_floor']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
