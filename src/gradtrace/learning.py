"""The learn-weights stage: learning queries, the label-free λ choice, and the weights artefact.

Learning queries are generated samples (or held-out images), never the evaluation queries: the weights
file records the learning-query set's identity and `attribute` refuses to score that same set.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gradtrace.errors import UserError
from gradtrace.features.store import FeatureStore
from gradtrace.manifest import sha256_arrays


def query_set_id(store: FeatureStore) -> dict:
    """Identity of a query set: its source and a hash of its ids (recorded in weights provenance)."""
    src = store.settings.get("source", {})
    return {"source": src, "ids_sha256": sha256_arrays([store.ids])}


def store_identity(store: FeatureStore) -> dict:
    """What a weights file must match to be used with a training store."""
    s = store.settings
    return {"model_fingerprint": s["model_fingerprint"], "groups_spec": s["groups_spec"],
            "projection": s["projection"], "measurement": s["measurement"],
            "train_ids_sha256": sha256_arrays([store.ids])}


def default_weights_path(train: FeatureStore, method: str, kernel: str, aspect: str | None) -> Path:
    kind = "identity" if method == "tracin" else kernel
    return train.path / "weights" / f"{method}-{kind}-{aspect or 'general'}.json"


def generate_learning_queries(train: FeatureStore, out: Path, *, num: int, aspect: str | None, seed: int,
                              guidance: float, sample_steps: int, progress: bool) -> FeatureStore:
    """Sample `num` learning queries from the training store's checkpoint (only `aspect` set, if given)
    and featurize them with the training store's exact settings."""
    from gradtrace.aspects import query_codes
    from gradtrace.commands import featurize_run, sample_run
    from gradtrace.features.featurize import spec_of
    from gradtrace.models import load_checkpoint

    checkpoint = train.manifest.get("provenance", {}).get("checkpoint")
    if not checkpoint:
        raise UserError(f"{train.path} does not record its checkpoint; pass --queries with featurized learning queries")
    ckpt = load_checkpoint(checkpoint)
    codes = None
    if aspect is not None or ckpt.model.conditional:
        codes = query_codes(ckpt.model.attribute_values, num, aspect=aspect, seed=seed)
    sample_run(checkpoint, out / "samples", num=num, codes=codes, guidance=guidance, sample_steps=sample_steps,
               seed=seed, progress=progress)
    return featurize_run(checkpoint, out / "features", samples=out / "samples", spec=spec_of(train.settings),
                         overwrite=True, progress=progress)


