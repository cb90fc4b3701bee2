"""Featurization at CIFAR scale: the CIFAR-10 DDPM UNet (35.7M parameters, 3x32x32), examples x timesteps per
second and peak memory of the forward+backward floor, gradtrace's vmap and Kronecker paths, traker and dattri.

    .venv/bin/python bench/bench_featurize_cifar.py                  # CPU: N=16, T=1, chunks of 8 (peers: N=8)
    .venv/bin/python bench/bench_featurize_cifar.py --write-docs     # also replace its section in docs/benchmarks.md
    .venv/bin/python bench/bench_featurize_cifar.py --n 256 --peer-n 64 --chunk 32 --T 10   # on a GPU

The device is CUDA when torch sees one, else the CPU (the output says which). The model is the `ddpm-cifar10`
config with random weights (throughput does not depend on training); the examples are seeded random images.
Each configuration runs in its own subprocess (so its peak memory is its own) and reports wall time, process CPU
time, peak RSS (VmHWM) and, on CUDA, torch.cuda.max_memory_allocated:

    floor   ordinary training forward+backward of the same (chunk·T)-row batches (parameter gradients)
    vmap    gradtrace, torch.func per-example gradients + per-group Rademacher projection, drawn blockwise
    kron    gradtrace, Kronecker (LoGra-style) projection from one batched forward/backward, k = --dim
    kron8k  the same at k = --dim-large
    traker  traker.TRAKer with its BasicProjector (Rademacher), k = --dim
    dattri  dattri TRAKAttributor.cache (its BasicProjector on the CPU), the same loss, k = --dim

traker's and dattri's CPU projectors keep a (parameters x block_size) float32 matrix: at their default
block_size 100 that is 14.3 GB for this model, more than the shared machine can give, so both run with
`--peer-block` (default 16: 2.3 GB) and see fewer examples (`--peer-n`). Every worker has a `--timeout`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from common import peak_rss_mb, traker_features, write_docs

CONFIGS = ("floor", "vmap", "kron", "kron8k", "traker", "dattri")
HEADING = "Featurization at CIFAR scale"


def device_name() -> tuple[str, str]:
    if torch.cuda.is_available():
        return "cuda", f"CUDA ({torch.cuda.get_device_name(0)})"
    return "cpu", f"CPU ({platform.machine()}, {os.cpu_count()} visible core(s), {torch.get_num_threads()} thread(s))"


def setup(n: int, T: int, device: str):
    from gradtrace.adapters.diffusion import build_model, ddpm_cifar10_config, make_scheduler

    cfg = ddpm_cifar10_config()
    model, sched = build_model(cfg, seed=0), make_scheduler(cfg)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand((n, 3, 32, 32), generator=gen) * 2 - 1
    return model.to(device), sched, images, np.arange(n)


# ------------------------------------------------------------------------------------------- workers
def worker(config: str, args) -> dict:
    from gradtrace.adapters import Checkpoint, get_adapter
    from gradtrace.adapters.checkpoint import model_fingerprint
    from gradtrace.features.featurize import FeatureSpec, featurize, featurizer_for

    device = torch.device(args.device)
    n = args.peer_n if config in ("traker", "dattri") else args.n
    model, sched, images, ids = setup(n, args.T, args.device)
    info: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mb()
    start, cpu0 = time.perf_counter(), time.process_time()
    if config == "floor":
        train_floor(model, sched, images, args.T, args.chunk, device)
        k = 0
    elif config in ("vmap", "kron", "kron8k"):
        spec = FeatureSpec(projection="rademacher" if config == "vmap" else "kronecker",
                           total_dim=args.dim_large if config == "kron8k" else args.dim, num_timesteps=args.T,
                           chunk_rows=args.chunk)
        ckpt = Checkpoint(model=model, config={"model_config": model.config}, fingerprint=model_fingerprint(model),
                          path=None, extras={"scheduler": sched})
        featurizer, _ = featurizer_for(get_adapter("diffusion-unet"), ckpt, spec,
                                       device=device if device.type != "cpu" else None)
        proj = featurizer.projector
        if config == "vmap":  # what the per-group matrices would take if they were built whole
            info["dense_matrices_gb"] = sum(d * kk for d, kk, j in zip(proj.sizes, proj.dims, range(len(proj.dims)))
                                            if not proj.is_exact(j)) * 4 / 1e9
            info["block_rows"] = proj.info().get("block_rows")
        store = featurize(featurizer, images, ids, Path(args.workdir) / "store", spec=spec,
                          model_fingerprint=ckpt.fingerprint, progress=False)
        k = store.features.shape[1]
    elif config == "traker":
        k = run_traker(model, sched, images, ids, args, device)
    else:
        k = run_dattri(model, sched, images, ids, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        info["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {"config": config, "wall_s": wall, "cpu_s": cpu, "rows": n * args.T, "k": int(k),
            "peak_rss_mb": peak_rss_mb(), "pre_rss_mb": rss0, **info}


def _noisy(sched, images, ids, T, device):
    """The gradtrace loss measurement's noisy inputs (same timesteps and noise as the featurizers)."""
    from gradtrace.adapters.diffusion.measure import Measurement

    m = Measurement.create("loss", T, sched.config.num_train_timesteps)
    noise = m.noise(ids, tuple(images.shape[1:]))
    xt, _ = m.noisy_inputs(images, noise, sched.alphas_cumprod)
    t = torch.as_tensor(list(m.timesteps), dtype=torch.long)
    return xt.to(device), noise.to(device), t.to(device)


