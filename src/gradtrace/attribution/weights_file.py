"""Which group-weights files a scoring stage accepts: one rule for `attribute`, `eval lds` and `eval counterfactual`.

A weights file is either

- a file written by `learn-weights` (``"format": "gradtrace.group-weights/1"``): its groups must be the
  training store's, it must have been learned for this training store (model, groups, projection,
  measurement, training ids) and this method and kernel, and the queries scored must not be its learning
  queries; or
- a plain JSON ``{"weights": {group: weight, ...}}`` (no "format" key), naming every group of the store
  exactly, with finite non-negative weights that are not all zero (weights from elsewhere; nothing to check
  them against but the groups).

Learning and evaluation queries are identified by `query_set_id` (their source and a hash of their ids).
`report --weights` applies the same rule's store part (`weights_for`) to the runs it shows: the groups, and for a
learned file the training store it was learned for.

A method that needs the model (EK-FAC) has no store: `read_model_weights` takes a file learned for the same method,
model, training set and measurement (its session's identity), or a plain file naming the method's groups.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from gradtrace.data.sources import sampling_of
from gradtrace.errors import GradtraceWarning, UserError
from gradtrace.features.store import FeatureStore
from gradtrace.io import read_json, sha256_arrays
from gradtrace.methods import configure
from gradtrace.weights import load_weights

STORE_KEYS = ("model_fingerprint", "groups_spec", "projection", "measurement", "train_ids_sha256")


def query_set_id(queries) -> dict:
    """Identity of a query set, a feature store or examples (`gradtrace.data.sources.Examples`): its source and a
    hash of its ids (recorded in weights provenance)."""
    if isinstance(queries, FeatureStore):
        return {"source": queries.settings.get("source", {}), "ids_sha256": sha256_arrays([queries.ids])}
    return {"source": queries.source, "ids_sha256": sha256_arrays([np.asarray(queries.ids, np.int64)])}


def store_identity(store: FeatureStore) -> dict:
    """What a weights file must match to be used with a training store."""
    s = store.settings
    return {"model_fingerprint": s["model_fingerprint"], "groups_spec": s["groups_spec"],
            "projection": s["projection"], "measurement": s["measurement"],
            "train_ids_sha256": sha256_arrays([store.ids])}


def default_weights_path(train: FeatureStore, method, kernel: str, aspect: str | None) -> Path:
    """STORE/weights/METHOD-KERNEL-ASPECT.json, where `learn-weights` writes and `--aspect` reads."""
    base = configure(method, kernel=kernel)
    return train.path / "weights" / f"{base.name}-{base.kernel_kind}-{aspect or 'general'}.json"


def weights_for(path, group_names: list[str], identity: dict, what: str) -> tuple[np.ndarray, dict]:
    """(weights (M,) in the order of `group_names`, the file's document) of a weights file for a training store
    with these groups and this identity (`store_identity`, or the part of it a reader knows): a learned file must
    name exactly these groups and have been learned for a store that agrees on every key of `identity`; a plain
    file must name exactly these groups. `what` names the store in the fix."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file not found: {path}")
    doc = read_json(path, "weights file")
    if isinstance(doc, dict) and "format" in doc:
        w, doc = load_weights(path, group_names)
        prov = doc.get("provenance") if isinstance(doc.get("provenance"), dict) else {}
        recorded = prov.get("store") or prov.get("identity") or {}
        for key in (k for k in STORE_KEYS if k in identity):
            if recorded.get(key) != identity[key]:
                raise UserError(f"{path} was learned for another training store ('{key}' differs); "
                                f"learn weights for {what}")
        return w, doc
    return _plain_weights(path, doc, group_names), doc


def read_group_weights(train: FeatureStore, queries: FeatureStore, path, *, method,
                       kernel: str) -> tuple[np.ndarray, dict]:
    """(weights (M,) float64 in the store's group order, a description for manifests); see the module rule."""
    path = Path(path)
    w, doc = weights_for(path, train.group_names, store_identity(train), str(train.path))
    if "format" in doc:
        _check_learned_for(doc.get("provenance", {}), train, queries, path, method, kernel)
    prov = doc.get("provenance", {}) if isinstance(doc.get("provenance"), dict) else {}
    return np.asarray(w, dtype=np.float64), {
        "path": str(path.resolve()), "format": doc.get("format", "plain"), "aspect": prov.get("aspect"),
        "apply": prov.get("apply", "query"),
        "lambda_c": prov.get("lambda_c"), "weights": dict(zip(train.group_names, np.asarray(w).tolist()))}


