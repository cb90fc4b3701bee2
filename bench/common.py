"""The benchmark harness: what more than one script in bench/ needs, so that each script is a thin client of
gradtrace and of this module.

Every script runs as ``python bench/NAME.py`` from the repository root (`make bench-*` does that). Python puts the
script's own folder, bench/, first on `sys.path`, so ``from common import ...`` finds this module; no script
edits `sys.path`, imports another script or imports tests/, and no test imports bench/ (the tests that check a
benchmark's figures run its script). gradtrace itself is imported inside functions here, so that ``--help``
answers at once.

    from common import Clock, bench_main, fmt_summary, learned_weights, lds_tables   # LDS-style benchmarks
    from common import effective_groups, peak_rss_mb, traker_features, write_docs    # aspects, featurization
    from common import aspect_families, family_criterion, t2i_eval_prompts  # studies of a text-to-image aspects run
    from common import PLANTED_SCALE, write_planted                                   # weight learning at scale
    from common import lm_featurization_cost                            # the small GPT-2's featurization cost
    from common import T2I_LDS_METHODS, open_t2i_lds, mean_lds, snr_of_scores  # studies of a text-to-image LDS run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVAL_SAMPLE_SEED = 1001   # generated evaluation queries of the LDS benchmarks (bench_lds, bench_lds_sweep)
LEARN_SAMPLE_SEED = 2002  # their learning queries (weights and the λ choice), never the evaluation queries
T2I_LDS_METHODS = [("tracin", "identity"), ("trak", "shared"), ("trak", "per-group"), ("dtrak", "shared"),
                   ("dtrak", "per-group"), ("das", "shared"), ("das", "per-group")]  # bench_t2i_lds.py's rows
T2I_LDS_MEASUREMENT = {"dtrak": "dtrak", "das": "das"}  # the others differentiate the loss
T2I_LDS_SETS = ("heldout", "samples")                  # its evaluation query sets
GUARD_ROWS = ("none", "holdout")  # learned weights as learned, and with the label-free holdout guard
# The planted problem of the weight-learning benchmarks at full size (bench_weights_scale, _parts, _certificate)
LM_CHUNK = 64  # sequences per featurization call of the LM cost measurement
PLANTED_SCALE = dict(n_train=100_000, n_queries=1000, n_groups=200, dim=2048, signal_dim=32, strength=45.0)


class Clock:
    """Times named stages: `clock.stage("featurize", fn, *args)` runs fn, says so on stderr, and adds its seconds
    to `clock.timings["featurize"]` (rounded to `digits`)."""

    def __init__(self, tag: str, timings: dict | None = None, *, digits: int = 2, say_done: bool = False):
        self.tag, self.digits, self.say_done = tag, digits, say_done
        self.timings: dict[str, float] = {} if timings is None else timings

    def say(self, msg: str) -> None:
        print(f"[{self.tag}] {msg}", file=sys.stderr, flush=True)

    def stage(self, label: str, fn, *a, **kw):
        t = time.perf_counter()
        self.say(f"{label} ...")
        result = fn(*a, **kw)
        self.timings[label] = round(self.timings.get(label, 0.0) + time.perf_counter() - t, self.digits)
        if self.say_done:
            self.say(f"{label} done in {self.timings[label]} s")
        return result


def apply_overrides(parser: argparse.ArgumentParser, settings: dict, pairs: list[str]) -> dict:
    """`settings` with each --set KEY=VALUE applied (JSON values, else the bare string, cast to the key's type)."""
    s = dict(settings)
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in s:
            parser.error(f"unknown setting {key!r}; known: {', '.join(s)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string such as c=auto
        s[key] = type(s[key])(parsed)
    return s


def bench_main(argv: list[str] | None, doc: str, name: str, quick_help: str, run_bench, settings: dict) -> int:
    """The command line every LDS-style benchmark shares: --quick, --out (default bench_out/NAME[_quick]),
    --set KEY=VALUE overrides of its `settings` ({"full": ..., "quick": ...}), --no-progress;
    `run_bench(out, settings, progress)` does the work."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=None, help=f"output directory (default bench_out/{name} or bench_out/{name}_quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    s = apply_overrides(p, settings["quick" if args.quick else "full"], args.set)
    out = args.out or (f"bench_out/{name}_quick" if args.quick else f"bench_out/{name}")
    results = run_bench(out, s, progress=not args.no_progress)
    print(results["markdown"])
    print(f"\nresults: {Path(out) / 'results.json'}")
    return 0


def learned_weights(stores: dict, folder: Path, method: str, kernel: str, c, steps: int, guard: str):
    """Weights learned on stores["learn"] (guard "none" or "holdout"), read back as `eval lds --weights` reads
    them: (weights in group order, a record {key, kind, label, path, weights, shrink})."""
    from gradtrace.attribution.weights_file import read_group_weights
    from gradtrace.pipeline import LearnWeightsSpec, learn_weights_run

    kernel_arg = "shared" if kernel == "identity" else kernel
    suffix = "" if guard == "none" else "-guarded"
    path, doc = learn_weights_run(LearnWeightsSpec(
        train=str(stores["train"].path), out=str(folder / f"{method}-{kernel}{suffix}.json"),
        queries=str(stores["learn"].path), method=method, kernel=kernel_arg, lambda_c=str(c), steps=steps,
        guard=guard), progress=False)
    w, info = read_group_weights(stores["train"], stores["heldout"], path, method=method, kernel=kernel_arg)
    shrink = (doc["provenance"].get("guard") or {}).get("shrink")
    kind = "learned" if guard == "none" else "guarded"
    return w, {"key": f"{method}/{kernel}{'' if guard == 'none' else '/guarded'}", "kind": kind,
               "label": kind if shrink is None else f"{kind} (shrink {shrink:g})", "path": str(path),
               "weights": info["weights"], "shrink": shrink}


def open_t2i_lds(out: Path) -> tuple[dict, dict]:
    """A finished `bench_t2i_lds.py --out` folder: (its results.json, the LDS problem of each evaluation query set,
    read from its cached model outputs)."""
    from gradtrace.evaluate import load_problem
    from gradtrace.evaluate.outputs import OutputGrid
    from gradtrace.features.store import FeatureStore

    res = json.loads((out / "results.json").read_text())
    s = res["settings"]
    grid = OutputGrid(num_timesteps=s["grid_timesteps"], num_draws=s["grid_draws"])
    loss = out / "features" / "loss"
    train = FeatureStore.open(loss / "train")
    return res, {q: load_problem(res["run"], out / "retrain", train, FeatureStore.open(loss / q), grid=grid,
                                 progress=False) for q in T2I_LDS_SETS}


def mean_lds(problems: dict, fitted, features: dict, weights=None) -> float:
    """The LDS over every evaluation query of `open_t2i_lds`'s problems (the mean of the defined per-query values):
    `fitted`'s scores of each set's query `features` under `weights` (None: uniform)."""
    return float(np.mean([v for q, problem in problems.items()
                          for v in problem.evaluate(fitted.scores(features[q], weights=weights))["per_query"]
                          if v is not None]))


def snr_of_scores(scores: np.ndarray, k: int) -> float:
    """The SNR objective's signal / noise (mean top-k score over the L2 norm; higher is better), averaged over the
    rows of a (queries, training rows) score matrix: −`gradtrace.weights.streamed.per_query_loss`."""
    from gradtrace.weights.streamed import per_query_loss

    top = -np.sort(-scores, axis=1)[:, :k].mean(axis=1)
    return float(-per_query_loss(top, np.linalg.norm(scores, axis=1)).mean())


def fmt_summary(summary: dict) -> str:
    """A metric summary ({"mean", "ci95"}) as 'mean [lo, hi]', or 'undefined'."""
    if summary["mean"] is None:
        return "undefined"
    ci = summary["ci95"]
    return f"{summary['mean']:.3f}" + ("" if ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def lds_tables(rows: list[dict], paired: list[dict]) -> list[str]:
    """Markdown lines: the LDS table of `rows` (held-out / generated columns) and the paired differences."""
    lines = ["| method | kernel | weights | λ scale c | LDS (95% CI) | held-out | generated | undefined | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = "-" if not r.get("c") else f"{r['c']:g}"
        lines.append(f"| {r['method']} | {r['kernel']} | {r['weights']} | {c} | {fmt_summary(r['lds'])} | "
                     f"{fmt_summary(r['lds_heldout'])} | {fmt_summary(r['lds_samples'])} | "
                     f"{r['lds']['n_undefined']} | {r['seconds']} |")
    if paired:
        lines += ["", "Paired differences (per query, both query sets; bootstrap 95% CI over queries):", "",
                  "| comparison | Δ LDS (95% CI) | CI excludes 0 |", "|---|---|---|"]
        for d in paired:
            lo, hi = d["delta"]["ci95"]
            excl = "—" if lo is None else ("yes" if lo > 0 or hi < 0 else "no")
            lines.append(f"| {d['comparison']} | {fmt_summary(d['delta'])} | {excl} |")
    return lines


T2I_ASPECTS = ("subject", "style", "background")  # the aspects of the text-to-image aspects benchmark


def t2i_eval_prompts(n: int, seed: int = EVAL_SAMPLE_SEED) -> tuple[list[str], np.ndarray]:
    """bench_t2i_aspects.py's evaluation queries: `n` whole shapes captions of seeded random attribute combinations,
    and their (n, 3) value codes (subject, style, background)."""
    from gradtrace.data.shapes import ATTRIBUTES, caption

    rng = np.random.default_rng([seed, 31])
    codes = np.stack([rng.integers(0, len(ATTRIBUTES[a]), n) for a in T2I_ASPECTS], axis=1)
    texts = [caption(*(ATTRIBUTES[a][int(c)] for a, c in zip(T2I_ASPECTS, row))) for row in codes]
    return texts, codes


def t2i_method_stores(run: Path, method: str):
    """(training store, evaluation store, the training images' attribute codes) of one method's features in a
    text-to-image aspects run (bench_t2i_aspects.py --out RUN)."""
    from gradtrace.data import load_dataset
    from gradtrace.features.store import FeatureStore

    feats = Path(run) / "features" / method
    train, ev = FeatureStore.open(feats / "train"), FeatureStore.open(feats / "eval")
    ds = load_dataset("shapes")
    return train, ev, ds.attribute_codes()[ds.index_of(np.asarray(train.ids))]


def halves(fam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two index sets of learning queries with family codes `fam`, every family alternating between them."""
    a = np.zeros(len(fam), dtype=bool)
    for f in np.unique(fam):
        rows = np.flatnonzero(fam == f)
        a[rows[::2]] = True
    return np.flatnonzero(a), np.flatnonzero(~a)


def family_criterion(contrib, w: np.ndarray, families: np.ndarray, k: int) -> float:
    """The family objective's value with its sign flipped (within-family minus across-family agreement of the
    weighted top-k; higher: the families are more distinct) for contributions (Q, N, M) at weights (M,); a (Q, N)
    score matrix is read as one group with weight 1."""
    import torch

    from gradtrace.weights.family import family_loss

    contrib = torch.as_tensor(np.asarray(contrib, np.float64))
    if contrib.ndim == 2:
        contrib, w = contrib[:, :, None], np.ones(1)
    return -float(family_loss(contrib, torch.from_numpy(np.asarray(w, np.float64)), families, k))


def aspect_families(run: Path, prompts: list[str], aspect: str) -> list:
    """The family of each of a text-to-image aspects run's learning prompts for `aspect`: the value recorded in
    RUN/labels/learn-ASPECT.jsonl (whole captions built per value), else the prompt itself (the earlier
    aspect-only prompts, one per value)."""
    path = Path(run) / "labels" / f"learn-{aspect}.jsonl"
    if not path.exists():
        return list(prompts)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row[aspect] for row in sorted(rows, key=lambda r: r["id"])]


def effective_groups(w: np.ndarray) -> float:
    """The effective number of groups of a weight vector, 1 / Σ v_j² with v = w / Σ w (M for uniform weights)."""
    v = np.asarray(w, dtype=np.float64) / np.sum(w)
    return float(1.0 / np.sum(v ** 2))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, MiB). Not ru_maxrss: Linux carries that over from the
    forking parent across exec, so every worker would report at least the parent's RSS."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_docs(lines: list[str], heading: str) -> None:
    """Put `lines` under `## heading` of docs/benchmarks.md (replacing that section, or appending it)."""
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"## {heading}\n\n" + "\n".join(lines).rstrip() + "\n"
    start = text.find(f"## {heading}\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + block
    else:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + block + ("" if nxt < 0 else text[nxt:])
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def traker_features(model, loss, batches, n: int, dim: int, save_dir: Path, *, device: str = "cpu",
                    block_size: int | None = None) -> int:
    """TRAK's own featurizer (the `traker` package, a peer) on `model`: `loss(params, *batch)` is one example's
    output, `batches` the training examples in order (tuples of tensors), `n` their count; Rademacher projection
    to `dim` columns (seed 0), float32, features saved under `save_dir`. Returns `dim`."""
    import torch
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class DiffusionLoss(AbstractModelOutput):
        def __init__(self):
            super().__init__()

        def get_output(self, model, weights, buffers, *batch):
            return loss({**weights, **buffers}, *batch)

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1, device=batch[0].device)

    grad_dim = sum(p.numel() for p in model.parameters())
    sizes = {} if block_size is None else {"block_size": block_size}
    proj = BasicProjector(grad_dim=grad_dim, proj_dim=dim, seed=0, proj_type=ProjectionType.rademacher,
                          device=str(device), dtype=torch.float32, **sizes)
    traker = TRAKer(model=model, task=DiffusionLoss(), train_set_size=n, save_dir=str(save_dir),
                    device=str(device), projector=proj, proj_dim=dim, use_half_precision=False, logging_level=40)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for batch in batches:
        traker.featurize(batch=batch, num_samples=batch[0].shape[0])
    traker.finalize_features()
    return dim


def write_planted(workdir: Path, spec: dict) -> None:
    """The planted problem `spec` (gradtrace.weights.planted; seed 0) written into `workdir`: Ψ as a .npy memmap
    (psi.npy), the queries, the planted rows and the group slices."""
    from gradtrace.weights.planted import planted_problem

    prob = planted_problem(spec["n_train"], spec["n_queries"], spec["n_groups"], spec["dim"],
                           signal_dim=spec["signal_dim"], strength=spec["strength"], seed=0,
                           psi_path=workdir / "psi.npy")
    np.save(workdir / "queries.npy", prob.queries)
    np.save(workdir / "planted.npy", prob.planted)
    (workdir / "slices.json").write_text(json.dumps(prob.fitted.group_slices))


def run_worker(script: str, args: list[str], what: str) -> dict:
    """Run `python SCRIPT ARGS...` in a fresh process (so its memory and page-cache figures are its own) and return
    the JSON object on the last line of its output; exit with its stderr's tail when it fails."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(fn, repeats: int = 3) -> float:
    """The shortest of `repeats` timed calls (the machine is shared: the least disturbed pass)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def lm_featurization_cost(out: str, *, n: int = 256, dim: int = 4096, log=print) -> list[dict]:
    """Featurization cost of the `build-lm` GPT-2 on the first `n` fortunes (bench_lm_featurize, bench_lm): one row
    per (full model | LoRA r=4) x projection: sequences/s, the forward+backward floor and their ratio."""
    import torch

    from gradtrace.adapters import get_adapter
    from gradtrace.adapters.base import Checkpoint
    from gradtrace.adapters.causal_lm.train import batch_loss
    from gradtrace.data import load_dataset
    from gradtrace.features.featurize import FeatureSpec, featurizer_for
    from gradtrace.pipeline.build_lm import BuildLMSpec, build_lm_run

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
            for s in range(0, n, LM_CHUNK):
                model.zero_grad()
                batch_loss(model, ex.images[s:s + LM_CHUNK], torch.as_tensor(ex.cond[s:s + LM_CHUNK])).backward()

        batch_loss(model, ex.images[:4], torch.as_tensor(ex.cond[:4])).backward()  # warm-up, as the featurizers'
        floor = n / best_of(floor_pass)
        for projection in ("rademacher", "kronecker"):
            spec = FeatureSpec(groups="block", projection=projection, total_dim=dim)
            featurizer, _ = featurizer_for(adapter, ckpt, spec)
            featurizer.features(ex.images[:4], ex.ids[:4], ex.cond[:4])  # warm-up (and the Kronecker self-check)
            rate = n / best_of(lambda: [featurizer.features(ex.images[s:s + LM_CHUNK], ex.ids[s:s + LM_CHUNK],
                                                            ex.cond[s:s + LM_CHUNK]) for s in range(0, n, LM_CHUNK)])
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row = {"model": "LoRA r=4" if lora else "full model", "params": params, "projection": projection,
                   "sequences_per_s": round(rate, 1), "floor_per_s": round(floor, 1), "ratio": round(floor / rate, 2)}
            log(f"{row['model']} ({params} parameters), {projection}: {rate:.0f} sequences/s; forward+backward "
                f"{floor:.0f}/s; ratio {floor / rate:.1f}")
            rows.append(row)
    return rows