def train_floor(model, sched, images, T, chunk, device) -> None:
    """Ordinary training forward+backward over the same (chunk·T)-row batches."""
    model.train()
    gen = torch.Generator().manual_seed(0)
    abar_all = sched.alphas_cumprod.to(device)
    for s in range(0, len(images), chunk):
        x = images[s:s + chunk].repeat_interleave(T, 0).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (x.shape[0],), generator=gen).to(device)
        noise = torch.randn(x.shape, generator=gen).to(device)
        abar = abar_all[t].view(-1, 1, 1, 1)
        model.zero_grad(set_to_none=True)
        loss = ((model(abar.sqrt() * x + (1 - abar).sqrt() * noise, t) - noise) ** 2).mean()
        loss.backward()


def _loss(model, t):
    def loss(params, xt, noise):
        eps = torch.func.functional_call(model, params, (xt, t))
        return ((eps - noise) ** 2).mean()
    return loss


def run_traker(model, sched, images, ids, args, device) -> int:
    xt, noise, t = _noisy(sched, images, ids, args.T, device)
    batches = [(xt[s:s + args.chunk], noise[s:s + args.chunk]) for s in range(0, len(xt), args.chunk)]
    return traker_features(model, _loss(model, t), batches, len(xt), args.dim, Path(args.workdir) / "trak",
                           device=str(device), block_size=args.peer_block)


def run_dattri(model, sched, images, ids, args, device) -> int:
    import dattri.func.projection as dproj
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    dproj.BasicProjector = partial(dproj.BasicProjector, block_size=args.peer_block)  # its default: 14.3 GB here
    xt, noise, t = _noisy(sched, images, ids, args.T, device)
    loss = _loss(model, t)
    task = AttributionTask(loss_func=lambda params, data: loss(params, *data), model=model,
                           checkpoints=model.state_dict())
    attributor = TRAKAttributor(task=task, correct_probability_func=lambda params, data: data[0].sum() * 0.0,
                                projector_kwargs={"proj_dim": args.dim, "proj_max_batch_size": 32, "proj_seed": 0,
                                                  "device": str(device), "proj_type": "rademacher"},
                                device=str(device))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, noise), batch_size=args.chunk,
                                         shuffle=False)
    attributor.cache(loader)
    return args.dim