def learn_weights_run(train_path, out=None, *, queries_path=None, generate: int | None = None,
                      aspect: str | None = None, sample_seed: int = 1, guidance: float = 1.0,
                      sample_steps: int = 50, method: str = "trak", kernel: str = "shared", c="0.01",
                      k: int | None = None, steps: int | None = None, lr: float | None = None,
                      l2: float | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Learn group weights for a training store; returns (weights file, its document)."""
    from gradtrace.attribute import fit_method
    from gradtrace.weights import learn_weights, save_weights
    from gradtrace.weights.defaults import DEFAULT_K, DEFAULT_L2, DEFAULT_LR, DEFAULT_STEPS

    train = FeatureStore.open(train_path)
    if (queries_path is None) == (generate is None):
        raise UserError("pass exactly one of --queries STORE or --generate N")
    if aspect is not None and queries_path is not None:
        raise UserError("--aspect generates its own learning queries; use it with --generate N, not --queries")
    out = Path(out) if out else default_weights_path(train, method, kernel, aspect)
    if generate is not None:
        if generate < 1:
            raise UserError(f"--generate must be a positive number of queries, got {generate}")
        queries = generate_learning_queries(train, out.with_suffix(""), num=generate, aspect=aspect,
                                            seed=sample_seed, guidance=guidance, sample_steps=sample_steps,
                                            progress=progress)
    else:
        queries = FeatureStore.open(queries_path)
    train.check_compatible(queries)
    k = DEFAULT_K if k is None else k
    c_value, lambda_table = resolve_lambda(train, queries, method, kernel, c, k)
    fitted = fit_method(train, method, kernel=kernel, c=c_value, progress=progress)
    result = learn_weights(fitted, np.asarray(queries.features), k=k,
                           steps=DEFAULT_STEPS if steps is None else steps, lr=DEFAULT_LR if lr is None else lr,
                           l2=DEFAULT_L2 if l2 is None else l2, progress=progress)
    provenance = {
        "command": " ".join(["gradtrace", *sys.argv[1:]]),
        "base_method": fitted.info, "method": method, "kernel": kernel if method != "tracin" else "identity",
        "lambda_c": c_value, "lambda_grid": lambda_table, "aspect": aspect,
        "train_store": str(train.path), "store": store_identity(train),
        "groups_preset": train.settings["groups_spec"], "k": result.info["k"], "l2": result.info["l2"],
        "steps": result.info["steps"], "lr": result.info["lr"],
        "learning_queries": {"store": str(queries.path), **query_set_id(queries)},
        "loss_first": result.loss_curve[0], "loss_last": result.loss_curve[-1],
        "learner": result.info,
    }
    path = save_weights(out, result, provenance)
    from gradtrace.manifest import read_json

    return path, read_json(path, "weights file")


def resolve_lambda(train: FeatureStore, queries: FeatureStore, method: str, kernel: str, c, k: int):
    """(c, grid table or None): a number, or 'auto' = the SNR-best c on the learning queries."""
    if method == "tracin":
        return 0.0, None
    if str(c).lower() != "auto":
        try:
            value = float(c)
        except ValueError:
            raise UserError(f"--lambda-c must be a number or 'auto', got {c!r}")
        if not value >= 0:
            raise UserError(f"--lambda-c must be >= 0, got {c}")
        return value, None
    from gradtrace.weights import choose_lambda_scale

    best, table = choose_lambda_scale(train.features, train.group_slices, np.asarray(queries.features),
                                      method=method, kernel=kernel, k=k)
    return float(best), [[float(a), float(b)] for a, b in table]


def resolve_lambda_for_attribution(train: FeatureStore, queries: FeatureStore, *, method: str, kernel: str, c,
                                   weights_info: dict | None, learning_queries=None) -> tuple[float, dict]:
    """(c, its provenance) for `attribute`: a number; 'auto' = SNR-best on `learning_queries` (a store that
    is not `queries`: the choice never reads the queries attributed); None = the weights' c, else the default."""
    from gradtrace.methods import DEFAULT_C
    from gradtrace.weights.defaults import DEFAULT_K

    auto = c is not None and str(c).lower() == "auto"
    if learning_queries is not None and not auto:
        raise UserError("--learning-queries is only used with --lambda-c auto; drop it or pass --lambda-c auto")
    if c is None:
        from_weights = weights_info and weights_info.get("lambda_c") is not None
        value = weights_info["lambda_c"] if from_weights else DEFAULT_C
        return float(value), {"c": float(value), "rule": "weights file" if from_weights else "default"}
    if not auto:
        value, _ = resolve_lambda(train, queries, method, kernel, c, DEFAULT_K)
        return value, {"c": value, "rule": "given"}
    if method == "tracin":
        raise UserError("--lambda-c auto needs a method with a λ (trak or dtrak); tracin has none")
    if learning_queries is None:
        raise UserError("--lambda-c auto chooses c on learning queries; pass --learning-queries STORE "
                        "(featurized generated samples or held-out images, not the --queries)")
    learn = FeatureStore.open(learning_queries)
    train.check_compatible(learn)
    if query_set_id(learn) == query_set_id(queries):
        raise UserError(f"--learning-queries {learn.path} holds the same queries as --queries; choose λ on "
                        f"other queries (learning and evaluation queries must be disjoint)")
    value, table = resolve_lambda(train, learn, method, kernel, "auto", min(DEFAULT_K, len(train.ids)))
    return value, {"c": value, "rule": "auto: SNR-best on the learning queries", "grid": table,
                   "learning_queries": {"store": str(learn.path), **query_set_id(learn)}}


def weights_for_attribution(train: FeatureStore, queries: FeatureStore, *, weights_path=None,
                            aspect: str | None = None, method: str, kernel: str):
    """(weights (M,), info) for `attribute`, refusing files for other stores, groups, methods or the
    same queries the weights were learned on; (None, None) when neither option is given."""
    from gradtrace.weights import load_weights

    if weights_path is None and aspect is None:
        return None, None
    if weights_path is None:
        weights_path = default_weights_path(train, method, kernel, aspect)
        if not weights_path.exists():
            raise UserError(f"no weights for aspect '{aspect}' at {weights_path}; run `gradtrace learn-weights "
                            f"--train {train.path} --generate 64 --aspect {aspect} --method {method}` first")
    w, doc = load_weights(weights_path, train.group_names)
    prov = doc.get("provenance", {})
    mine = store_identity(train)
    for key in ("model_fingerprint", "groups_spec", "projection", "measurement", "train_ids_sha256"):
        if prov.get("store", {}).get(key) != mine[key]:
            raise UserError(f"{weights_path} was learned for another training store ('{key}' differs); "
                            f"learn weights for {train.path}")
    kind = "identity" if method == "tracin" else kernel
    if (prov.get("method"), prov.get("kernel")) != (method, kind):
        raise UserError(f"{weights_path} was learned for {prov.get('method')}/{prov.get('kernel')}, not "
                        f"{method}/{kind}; pass the matching --method/--kernel or learn weights for this one")
    learned_on = prov.get("learning_queries", {})
    if learned_on.get("ids_sha256") == query_set_id(queries)["ids_sha256"] and \
            learned_on.get("source") == query_set_id(queries)["source"]:
        raise UserError(f"the queries {queries.path} are the learning queries of {weights_path}; evaluate "
                        f"on other queries (learning and evaluation queries must be disjoint)")
    return w, {"path": str(weights_path), "aspect": prov.get("aspect"), "lambda_c": prov.get("lambda_c"),
               "weights": doc.get("weights")}