def _check_learned_for(prov: dict, train: FeatureStore, queries: FeatureStore, path: Path, method,
                       kernel: str) -> None:
    base = configure(method, kernel=kernel)
    name, kind = base.name, base.kernel_kind
    if (prov.get("method"), prov.get("kernel")) != (name, kind):
        raise UserError(f"{path} was learned for {prov.get('method')}/{prov.get('kernel')}, not "
                        f"{name}/{kind}; pass the matching --method/--kernel or learn weights for this one")
    learned_on = prov.get("learning_queries", {})
    mine_q = query_set_id(queries)
    if learned_on.get("ids_sha256") == mine_q["ids_sha256"] and learned_on.get("source") == mine_q["source"]:
        raise UserError(f"the queries {queries.path} are the learning queries of {path}; evaluate "
                        f"on other queries (learning and evaluation queries must be disjoint)")
    check_same_guidance(learned_on.get("sampling"), sampling_of(mine_q["source"]), path)


def check_same_guidance(learned: dict | None, scored: dict | None, path) -> None:
    """Warn (GradtraceWarning) when the learning queries of a weights file and the queries scored were sampled
    with different classifier-free guidance: weights learned on one kind of image, used on another."""
    if not learned or not scored or learned.get("guidance") is None or scored.get("guidance") is None:
        return
    if float(learned["guidance"]) != float(scored["guidance"]):
        warnings.warn(GradtraceWarning(
            f"the learning queries of {path} were sampled with guidance {learned['guidance']:g}, the queries scored "
            f"with {scored['guidance']:g}; learn the weights on queries sampled alike (learn-weights --generate N "
            f"--guidance {scored['guidance']:g})"), stacklevel=2)


def _plain_weights(path: Path, doc, group_names: list[str]) -> np.ndarray:
    table = doc.get("weights") if isinstance(doc, dict) else None
    if not isinstance(table, dict):
        raise UserError(f"{path} is not a weights file (no 'weights' object); write {{\"weights\": {{group: weight, "
                        "...}} or pass a file written by `gradtrace learn-weights`")
    missing = [g for g in group_names if g not in table]
    extra = [g for g in table if g not in group_names]
    if missing or extra:
        raise UserError(f"weights in {path} do not name the feature groups (missing {missing[:3]}, unknown "
                        f"{extra[:3]}); learn them on features with the same groups")
    try:
        w = np.asarray([float(table[g]) for g in group_names], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"weights in {path} must be numbers") from None
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise UserError(f"weights in {path} must be finite, non-negative and not all zero")
    return w


def read_model_weights(session, queries, path) -> tuple[np.ndarray, dict]:
    """Weights in the session's group order for a method that needs the model: a `learn-weights` file learned for
    this method, model, training set and measurement on other queries, or a plain {"weights": {group: w}}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    doc = read_json(path, "weights file")
    names, name = session.group_names, session.method.name
    if isinstance(doc, dict) and "format" in doc:
        w, doc = load_weights(path, names)
        prov = doc.get("provenance", {})
        mine = {k: session.identity[k] for k in ("model_fingerprint", "train_ids_sha256")}
        if prov.get("method") != name or {k: prov.get("identity", {}).get(k) for k in mine} != mine \
                or prov.get("measurement") != session.measurement:
            raise UserError(f"{path} was not learned for {name} on this model, training set and measurement; "
                            f"learn them with learn-weights --method {name}")
        if prov.get("learning_queries") == query_set_id(queries):
            raise UserError(f"the queries are the learning queries of {path}; evaluate on other ids")
    else:
        table = doc.get("weights") if isinstance(doc, dict) else None
        if not isinstance(table, dict) or sorted(table) != sorted(names):
            raise UserError(f"{path} must hold {{\"weights\": {{group: weight}}}} naming the {name} groups "
                            f"{', '.join(names)}")
        w = np.asarray([table[n] for n in names], dtype=np.float64)
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise UserError(f"weights in {path} must be finite, non-negative and not all zero")
    prov = doc.get("provenance", {}) if isinstance(doc.get("provenance"), dict) else {}
    return w, {"path": str(path.resolve()), "format": doc.get("format", "plain"), "aspect": None,
               "lambda_c": prov.get("lambda_c"), "weights": dict(zip(names, np.asarray(w).tolist()))}