# ------------------------------------------------------------------------------------------- driver
def run_worker(config: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_cifar_") as tmp:
        cmd = [sys.executable, __file__, "--worker", config, "--workdir", tmp, "--device", args.device,
               "--n", str(args.n), "--peer-n", str(args.peer_n), "--T", str(args.T), "--dim", str(args.dim),
               "--dim-large", str(args.dim_large), "--chunk", str(args.chunk), "--threads", str(args.threads),
               "--peer-block", str(args.peer_block), "--mem-limit-gb", str(args.mem_limit_gb)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"config": config, "error": f"did not finish within {args.timeout} s"}
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
            return {"config": config, "error": tail}
        return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict, args, label: str) -> list[str]:
    floor = results.get("floor", {})
    lines = ["| config | k | examples x T | ex·timesteps/s (wall) | wall vs floor | CPU s per ex·timestep "
             "| CPU vs floor | peak RSS MB | RSS vs floor |" + (" CUDA peak MB |" if args.device == "cuda" else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.device == "cuda" else "")]
    base = None if "error" in floor or not floor else floor
    for cfg in args.configs:
        r = results[cfg]
        if "error" in r:
            lines.append(f"| {cfg} | | | failed: {r['error'][:110]} | | | | | |"
                         + (" |" if args.device == "cuda" else ""))
            continue
        rate, cpu_per = r["rows"] / r["wall_s"], r["cpu_s"] / r["rows"]
        wr = f"{(r['wall_s'] / r['rows']) / (base['wall_s'] / base['rows']):.2f}x" if base else "-"
        cr = f"{cpu_per / (base['cpu_s'] / base['rows']):.2f}x" if base else "-"
        rr = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-"
        n = r["rows"] // args.T
        lines.append(f"| {cfg} | {r['k'] or '-'} | {n} x {args.T} | {rate:.3g} | {wr} | {cpu_per:.2f} | {cr} | "
                     f"{r['peak_rss_mb']:.0f} | {rr} |" + (f" {r.get('cuda_peak_mb', 0):.0f} |"
                                                            if args.device == "cuda" else ""))
    kron = results.get("kron", {})
    notes = [""]
    if "vmap" in results and "dense_matrices_gb" in results["vmap"]:
        notes.append(f"vmap: the per-group Rademacher matrices at k={args.dim} would take "
                     f"{results['vmap']['dense_matrices_gb']:.1f} GB if built whole; they are drawn in row blocks "
                     f"of {results['vmap']['block_rows']} rows and applied in steps of at most 2^22 entries.")
    if "error" not in kron and kron:
        per, wper = kron["cpu_s"] / kron["rows"], kron["wall_s"] / kron["rows"]
        for peer in ("traker", "dattri"):
            r = results.get(peer, {})
            if r and "error" not in r:
                notes.append(f"Kronecker (k={args.dim}) vs {peer}: {(r['cpu_s'] / r['rows']) / per:.1f}x faster "
                             f"per example·timestep in CPU time ({(r['wall_s'] / r['rows']) / wper:.1f}x in wall "
                             f"time), {kron['peak_rss_mb'] / r['peak_rss_mb']:.2f}x its peak RSS.")
    return lines + notes + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--n", type=int, default=16, help="examples for floor, vmap and kron")
    p.add_argument("--peer-n", type=int, default=8, help="examples for traker and dattri")
    p.add_argument("--T", type=int, default=1)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--dim-large", type=int, default=8192)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peer-block", type=int, default=16, help="block_size of traker's / dattri's CPU projector")
    p.add_argument("--timeout", type=int, default=1500, help="seconds per configuration")
    p.add_argument("--mem-limit-gb", type=float, default=12.0, help="address-space cap of each CPU worker")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    detected, label = device_name()
    args.device = args.device or detected
    if args.worker:
        if args.device == "cpu" and args.mem_limit_gb > 0:  # a runaway worker fails instead of starving the machine
            cap = int(args.mem_limit_gb * 2 ** 30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(worker(args.worker, args)))
        return
    print(f"device: {label if args.device == detected else args.device}", file=sys.stderr, flush=True)
    results = {}
    for cfg in args.configs:
        results[cfg] = run_worker(cfg, args)
        print(f"{cfg}: {results[cfg]}", file=sys.stderr, flush=True)
    cmd = " ".join([".venv/bin/python bench/bench_featurize_cifar.py"] + sys.argv[1:])
    lines = [f"Command: `{cmd}`", "",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {label}; "
             f"torch {torch.__version__}; {args.threads} thread(s) per worker; model `ddpm-cifar10` "
             f"(35,746,307 parameters, random weights), `block` groups, loss measurement, T={args.T}, chunks of "
             f"{args.chunk} examples; traker and dattri with projector block_size {args.peer_block}.", ""]
    lines += table(results, args, label)
    print("\n".join(lines))
    if args.write_docs:
        write_docs(lines, HEADING)


if __name__ == "__main__":
    main()
