"""Featurization throughput and memory: gradtrace (vmap, Kronecker) against the training floor, traker, dattri.

    .venv/bin/python bench/bench_featurize.py                    # both models, N=256, T=10, k=2048, 2 reps
    .venv/bin/python bench/bench_featurize.py --write-docs       # also replace '## Featurization' in docs/benchmarks.md
    .venv/bin/python bench/bench_featurize.py --models digits --reps 1 --quality-seeds 1   # quicker

For each model (tiny UNet2DModel on 8x8 digits, tiny UNet2DConditionModel on 16x16 shapes; both trained here
for a few hundred steps) and each configuration, one fresh subprocess featurizes the same N examples
(chunks of 64 examples x T timesteps) and reports its wall time and peak RSS (ru_maxrss):

    floor   plain training forward+backward of the same 64·T-row batches (parameter gradients)
    vmap    gradtrace, torch.func per-example gradients + per-group Rademacher projection
    kron    gradtrace, Kronecker (LoGra-style) projection from one batched forward/backward
    kron4x  the same at 4x the dimension (what matching vmap's attribution quality costs)
    traker  traker.TRAKer, BasicProjector (CPU, Rademacher), use_half_precision=False
    dattri  dattri TRAKAttributor.cache on CPU (its BasicProjector), the same diffusion loss

Configurations run round-robin `--reps` times; ratios to the floor are taken within a round, then the median.
Quality: top-10 overlap of TRAK attributions (Q held-out queries vs the N training examples) computed from
projected features against TRAK on exact gradients (same absolute λ), for vmap and kron at the same dim.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import peak_rss_mb, traker_features, write_docs

CONFIGS = ("floor", "vmap", "kron", "kron4x", "traker", "dattri")
MODELS = {"digits": ("unconditional", 1, 8), "shapes": ("conditional", 3, 16)}


# ------------------------------------------------------------------------------------------- setup
def prepare(workdir: Path, name: str, n: int, n_query: int, steps: int) -> Path:
    """Train the model of `name` on its first n examples; save the checkpoint and the example ids."""
    from gradtrace.adapters.checkpoint import save_checkpoint
    from gradtrace.adapters.diffusion import TrainConfig, default_model_config, train
    from gradtrace.data.registry import load_dataset

    path = workdir / name
    if (path / "config.json").exists():
        return path
    kind, channels, size = MODELS[name]
    ds = load_dataset(name)
    attrs = ds.attributes if kind == "conditional" else None
    cfg = default_model_config(kind, channels=channels, size=size, attributes=attrs)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds))
    train_ids, query_ids = ds.ids[order[:n]], ds.ids[order[n:n + n_query]]
    tc = TrainConfig(steps=steps, seed=0)
    model = train(cfg, ds, tc, ids=train_ids, progress=False)
    save_checkpoint(path, model, train_config=tc, dataset_info=ds.info(), train_ids=train_ids)
    np.save(path / "query_ids.npy", query_ids)
    return path


def load(path: Path, which: str = "train"):
    """(checkpoint, images, ids, cond codes or None) of the train or query examples."""
    from gradtrace.adapters import get_adapter
    from gradtrace.data.registry import load_dataset

    ckpt = get_adapter().load(path)
    ds = load_dataset(path.name)
    ids = ckpt.train_ids if which == "train" else np.load(path / "query_ids.npy")
    rows = ds.index_of(ids)
    cond = ds.attribute_codes()[rows] if ckpt.model.conditional else None
    return ckpt, ds.images[rows], ids, cond


# ------------------------------------------------------------------------------------------- workers
def worker(path: Path, config: str, T: int, dim: int, chunk: int, out_dir: Path) -> dict:
    from gradtrace.adapters import get_adapter
    from gradtrace.features.featurize import FeatureSpec, featurize, featurizer_for

    ckpt, images, ids, cond = load(path)
    model, sched = ckpt.model, ckpt.extras["scheduler"]
    spec = FeatureSpec(projection="kronecker" if config.startswith("kron") else "rademacher",
                       total_dim=4 * dim if config == "kron4x" else dim, num_timesteps=T, chunk_rows=chunk)
    noise = xt = None
    if config in ("traker", "dattri"):
        from gradtrace.adapters.diffusion.measure import Measurement
        m = Measurement.create("loss", T, sched.config.num_train_timesteps)
        noise = m.noise(ids, tuple(images.shape[1:]))
        xt, _ = m.noisy_inputs(images, noise, sched.alphas_cumprod)
    rss0 = peak_rss_mb()
    start, cpu0 = time.perf_counter(), time.process_time()
    if config == "floor":
        train_floor(model, sched, images, cond, T, chunk)
        k = 0
    elif config in ("vmap", "kron", "kron4x"):
        featurizer, _ = featurizer_for(get_adapter(), ckpt, spec)
        store = featurize(featurizer, images, ids, out_dir / "store", spec=spec, cond=cond,
                          model_fingerprint=ckpt.fingerprint, progress=False)
        k = store.features.shape[1]
    elif config == "traker":
        k = run_traker(model, xt, noise, cond, T, sched, dim, chunk, out_dir)
    else:
        k = run_dattri(model, xt, noise, cond, T, sched, dim, chunk)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    peak = peak_rss_mb()
    return {"config": config, "wall_s": wall, "cpu_s": cpu, "rows": len(ids) * T, "k": int(k),
            "peak_rss_mb": peak, "pre_rss_mb": rss0}


def train_floor(model, sched, images, cond, T, chunk) -> None:
    """Ordinary training forward+backward over the same (64·T)-row batches."""
    model.train()
    gen = torch.Generator().manual_seed(0)
    for s in range(0, len(images), chunk):
        x = images[s:s + chunk].repeat_interleave(T, 0)
        t = torch.randint(0, sched.config.num_train_timesteps, (x.shape[0],), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        c = None if cond is None else torch.as_tensor(cond[s:s + chunk]).repeat_interleave(T, 0)
        model.zero_grad(set_to_none=True)
        loss = ((model(abar.sqrt() * x + (1 - abar).sqrt() * noise, t, c) - noise) ** 2).mean()
        loss.backward()


def _per_example_loss(model, T, sched):
    t = torch.tensor(tuple(int((i + 0.5) * sched.config.num_train_timesteps / T) for i in range(T)))

    def loss(params, xt, noise, cond=None):
        c = None if cond is None else cond.unsqueeze(0).expand(T, cond.shape[-1])
        eps = torch.func.functional_call(model, params, (xt, t, c))
        return ((eps - noise) ** 2).mean()
    return loss


def run_traker(model, xt, noise, cond, T, sched, dim, chunk, out_dir) -> int:
    batches = [(xt[s:s + chunk], noise[s:s + chunk]) + (() if cond is None else (torch.as_tensor(cond[s:s + chunk]),))
               for s in range(0, len(xt), chunk)]
    return traker_features(model, _per_example_loss(model, T, sched), batches, len(xt), dim, out_dir / "trak")


def run_dattri(model, xt, noise, cond, T, sched, dim, chunk) -> int:
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    loss = _per_example_loss(model, T, sched)
    task = AttributionTask(loss_func=lambda params, data: loss(params, *data), model=model,
                           checkpoints=model.state_dict())
    attributor = TRAKAttributor(task=task, correct_probability_func=lambda params, data: data[0].sum() * 0.0,
                                projector_kwargs={"proj_dim": dim, "proj_max_batch_size": 32, "proj_seed": 0,
                                                  "device": "cpu", "proj_type": "rademacher"}, device="cpu")
    tensors = (xt, noise) + (() if cond is None else (torch.as_tensor(cond),))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=chunk, shuffle=False)
    attributor.cache(loader)
    return dim


# ------------------------------------------------------------------------------------------- quality
def quality(path: Path, T: int, dim: int, seeds: int, c: float = 0.01, top: int = 10) -> dict:
    """Top-10 overlap of TRAK (and TracIn) attributions from projected vs exact features.

    Every TRAK score uses the same absolute λ = c · ‖Φ_exact‖²_F / dim (= c · mean diag(ΦᵀΦ) of a
    dim-wide projection, the library's default), through the push-through identity
    φ(q)ᵀ(ΦᵀΦ + λI)⁻¹Φᵀ = φ(q)ᵀΦᵀ(ΦΦᵀ + λI)⁻¹ (N < k), so only the projection noise differs.
    """
    from gradtrace.adapters import get_adapter
    from gradtrace.features.featurize import FeatureSpec, featurizer_for

    ckpt, xtr, ids_tr, c_tr = load(path, "train")
    _, xq, ids_q, c_q = load(path, "query")

    def feats(projection, seed, k):
        fz, _ = featurizer_for(get_adapter(), ckpt, FeatureSpec(projection=projection, total_dim=k,
                                                                projection_seed=seed, num_timesteps=T))
        out = [fz.features(x[s:s + 64], i[s:s + 64], None if cc is None else cc[s:s + 64])
               for x, i, cc in ((xtr, ids_tr, c_tr), (xq, ids_q, c_q)) for s in range(0, len(x), 64)]
        n_tr = (len(xtr) + 63) // 64
        return np.concatenate(out[:n_tr]).astype(np.float64), np.concatenate(out[n_tr:]).astype(np.float64)

    phi, q = feats("identity", 0, dim)
    lam = c * float((phi ** 2).sum()) / dim

    def trak(p, pq):
        return pq @ p.T @ np.linalg.inv(p @ p.T + lam * np.eye(len(p)))

    exact_trak, exact_tracin = trak(phi, q), q @ phi.T
    del phi, q

    def overlap(a, b):
        ta, tb = np.argsort(-a, 1)[:, :top], np.argsort(-b, 1)[:, :top]
        return float(np.mean([len(set(x) & set(y)) / top for x, y in zip(ta, tb)]))

    res = {}
    for name, projection, k in (("vmap", "rademacher", dim), ("kron", "kronecker", dim),
                                ("kron 2x dim", "kronecker", 2 * dim), ("kron 4x dim", "kronecker", 4 * dim)):
        rows = []
        for seed in range(seeds):
            p, pq = feats(projection, seed, k)
            rows.append((overlap(trak(p, pq), exact_trak), overlap(pq @ p.T, exact_tracin), p.shape[1]))
        rows = np.array(rows)
        res[name] = {"trak_top10": float(rows[:, 0].mean()), "trak_top10_se": float(rows[:, 0].std() / np.sqrt(seeds)),
                     "tracin_top10": float(rows[:, 1].mean()), "k": int(rows[0, 2]), "seeds": seeds}
    return res


def profile(path: Path, T: int, dim: int, chunk: int, top: int = 8) -> list[str]:
    """torch.profiler self-CPU time per op: one chunk of the floor vs one of the Kronecker featurizer."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from gradtrace.adapters import get_adapter
    from gradtrace.features.featurize import FeatureSpec, featurizer_for

    ckpt, images, ids, cond = load(path)
    x, i, c = images[:chunk], ids[:chunk], None if cond is None else cond[:chunk]
    fz, _ = featurizer_for(get_adapter(), ckpt, FeatureSpec(projection="kronecker", total_dim=dim, num_timesteps=T))
    fz.features(x, i, c)  # warm (and the first-call check)
    times = {}
    for name, fn in (("floor", lambda: train_floor(ckpt.model, ckpt.extras["scheduler"], x, c, T, chunk)),
                     ("kron", lambda: fz.features(x, i, c))):
        fn()
        ckpt.model.eval()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ckpt.model.eval()
        times[name] = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
    ops = sorted(set(times["kron"]) | set(times["floor"]),
                 key=lambda k: -max(times["kron"].get(k, 0), times["floor"].get(k, 0)))[:top]
    lines = [f"Where the time goes (torch.profiler, self CPU ms for one chunk of {chunk} examples x T={T}):", "",
             "| op | floor | kron |", "|---|---|---|"]
    lines += [f"| {op} | {times['floor'].get(op, 0):.0f} | {times['kron'].get(op, 0):.0f} |" for op in ops]
    lines.append(f"| total | {sum(times['floor'].values()):.0f} | {sum(times['kron'].values()):.0f} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------- driver
def run_worker_subprocess(path, config, args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cmd = [sys.executable, __file__, "--worker", config, "--model-dir", str(path), "--T", str(args.T),
               "--dim", str(args.dim), "--chunk", str(args.chunk), "--threads", str(args.threads),
               "--workdir", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"config": config, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
        return json.loads(proc.stdout.strip().splitlines()[-1])


def table(name: str, results: dict, qual: dict | None) -> list[str]:
    floor = results["floor"]
    lines = [f"**{name}** ({MODELS[name][0]} UNet, {floor[0]['rows'] // ARGS.T} examples x T={ARGS.T}, "
             f"k={ARGS.dim}, chunks of {ARGS.chunk} examples; median of {len(floor)} rounds). Throughput and "
             f"ratios use process CPU time (1 thread; robust to the other jobs on this shared machine); "
             f"wall time is shown too.", "",
             "| config | k | ex·timesteps/s (CPU) | CPU time vs floor | wall s | wall vs floor | peak RSS MB "
             "| RSS vs floor |", "|---|---|---|---|---|---|---|---|"]
    med = {}
    for cfg in [c for c in CONFIGS if c in results]:
        runs = [r for r in results[cfg] if "error" not in r]
        if not runs:
            err = results[cfg][0].get("error", "failed")
            lines.append(f"| {cfg} | | failed: {err[:80]} | | | | | |")
            continue
        ratio = np.median([r["cpu_s"] / f["cpu_s"] for r, f in zip(runs, floor)])
        wratio = np.median([r["wall_s"] / f["wall_s"] for r, f in zip(runs, floor)])
        rss = np.median([r["peak_rss_mb"] for r in runs])
        cpu, wall = np.median([r["cpu_s"] for r in runs]), np.median([r["wall_s"] for r in runs])
        med[cfg] = (cpu, rss)
        lines.append(f"| {cfg} | {runs[0]['k'] or '-'} | {runs[0]['rows'] / cpu:.0f} | {ratio:.2f}x | {wall:.1f} | "
                     f"{wratio:.2f}x | {rss:.0f} | {rss / np.median([f['peak_rss_mb'] for f in floor]):.2f}x |")
    if "kron" in med:
        for peer in ("traker", "dattri"):
            if peer in med:
                lines.append(f"\nKronecker vs {peer}: {med[peer][0] / med['kron'][0]:.1f}x faster (CPU time), "
                             f"{med['kron'][1] / med[peer][1]:.2f}x its peak RSS.")
    if qual:
        lines += ["", f"Attribution quality ({qual['n_query']} held-out queries, top-10 overlap with exact-gradient "
                  f"attributions; mean ± s.e. over {qual['vmap']['seeds']} projection seeds):", "",
                  "| features | k | TRAK top-10 overlap | TracIn top-10 overlap |", "|---|---|---|---|"]
        for cfg, r in qual.items():
            if isinstance(r, dict):
                lines.append(f"| {cfg} | {r['k']} | {r['trak_top10']:.3f} ± {r['trak_top10_se']:.3f} | "
                             f"{r['tracin_top10']:.3f} |")
    return lines + [""]


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--n-query", type=int, default=64)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=400, help="training steps of the benchmark models")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quality-seeds", type=int, default=3, help="0 skips the quality check")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir (trained models)")
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    ARGS = args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(Path(args.model_dir), args.worker, args.T, args.dim, args.chunk, Path(args.workdir))))
        return
    own = args.workdir is None
    args.workdir = tempfile.mkdtemp(prefix="bench_featurize_") if own else args.workdir
    lines = [f"Command: `{' '.join(['.venv/bin/python bench/bench_featurize.py'] + sys.argv[1:])}`",
             f"Date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), "
             f"torch {torch.__version__}, {args.threads} thread(s) per run.", ""]
    for name in args.models:
        path = prepare(Path(args.workdir), name, args.n, args.n_query, args.steps)
        results: dict[str, list] = {c: [] for c in args.configs}
        for rep in range(args.reps):
            for cfg in args.configs:
                r = run_worker_subprocess(path, cfg, args)
                results[cfg].append(r)
                print(f"[{name} round {rep + 1}] {cfg}: {r}", file=sys.stderr, flush=True)
        qual = None
        if args.quality_seeds > 0:
            qual = quality(path, args.T, args.dim, args.quality_seeds)
            qual["n_query"] = args.n_query
            print(f"[{name}] quality: {qual}", file=sys.stderr, flush=True)
        lines += table(name, results, qual)
        if "kron" in args.configs:
            lines += profile(path, args.T, args.dim, args.chunk)
    print("\n".join(lines))
    if args.write_docs:
        write_docs(lines, "Featurization")
    if own and not args.keep:
        import shutil
        shutil.rmtree(args.workdir, ignore_errors=True)


ARGS = None

if __name__ == "__main__":
    main()
