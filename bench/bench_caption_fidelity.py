#!/usr/bin/env python
"""Caption fidelity by training length: how well a `build-pipeline` pipeline renders its captions after S UNet steps.

    python bench/bench_caption_fidelity.py --out bench_out/fidelity_shapes --snapshots 400,800,1600,2400
    python bench/bench_caption_fidelity.py --out bench_out/fidelity_s24 --captions-set subjects24 ...
    python bench/bench_caption_fidelity.py --quick --out bench_out/fidelity_q          # smoke run

One pretraining run (the build-pipeline recipe: VAE, then UNet + text encoder, batch 32, lr 1e-3) whose UNet is
saved at each snapshot step and checked there with the check build-pipeline runs (`check-captions`: a seeded draw
of distinct training captions, `--per-caption` images each, 10 DDIM steps, the nearest training image in pixels).
A snapshot at step S of a longer run is not the S-step build (the warm-up is 5% of the whole run), close to it.
Also written: the same statistic for real held-out images of the same captions (shapes drawn with data seed 1),
the ceiling a perfect renderer would reach under this pixel judge.

Caption sets: `shapes` (96 distinct captions "a striped circle on a checker background": 6 subjects x 4 styles
x 4 backgrounds); `subjects24` (the same images, each (subject, style) pair named by one word of 24, as a set of 24
subjects would be: "a fox on a checker background"; 96 distinct captions, 24 subjects).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gradtrace.adapters import adapter_of
from gradtrace.adapters.diffusers.build import build_components, save_pipeline
from gradtrace.adapters.diffusers.pretrain import pretrain
from gradtrace.data.shapes import STYLES, SUBJECTS, load_shapes
from gradtrace.evaluate.caption_fidelity import caption_fidelity
from gradtrace.pipeline.check_captions import fidelity_of
from gradtrace.pipeline.specs.check_captions import CheckCaptionsSpec

NAMES24 = ["fox", "owl", "cat", "dog", "bee", "elk", "yak", "ant", "bat", "cow", "eel", "emu",
           "gnu", "hen", "jay", "koi", "ram", "pig", "rat", "ape", "boa", "cod", "doe", "asp"]


def log(msg: str) -> None:
    print(f"[bench-caption-fidelity] {msg}", file=sys.stderr, flush=True)


def captions_of(metadata: list[dict], captions_set: str) -> list[str]:
    if captions_set == "shapes":
        return [m["text"] for m in metadata]
    return [f"a {NAMES24[SUBJECTS.index(m['subject']) * len(STYLES) + STYLES.index(m['style'])]} on a "
            f"{m['background']} background" for m in metadata]


def real_reference(train, captions, captions_set, n, size, per_caption) -> dict:
    """The statistic for real images drawn with another data seed (per_caption per distinct caption)."""
    held = load_shapes(n=n, size=size, seed=1)
    held_captions = captions_of(held.metadata, captions_set)
    first: dict[str, list[int]] = {}
    for i, c in enumerate(held_captions):
        first.setdefault(c, []).append(i)
    rows = [i for c in first for i in first[c][:per_caption]]
    result = caption_fidelity(held.images[rows], [held_captions[i] for i in rows], train, captions)
    result.pop("nearest")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--captions-set", choices=("shapes", "subjects24"), default="shapes")
    p.add_argument("--n", type=int, default=960)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--model-size", default="small")
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--snapshots", default="400,800,1600,2400")
    p.add_argument("--captions", type=int, default=96, help="distinct captions checked")
    p.add_argument("--per-caption", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--recheck", action="store_true", help="check the saved snapshots of --out again, no training")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.vae_steps, args.snapshots, args.captions = 48, 5, "2,4", 8
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    snapshots = sorted({int(s) for s in args.snapshots.split(",")})
    data = load_shapes(n=args.n, size=args.size, seed=0)
    captions = captions_of(data.metadata, args.captions_set)
    check = CheckCaptionsSpec(checkpoint=str(out), captions=args.captions, per_caption=args.per_caption,
                              seed=args.seed)
    rows = []
    real = real_reference(data.images, captions, args.captions_set, args.n, args.size, args.per_caption)
    log(f"real held-out images: words {real['words']:.3f} (chance {real['words_chance']:.3f}), exact "
        f"{real['exact']:.3f} (chance {real['exact_chance']:.3f})")
    components = build_components(captions, image_size=args.size, seed=args.seed, model_size=args.model_size)
    start = time.perf_counter()
    if args.recheck:
        old = {r["unet_steps"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
        for step in snapshots:
            adapter = adapter_of(out / f"step{step}")
            result = fidelity_of(adapter, adapter.load(out / f"step{step}"), data.images, captions, check,
                                 hint="(bench)", progress=False)
            rows.append({**old[step], **result})
        return write(out, args, real, rows)

    def after(step: int) -> None:
        if step not in snapshots:
            return
        folder = out / f"step{step}"
        save_pipeline(components, folder)
        adapter = adapter_of(folder)
        t0 = time.perf_counter()
        result = fidelity_of(adapter, adapter.load(folder), data.images, captions, check,
                             hint="(bench)", progress=False)
        rows.append({"unet_steps": step, **result, "check_seconds": round(time.perf_counter() - t0, 1),
                     "train_seconds": round(t0 - start, 1)})
        log(f"step {step}: words {result['words']:.3f} (chance {result['words_chance']:.3f}), exact "
            f"{result['exact']:.3f} (chance {result['exact_chance']:.3f}), above chance {result['above_chance']:.3f}")
        (out / "results.json").write_text(json.dumps({"args": vars(args), "real": real, "rows": rows}, indent=2))
        for part in ("unet", "text_encoder"):
            components[part].train()  # save_pipeline leaves the modes alone; keep the training mode explicit

    pretrain(components, data.images, captions, vae_steps=args.vae_steps, unet_steps=max(snapshots),
             batch_size=args.batch_size, lr=1e-3, seed=args.seed, progress=False, after_unet_step=after)
    return write(out, args, real, rows)


def write(out: Path, args, real: dict, rows: list[dict]) -> int:
    (out / "results.json").write_text(json.dumps({"args": vars(args), "real": real, "rows": rows}, indent=2))
    lines = ["| UNet steps | words | chance | exact | chance | above chance | least rendered | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows + [{**real, "unet_steps": "real held-out", "train_seconds": "—"}]:
        least = ", ".join(f"{w} {r['by_word'][w]['rate']:.2f}" for w in r.get("least_rendered", []))
        lines.append(f"| {r['unet_steps']} | {r['words']:.3f} | {r['words_chance']:.3f} | {r['exact']:.3f} | "
                     f"{r['exact_chance']:.3f} | {r['above_chance']:.3f} | {least} | {r['train_seconds']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
