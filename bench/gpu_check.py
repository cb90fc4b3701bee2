"""The GPU check: one script for a machine with a CUDA GPU (`make gpu-check`, about 8 minutes), and every step tiny
on the CPU with `--dry-run` (a test runs that, so the script cannot rot).

    .venv/bin/python bench/gpu_check.py --out bench_out/gpu_check --write-docs   # on the GPU machine
    .venv/bin/python bench/gpu_check.py --dry-run --out /tmp/gpu_check             # CPU, seconds

Steps, each timed, all written to OUT/results.json and printed as a table:

1. featurize  a small digits UNet trained here; its training set featurized on the CPU in float32 and on the device
              in float32 and bfloat16 compute (rademacher projection, the one with a bfloat16 path): cosine per
              example against the CPU rows (target: float32 >= 0.999 for every example).
2. lora       a text-to-image LoRA fine-tune on the device (a small pipeline built here, then LoRA steps).
3. cifar      bench/bench_featurize_cifar.py on the device: Kronecker featurization of the ddpm-cifar10 UNet
              against the device's own forward+backward floor (its table is copied into the results).
4. scoring    N x 8,192 float16 training features made on the device (N = 1,000,000: 16 GiB), 1,000 queries,
              top-100 with torch in row chunks: the device's scoring time and its own plain-matmul floor. (The
              library scores on the CPU; this measures what a device path would be held against.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, write_docs

HEADING = "GPU check"
TARGET = 0.999


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def featurize_check(out: Path, device: str, tiny: bool) -> dict:
    from gradtrace.features.store import FeatureStore
    from gradtrace.pipeline import FeaturizeSpec, TrainSpec, featurize_run, train_run

    n = 16 if tiny else 256
    run = train_run(TrainSpec(data="digits", n=n, steps=5 if tiny else 200, batch_size=16, out=str(out / "digits")),
                    progress=False)
    res, rows = {"n": n}, {}
    for where, dtype in (("cpu", "float32"), (device, "float32"), (device, "bfloat16")):
        t = time.perf_counter()
        store = featurize_run(FeaturizeSpec(checkpoint=str(run), out=str(out / f"feat-{where}-{dtype}"),
                                            projection="rademacher", dim=256 if tiny else 2048,
                                            timesteps=2 if tiny else 10, device=where, dtype=dtype, overwrite=True),
                              progress=False)
        res[f"{where}_{dtype}_s"] = round(time.perf_counter() - t, 2)
        rows[where, dtype] = np.asarray(FeatureStore.open(store.path).features, np.float64)
    a = rows["cpu", "float32"]
    for dtype in ("float32", "bfloat16"):
        b = rows[device, dtype]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        res[f"cosine_{dtype}"] = {"min": float(cos.min()), "mean": float(cos.mean())}
    res["float32_target_met"] = bool(res["cosine_float32"]["min"] >= TARGET)
    return res


def lora_check(out: Path, device: str, tiny: bool) -> dict:
    from gradtrace.pipeline import TrainSpec, train_run
    from gradtrace.pipeline.build_pipeline import BuildPipelineSpec, build_pipeline_run

    pipe = build_pipeline_run(BuildPipelineSpec(out=str(out / "pipe"), n=16 if tiny else 64, vae_steps=2 if tiny
                                                else 100, unet_steps=2 if tiny else 100, batch_size=8),
                              progress=False)
    steps = 2 if tiny else 100
    t = time.perf_counter()
    train_run(TrainSpec(data="shapes", n=16 if tiny else 64, base=str(pipe), lora_rank=4, steps=steps, batch_size=8,
                        out=str(out / "lora"), device=device), progress=False)
    wall = time.perf_counter() - t
    return {"steps": steps, "wall_s": round(wall, 2), "s_per_step_incl_setup": round(wall / steps, 4)}


def cifar_check(out: Path, device: str, tiny: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_featurize_cifar.py"), "--device", device,
           "--configs", "floor", "kron" if tiny else "kron8k", "--n", "2" if tiny else "64", "--T", "1",
           "--dim", "256", "--chunk", "2" if tiny else "16", "--timeout", "600"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bench_featurize_cifar.py failed:\n{proc.stderr[-3000:]}")
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    return {"command": " ".join(cmd[1:]), "table": table}


def scoring_check(device: torch.device, n: int, k: int, q: int, top: int, chunk: int = 65536) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    phi = torch.empty((n, k), dtype=torch.float16, device=device)
    for s in range(0, n, chunk):  # N(0, 1) rows, made on the device: no 16 GiB transfer
        phi[s:s + chunk] = torch.randn((min(chunk, n - s), k), generator=gen, device=device).half()
    queries = torch.randn((q, k), generator=gen, device=device).half()

    def floor():
        for s in range(0, n, chunk):
            queries @ phi[s:s + chunk].T

    def scoring():
        vals = torch.empty((q, 0), device=device, dtype=torch.float32)
        idx = torch.empty((q, 0), device=device, dtype=torch.int64)
        for s in range(0, n, chunk):
            block = (queries @ phi[s:s + chunk].T).float()
            v, i = torch.topk(block, min(top, block.shape[1]), dim=1)
            vals, order = torch.topk(torch.cat([vals, v], 1), min(top, vals.shape[1] + v.shape[1]), dim=1)
            idx = torch.gather(torch.cat([idx, i + s], 1), 1, order)
        return idx

    res = {"n": n, "k": k, "queries": q, "top": top}
    for name, fn in (("floor", floor), ("topk", scoring)):
        fn()  # warm-up
        sync(device)
        t = time.perf_counter()
        got = fn()
        sync(device)
        res[f"{name}_s"] = round(time.perf_counter() - t, 4)
    exact = (queries[:4].float() @ phi.float().T).topk(top, dim=1).values  # the first queries, in float32
    mine = torch.gather((queries[:4] @ phi.T).float(), 1, got[:4])
    res["top_scores_max_rel_error"] = float(((mine - exact).abs().max() / exact.abs().max()).item())
    res["ratio"] = round(res["topk_s"] / res["floor_s"], 3)
    if device.type == "cuda":
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out/gpu_check")
    p.add_argument("--device", default=None, help="default: cuda (refused without a GPU unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="every step tiny, on the CPU unless --device says otherwise")
    p.add_argument("--steps", nargs="+", default=["featurize", "lora", "cifar", "scoring"])
    p.add_argument("--scoring-n", type=int, default=None, help="default 1,000,000 (dry run: 5,000)")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; run with --dry-run to check the script on the CPU",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = args.dry_run
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    results: dict = {"device": device, "device_name": name, "dry_run": tiny, "torch": torch.__version__,
                     "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"}
    start = time.perf_counter()
    for step in args.steps:
        t = time.perf_counter()
        if step == "featurize":
            results[step] = featurize_check(out, device, tiny)
        elif step == "lora":
            results[step] = lora_check(out, device, tiny)
        elif step == "cifar":
            results[step] = cifar_check(out, device, tiny)
        else:
            n = args.scoring_n or (5_000 if tiny else 1_000_000)
            results[step] = scoring_check(torch.device(device), n, 256 if tiny else 8192, 50 if tiny else 1000,
                                          10 if tiny else 100)
        results[step]["step_s"] = round(time.perf_counter() - t, 2)
        print(f"{step}: {results[step]}", file=sys.stderr, flush=True)
    results["total_s"] = round(time.perf_counter() - start, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = table(results, argv)
    print("\n".join(lines))
    if args.write_docs and not tiny:
        write_docs(lines, f"{HEADING} ({name})")
    return 0


def table(r: dict, argv) -> list[str]:
    cmd = " ".join([".venv/bin/python bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"Command: `{cmd}`", "", f"Date: {r['date']}; device: {r['device_name']}; torch {r['torch']}; "
             f"total {r['total_s']} s.", "", "| step | result | s |", "|---|---|---|"]
    if "featurize" in r:
        f = r["featurize"]
        lines.append(f"| featurize (n={f['n']}) | cosine vs CPU: float32 min {f['cosine_float32']['min']:.6f}, "
                     f"bfloat16 min {f['cosine_bfloat16']['min']:.4f} (mean {f['cosine_bfloat16']['mean']:.4f}) | "
                     f"{f['step_s']} |")
    if "lora" in r:
        lines.append(f"| LoRA fine-tune | {r['lora']['steps']} steps, {r['lora']['s_per_step_incl_setup']} s/step with "
                     f"setup | {r['lora']['step_s']} |")
    if "cifar" in r:
        lines.append(f"| CIFAR featurization | see the table below | {r['cifar']['step_s']} |")
    if "scoring" in r:
        s = r["scoring"]
        lines.append(f"| scoring {s['n']:,} x {s['k']:,} float16, Q={s['queries']}, top-{s['top']} | top-k "
                     f"{s['topk_s']} s = {s['ratio']} x the matmul floor ({s['floor_s']} s) | {s['step_s']} |")
    if "cifar" in r:
        lines += ["", f"`{r['cifar']['command']}`:", "", *r["cifar"]["table"]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
