"""Where examples come from: a dataset spec (with its options and ids) or a directory of generated samples.

A *source* is a small JSON-able dict recorded in feature-store manifests, so later stages (the report,
evaluation) can reload exactly the images that were featurized:

    {"kind": "dataset", "spec": "digits", "n": null, "size": null, "seed": 0, "ids_sha256": "..."}
    {"kind": "samples", "path": "/abs/dir", "fingerprint": "..."}

A samples directory holds ``images.npy`` (n, C, H, W) in [-1, 1], ``ids.npy``, ``cond.npy`` (conditional
models; -1 = null token) and ``manifest.json`` (checkpoint fingerprint, sampler settings, seed).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradtrace.data.registry import load_dataset
from gradtrace.errors import UserError
from gradtrace.io import check_finite, read_json, sha256_arrays, versions, write_json_atomic, write_npy_atomic


@dataclass
class Examples:
    """Images with their ids, optional conditioning codes, captions and the source that reloads them."""

    images: torch.Tensor
    ids: np.ndarray
    cond: np.ndarray | None
    captions: list[str]
    source: dict
    texts: list[str] | None = None  # the text each example is conditioned on: "text" column or sample prompt

    def take(self, rows) -> "Examples":
        """The examples at positions `rows` (integers), every per-example field alike."""
        rows = np.asarray(rows, dtype=np.int64)
        return Examples(images=self.images[torch.as_tensor(rows)], ids=self.ids[rows],
                        cond=None if self.cond is None else self.cond[rows],
                        captions=[self.captions[r] for r in rows], source=self.source,
                        texts=None if self.texts is None else [self.texts[r] for r in rows])


def require_images(dataset, who: str) -> None:
    """Refuse a dataset without images (text documents) for a model that trains on images, in one line."""
    if not hasattr(dataset, "channels"):
        raise UserError(f"dataset '{dataset.name}' is text, but {who} train on images (digits, shapes, "
                        "imagefolder:PATH); to train a language model on text pass --base LM_FOLDER (a "
                        "transformers causal LM; `gradtrace build-lm` makes a small one)")


def read_ids(path) -> np.ndarray:
    """Training ids from a .npy file, a JSON list or a text file with one integer per line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"ids file not found: {path}")
    try:
        if path.suffix == ".npy":
            ids = np.load(path)
        elif path.suffix == ".json":
            ids = np.asarray(read_json(path, "ids file"))
        else:
            ids = np.asarray([int(x) for x in path.read_text().split()])
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read ids from {path}: {exc}; write one integer id per line")
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise UserError(f"ids in {path} must be a flat list of integers, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size == 0:
        raise UserError(f"{path} holds no ids; write at least one example id (one integer per line)")
    return ids.astype(np.int64)


def dataset_source(spec: str, *, n: int | None = None, size: int | None = None, seed: int = 0) -> dict:
    """The source record of a dataset spec and its options (what checkpoints and stores record)."""
    return {"kind": "dataset", "spec": spec, "n": n, "size": size, "seed": seed}


def open_dataset(source: dict, fingerprint: str | None = None):
    """The dataset of a source record; refused when `fingerprint` is given and the data changed since."""
    if not isinstance(source, dict) or source.get("kind", "dataset") != "dataset" or not source.get("spec"):
        raise UserError(f"not a dataset source: {source!r}; pass --data")
    ds = load_dataset(source["spec"], n=source.get("n"), size=source.get("size"), seed=source.get("seed", 0))
    if fingerprint and ds.fingerprint() != fingerprint:
        raise UserError(f"dataset '{source['spec']}' no longer matches the one the run was trained on "
                        "(fingerprint differs); retrain the full model on the current data")
    return ds


def dataset_examples(spec: str, *, n: int | None = None, size: int | None = None, seed: int = 0,
                     ids=None, attribute_values: dict | None = None,
                     labels: tuple[str, list[str]] | None = None) -> Examples:
    """Examples of a dataset (optionally a subset of ids); codes checked against a model's vocabulary, or with
    `labels` = (attribute, classes) the conditioning is each image's class index (N,) (a classifier's label)."""
    ds = open_dataset(dataset_source(spec, n=n, size=size, seed=seed))
    if not hasattr(ds, "images"):
        raise UserError(f"dataset '{spec}' is text; this step shows images (for a language model's attributions, "
                        "read attributions.json and report.md)")
    if ids is not None:
        ds = ds.subset(np.asarray(ids, dtype=np.int64))
    cond = None
    if labels is not None:
        cond = ds.class_indices(*labels)
    elif attribute_values:
        if {k: list(v) for k, v in ds.attributes.items()} != {k: list(v) for k, v in attribute_values.items()}:
            raise UserError(f"dataset '{spec}' has attributes {sorted(ds.attributes)} with other values than the "
                            f"model was trained on ({sorted(attribute_values)}); use the model's training data")
        cond = ds.attribute_codes()
    captions = [_caption(m) for m in ds.metadata]
    texts = [m["text"] for m in ds.metadata] if all(isinstance(m.get("text"), str) for m in ds.metadata) else None
    source = {**dataset_source(spec, n=n, size=size, seed=seed), "ids_sha256": sha256_arrays([ds.ids]),
              "fingerprint": ds.fingerprint()}
    return Examples(images=ds.images, ids=ds.ids, cond=cond, captions=captions, source=source, texts=texts)


def _caption(meta: dict) -> str:
    keys = [k for k in ("label", "subject", "style", "background") if k in meta]
    return " ".join(str(meta[k]) for k in keys)


SAMPLE_CAUSE = ("the model diverged or the sampling schedule is unstable; check the checkpoint (its training loss), "
                "or sample with more --sample-steps or --eta 0")


def save_samples(path, images: torch.Tensor, cond: np.ndarray | None, info: dict) -> None:
    check_finite(images, "sample", SAMPLE_CAUSE)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_npy_atomic(path / "images.npy", images.detach().cpu().numpy().astype(np.float32))
    write_npy_atomic(path / "ids.npy", np.arange(len(images), dtype=np.int64))
    if cond is not None:
        write_npy_atomic(path / "cond.npy", np.asarray(cond, dtype=np.int64))
    elif (path / "cond.npy").exists():
        (path / "cond.npy").unlink()
    manifest = {"format": "gradtrace-samples", "format_version": 1, **info,
                "fingerprint": sha256_arrays([images]), "versions": versions()}
    write_json_atomic(path / "manifest.json", manifest)


def samples_examples(path, *, attribute_values: dict | None = None) -> Examples:
    path = Path(path)
    manifest = read_json(path / "manifest.json", "samples manifest")
    if manifest.get("format") != "gradtrace-samples":
        raise UserError(f"{path} is not a gradtrace samples directory; create one with `gradtrace sample`")
    try:
        images = np.load(path / "images.npy")
        ids = np.load(path / "ids.npy")
        cond = np.load(path / "cond.npy") if (path / "cond.npy").exists() else None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read samples in {path}: {exc}; sample again")
    if images.ndim != 4 or len(images) != len(ids):
        raise UserError(f"samples in {path} have shape {images.shape}; expected (n, C, H, W) with {len(ids)} ids")
    values = manifest.get("attribute_values") or {}
    captions = []
    for r in range(len(ids)):
        if cond is None:
            captions.append(f"sample {int(ids[r])}")
        else:
            names = list(values)
            captions.append(" ".join(values[names[a]][c] if c >= 0 else "·" for a, c in enumerate(cond[r])))
    prompts = manifest.get("prompts")
    if prompts is not None:
        if len(prompts) != len(ids):
            raise UserError(f"samples in {path} have {len(ids)} images but {len(prompts)} prompts; sample again")
        captions = list(prompts)
    source = {"kind": "samples", "path": str(path.resolve()), "fingerprint": manifest.get("fingerprint")}
    return Examples(images=torch.from_numpy(images), ids=ids.astype(np.int64), cond=cond, captions=captions,
                    source=source, texts=None if prompts is None else list(prompts))


SAMPLING_KEYS = ("guidance", "sampler", "sample_steps", "eta")


def sampling_of(source: dict | None) -> dict | None:
    """How generated samples were drawn ({"guidance", "sampler", "sample_steps", "eta"} from their manifest); None
    for dataset examples, or when the samples folder is gone."""
    if not source or source.get("kind") != "samples":
        return None
    try:
        manifest = read_json(Path(source["path"]) / "manifest.json", "samples manifest")
    except UserError:
        return None
    return {k: manifest.get(k) for k in SAMPLING_KEYS if k in manifest}


TEXT_CHARS = 200  # characters of a document's text kept in an example's source record (the rest: "…")


def example_sources(source: dict, ids) -> list[dict]:
    """What each example of a source record is, for people reading attributions: per id in `ids`, a dict with
    "file" (a folder's file name, relative to it), "text" (a caption, a prompt, or the start of a document) and
    "caption" (labels and attributes, e.g. "circle stripes plain"), each where the data has it; generated
    samples add "sample" (their index in the samples folder)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if source.get("kind") == "samples":
        ex = samples_examples(source["path"])
        pos = {int(i): r for r, i in enumerate(ex.ids)}
        out = []
        for i in ids.tolist():
            r = pos.get(i)
            if r is None:
                raise UserError(f"id {i} is not a sample of {source['path']}; featurize the samples again")
            record = {"sample": int(i), "caption": ex.captions[r]}
            if ex.texts is not None:
                record["text"] = ex.texts[r]
            out.append(record)
        return out
    ds = open_dataset(source)
    rows = ds.index_of(ids)
    texts = getattr(ds, "texts", None)
    out = []
    for r in rows.tolist():
        meta = ds.metadata[r]
        record = {}
        if isinstance(meta.get("file_name"), str):
            record["file"] = meta["file_name"]
        text = texts[r] if texts is not None else meta.get("text")
        if isinstance(text, str):
            record["text"] = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"
        if _caption(meta):
            record["caption"] = _caption(meta)
        out.append(record)
    return out


def load_source(source: dict, *, attribute_values: dict | None = None, ids=None,
                labels: tuple[str, list[str]] | None = None) -> Examples:
    """The examples of a source record (a dataset's optionally only `ids`), e.g. those a store was made from;
    `labels` (attribute, classes): labelled dataset images, whose conditioning is their class index."""
    if source.get("kind") == "samples":
        if ids is not None:
            raise UserError("--ids selects dataset examples; it cannot be used with --samples")
        if labels is not None:
            raise UserError("a classifier attributes labelled images, not generated samples; pass --data "
                            "(and --ids) instead of --samples")
        ex = samples_examples(source["path"], attribute_values=attribute_values)
    elif source.get("kind") == "dataset":
        ex = dataset_examples(source["spec"], n=source.get("n"), size=source.get("size"),
                              seed=source.get("seed", 0), ids=ids, attribute_values=attribute_values, labels=labels)
    else:
        raise UserError(f"unknown example source {source!r}; featurize again with this version of gradtrace")
    if source.get("fingerprint") and ex.source.get("fingerprint") and \
            source["kind"] == "samples" and source["fingerprint"] != ex.source["fingerprint"]:
        raise UserError(f"samples at {source['path']} changed since they were featurized; featurize them again")
    return ex
