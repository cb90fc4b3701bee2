"""What each CLI subcommand does; every stage writes its artefact with a manifest beside it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from gradtrace.errors import UserError

# The preferred model kind per dataset when --model auto: digits are the unconditional benchmark.
AUTO_MODEL = {"digits": "unconditional"}


def _progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def _command_line() -> str:
    return " ".join(["gradtrace", *sys.argv[1:]])


def _check_positive(value, flag: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} must be a positive integer, got {value}")


# ------------------------------------------------------------------------------------------ train
def train_run(data: str, out, *, n=None, size=None, data_seed=0, ids=None, model="auto", steps=3000,
              batch_size=64, lr=None, seed=0, progress=True) -> Path:
    """Train (or reuse, when an identical checkpoint exists at `out`) and save a checkpoint."""
    from gradtrace.data import load_dataset
    from gradtrace.models import TrainConfig, default_model_config, save_checkpoint, train

    for value, flag in ((steps, "--steps"), (batch_size, "--batch-size"), (n, "--n")):
        _check_positive(value, flag)
    ds = load_dataset(data, n=n, size=size, seed=data_seed)
    kind = model
    if kind == "auto":
        kind = AUTO_MODEL.get(data, "conditional" if ds.attributes else "unconditional")
    if kind == "conditional" and not ds.attributes:
        raise UserError(f"dataset '{data}' has no attributes to condition on; use --model unconditional "
                        f"or add attribute columns to metadata.jsonl")
    model_config = default_model_config(kind, channels=ds.channels, size=ds.size,
                                        attributes=ds.attributes if kind == "conditional" else None)
    cfg_kwargs = {"steps": steps, "batch_size": batch_size, "seed": seed}
    if lr is not None:
        cfg_kwargs["lr"] = lr
    train_config = TrainConfig(**cfg_kwargs)
    source = {"kind": "dataset", "spec": data, "n": n, "size": size, "seed": data_seed}
    out = Path(out)
    cached = _cached_checkpoint(out, model_config, train_config, ds, ids)
    if cached:
        return out
    model_obj = train(model_config, ds, train_config, ids=ids, progress=progress)
    save_checkpoint(out, model_obj, train_config=train_config, dataset_info={**ds.info(), "source": source},
                    train_ids=None if ids is None else [int(i) for i in ids],
                    extra={"command": _command_line()})
    return out


def _cached_checkpoint(out: Path, model_config, train_config, ds, ids) -> bool:
    """True when `out` already holds a checkpoint trained with exactly these settings and data."""
    from dataclasses import asdict

    path = out / "config.json"
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    want_ids = None if ids is None else sorted(int(i) for i in ids)
    old_ids = old.get("train_ids")
    return (old.get("model_config") == json.loads(json.dumps(model_config))
            and old.get("train_config") == json.loads(json.dumps(asdict(train_config)))
            and (old.get("dataset") or {}).get("fingerprint") == ds.fingerprint()
            and (None if old_ids is None else sorted(old_ids)) == want_ids)


def cmd_train(args) -> None:
    from gradtrace.sources import read_ids

    ids = read_ids(args.ids) if args.ids else None
    out = train_run(args.data, args.out, n=args.n, size=args.size, data_seed=args.data_seed, ids=ids,
                    model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, progress=_progress(args))
    print(f"checkpoint: {out}")


# ------------------------------------------------------------------------------------------ sample
def parse_attrs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--attr '{pair}' is not NAME=VALUE; write e.g. --attr style=stripes")
        name, value = pair.split("=", 1)
        out[name.strip()] = value.strip()
    return out


def sample_run(checkpoint, out, *, num=16, attrs=None, codes=None, guidance=1.0, sampler="ddim", sample_steps=50,
               seed=0, eta=1.0, progress=True) -> Path:
    """Generate `num` images; `attrs` (name -> value, the same for all) or `codes` (num, A) per image."""
    from gradtrace.models import load_checkpoint, sample
    from gradtrace.report import image_grid
    from gradtrace.sources import save_samples

    _check_positive(num, "--num")
    _check_positive(sample_steps, "--sample-steps")
    ckpt = load_checkpoint(checkpoint)
    attrs = attrs or {}
    if attrs and not ckpt.model.conditional:
        raise UserError("this checkpoint is unconditional; drop --attr or train with --model conditional")
    request = codes if codes is not None else (attrs or None)
    images, cond = sample(ckpt.model, ckpt.scheduler, num, attributes=request, guidance_scale=guidance,
                          steps=sample_steps, sampler=sampler, seed=seed, eta=eta, progress=progress)
    info = {"checkpoint": str(Path(checkpoint).resolve()), "model_fingerprint": ckpt.fingerprint,
            "attributes": attrs, "attribute_values": ckpt.model.attribute_values if ckpt.model.conditional else {},
            "guidance": guidance, "sampler": sampler, "sample_steps": sample_steps, "seed": seed,
            "eta": eta if sampler == "ddim" else None,
            "command": _command_line()}
    save_samples(out, images, cond, info)
    image_grid(images.numpy(), Path(out) / "grid.png")
    return Path(out)


def cmd_sample(args) -> None:
    out = sample_run(args.checkpoint, args.out, num=args.num, attrs=parse_attrs(args.attr),
                     guidance=args.guidance, sampler=args.sampler, sample_steps=args.sample_steps,
                     seed=args.seed, eta=args.eta, progress=_progress(args))
    print(f"samples: {out}")


# ------------------------------------------------------------------------------------------ featurize
def featurize_run(checkpoint, out, *, data=None, samples=None, n=None, size=None, data_seed=0, ids=None,
                  spec=None, overwrite=False, progress=True):
    from gradtrace.features.featurize import FeatureSpec, featurize
    from gradtrace.models import load_checkpoint
    from gradtrace.sources import dataset_examples, samples_examples

    spec = spec or FeatureSpec()
    for value, flag in ((spec.total_dim, "--dim"), (spec.num_timesteps, "--timesteps"), (spec.chunk_rows, "--chunk")):
        _check_positive(value, flag)
    ckpt = load_checkpoint(checkpoint)
    values = ckpt.model.attribute_values if ckpt.model.conditional else None
    if data and samples:
        raise UserError("pass either --data or --samples, not both")
    if samples:
        ex = samples_examples(samples, attribute_values=values)
        if ids is not None:
            raise UserError("--ids selects dataset examples; it cannot be used with --samples")
    else:
        if data is None:  # default: the checkpoint's own training data and ids
            src = ckpt.config["dataset"].get("source", {})
            data, n, size, data_seed = src.get("spec"), src.get("n"), src.get("size"), src.get("seed", 0)
            if ids is None and ckpt.config.get("train_ids") is not None:
                ids = np.asarray(ckpt.config["train_ids"], dtype=np.int64)
            if data is None:
                raise UserError("the checkpoint does not record its dataset; pass --data")
        ex = dataset_examples(data, n=n, size=size, seed=data_seed, ids=ids, attribute_values=values)
    if tuple(ex.images.shape[1:]) != (ckpt.model.channels, ckpt.model.size, ckpt.model.size):
        raise UserError(f"images have shape {tuple(ex.images.shape[1:])} but the model takes "
                        f"({ckpt.model.channels}, {ckpt.model.size}, {ckpt.model.size}); pass matching data or --size")
    provenance = {"command": _command_line(), "checkpoint": str(Path(checkpoint).resolve())}
    return featurize(ckpt.model, ckpt.scheduler, ex.images, ex.ids, out, spec=spec, cond=ex.cond,
                     model_fingerprint=ckpt.fingerprint, source=ex.source, provenance=provenance,
                     overwrite=overwrite, progress=progress)


def cmd_featurize(args) -> None:
    from gradtrace.features.featurize import FeatureSpec
    from gradtrace.sources import read_ids

    spec = FeatureSpec(groups=args.groups, projection=args.projection, total_dim=args.dim,
                       projection_seed=args.proj_seed, measurement=args.measurement,
                       num_timesteps=args.timesteps, noise_seed=args.noise_seed, chunk_rows=args.chunk)
    ids = read_ids(args.ids) if args.ids else None
    store = featurize_run(args.checkpoint, args.out, data=args.data, samples=args.samples, n=args.n,
                          size=args.size, data_seed=args.data_seed, ids=ids, spec=spec,
                          overwrite=args.overwrite, progress=_progress(args))
    print(f"features: {store.path} ({store.features.shape[0]} x {store.features.shape[1]})")


# ------------------------------------------------------------------------------------------ attribute
def attribute_run(train_path, query_path, out, *, method="trak", kernel="shared", c=None, top_k=10,
                  weights=None, aspect=None, learning_queries=None, report=True, progress=True) -> dict:
    """Attribute queries; `weights` (a weights file) or `aspect` (the store's learned aspect weights).

    λ scale: `c` when given (a number, or "auto": the SNR-best c on `learning_queries`, which must not be
    the queries attributed), else the one the weights were learned with, else the default."""
    from gradtrace.attribute import attribute
    from gradtrace.features.store import FeatureStore
    from gradtrace.learning import resolve_lambda_for_attribution, weights_for_attribution

    train = FeatureStore.open(train_path)
    queries = FeatureStore.open(query_path)
    train.check_compatible(queries)
    w, w_info = weights_for_attribution(train, queries, weights_path=weights, aspect=aspect, method=method,
                                        kernel=kernel)
    c, lambda_info = resolve_lambda_for_attribution(train, queries, method=method, kernel=kernel, c=c,
                                                    weights_info=w_info, learning_queries=learning_queries)
    doc = attribute(train, queries, out, method=method, kernel=kernel, c=c, top_k=top_k, weights=w,
                    weights_info=w_info, lambda_info=lambda_info, progress=progress)
    if report:
        draw_report(train, queries, doc, Path(out) / "report.png")
    return doc


def draw_report(train, queries, doc: dict, path) -> None:
    from gradtrace.report import attribution_grid
    from gradtrace.sources import load_source

    train_ex = load_source(train.settings["source"])
    query_ex = load_source(queries.settings["source"])
    pos_t = {int(i): r for r, i in enumerate(train_ex.ids)}
    pos_q = {int(i): r for r, i in enumerate(query_ex.ids)}
    rows = doc["queries"][:16]
    q_img = np.stack([query_ex.images[pos_q[r["query_id"]]].numpy() for r in rows])
    t_img = np.stack([[train_ex.images[pos_t[t["train_id"]]].numpy() for t in r["top"]] for r in rows])
    scores = np.array([[t["score"] for t in r["top"]] for r in rows])
    q_titles = [query_ex.captions[pos_q[r["query_id"]]] for r in rows]
    t_titles = [[train_ex.captions[pos_t[t["train_id"]]] for t in r["top"]] for r in rows]
    info = doc["manifest"]["method"]
    title = f"{info.get('method', '?')} ({info.get('kernel', 'identity')} kernel): query, then top-{doc['manifest']['top_k']}"
    attribution_grid(q_img, t_img, scores, path, query_titles=q_titles, train_titles=t_titles, title=title)


def cmd_attribute(args) -> None:
    attribute_run(args.train, args.queries, args.out, method=args.method, kernel=args.kernel, c=args.lambda_c,
                  top_k=args.top_k, weights=args.weights, aspect=args.aspect,
                  learning_queries=args.learning_queries, report=not args.no_report,
                  progress=_progress(args))
    print(f"attributions: {Path(args.out) / 'attributions.json'}")


# ------------------------------------------------------------------------------------------ learn-weights
def cmd_learn_weights(args) -> None:
    from gradtrace.learning import learn_weights_run

    path, doc = learn_weights_run(args.train, args.out, queries_path=args.queries, generate=args.generate,
                                  aspect=args.aspect, sample_seed=args.sample_seed, guidance=args.guidance,
                                  sample_steps=args.sample_steps, method=args.method, kernel=args.kernel,
                                  c=args.lambda_c, k=args.k, steps=args.steps, lr=args.lr, l2=args.l2,
                                  progress=_progress(args))
    prov = doc["provenance"]
    top = sorted(doc["weights"].items(), key=lambda kv: -kv[1])[:5]
    print(f"weights: {path} (loss {prov['loss_first']:.4f} -> {prov['loss_last']:.4f}; top groups: "
          + ", ".join(f"{n}={v:.3f}" for n, v in top) + ")")


# ------------------------------------------------------------------------------------------ demo
def cmd_demo(args) -> None:
    from gradtrace.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=_progress(args))

