"""The Python front door: attribute the model object you already have, on the data you already hold.

    import gradtrace as gt
    tracer = gt.Tracer(model, train=dataset, store="runs/x", tokenizer=tok)  # an AutoModelForCausalLM (peft LoRA or
                                                                          # not) + tokenizer,
                                                                          # a diffusers pipeline (+ UNet LoRA), an
                                                                          # nn.Module classifier, or a folder
    tracer.featurize()                                                    # the resumable feature store, on disk
    result = tracer.attribute(queries, method="trak", top_k=10)           # texts, PIL images, (image, label), Dataset;
                                                                          # prompts of a text-to-image model: sampled
    result                                                                # inline in Jupyter; result.to_pandas()

One code path with the command line: the model is written once into `STORE/model` in the layout its adapter loads
(`gradtrace.pipeline.materialize`), the training data into `STORE/data` (`save_to_disk`, read as `hf:STORE/data`),
and the stages run on them with their own specs (`featurize_run`, `attribute_run`, `learn_weights_run`). So the
feature store made from in-memory weights is the one the CLI makes from a folder of the same weights (same model
fingerprint), and `STORE/tracer.json` records the fingerprints of what was written: other weights or other data in
the same store are refused, as the CLI refuses a changed model, unless `overwrite=True`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

from gradtrace.adapters import ModelAdapter, adapter_of
from gradtrace.data.hf import load_hf
from gradtrace.errors import UserError
from gradtrace.io import read_json, write_json_atomic
from gradtrace.pipeline.attribute import attribute_run
from gradtrace.pipeline.featurize import featurize_run
from gradtrace.pipeline.learn_weights import learn_weights_run
from gradtrace.pipeline.materialize import (
    as_hf_dataset,
    classifier_config,
    dataset_fingerprint,
    model_kind,
    object_fingerprint,
    write_classifier,
    write_dataset,
    write_lm,
    write_peft_lm,
    write_pipeline,
)
from gradtrace.pipeline.report import report_run
from gradtrace.pipeline.result import AttributionResult
from gradtrace.pipeline.sample import sample_run
from gradtrace.pipeline.specs.attribute import AttributeSpec
from gradtrace.pipeline.specs.featurize import FeaturizeSpec
from gradtrace.pipeline.specs.learn_weights import LearnWeightsSpec
from gradtrace.pipeline.specs.report import ReportSpec
from gradtrace.pipeline.specs.sample import SampleSpec
from gradtrace.pipeline.weights_result import WeightsResult

RECORD = "tracer.json"
OWN = ("checkpoint", "out", "data", "samples", "ids", "overwrite")  # set by the Tracer, not by featurize options
FEATURE_OPTIONS = tuple(f.name for f in fields(FeaturizeSpec) if f.name not in OWN)


class Tracer:
    """Attribution for an in-memory model (see the module docstring).

    model: a diffusers text-to-image pipeline (with its UNet LoRA, if any), a transformers causal LM (with
    `tokenizer=`), an `nn.Module` image classifier (rebuilt for later stages by
    `factory(**kwargs)`, default its own class with no arguments; a module gradtrace built needs neither), or a
    checkpoint folder. train: a `datasets.Dataset` or a list of texts / PIL images / (PIL image, label) pairs.
    Other keyword arguments are featurize options (`FeaturizeSpec`: groups, projection, dim, measurement, ...).
    """

    def __init__(self, model, train, store, *, tokenizer=None, factory=None, kwargs: dict | None = None,
                 overwrite: bool = False, progress: bool = True, **featurize_options):
        unknown = sorted(set(featurize_options) - set(FEATURE_OPTIONS))
        if unknown:
            raise UserError(f"unknown featurize option {unknown[0]!r}; use {', '.join(FEATURE_OPTIONS)}")
        self.store, self.progress, self.overwrite = Path(store), progress, overwrite
        self.runs: list[Path] = []      # attribution output folders of this tracer, in order (`report` shows them)
        self.weights: list[Path] = []   # weights files it learned
        self.options = featurize_options
        record = read_json(self.store / RECORD, "tracer record") if (self.store / RECORD).is_file() else {}
        FeaturizeSpec(checkpoint=str(self.store), out=str(self.store / "train"), **self.options)  # checked first
        self.data = self._write_data(train, self.store / "data", record, "train")
        write_json_atomic(self.store / RECORD, record)
        self.checkpoint = self._write_model(model, record, tokenizer=tokenizer, factory=factory, kwargs=kwargs)
        write_json_atomic(self.store / RECORD, record)

    # ------------------------------------------------------------------ writing the model and the data once
    def _write_model(self, model, record: dict, **how) -> Path:
        if isinstance(model, (str, Path)):
            return Path(model)
        kind = model_kind(model)
        folder = self.store / "model"
        fingerprint = object_fingerprint(model)
        written = self.store / record.get("checkpoint", folder.name)
        if written.exists() and record.get("model_fingerprint") == fingerprint:
            return written
        if written.exists() and not self.overwrite:
            raise UserError(f"{self.store} holds features of other weights (the model's fingerprint differs); pass "
                            "overwrite=True to replace them, or use another store")
        if kind == "diffusers":
            folder = write_pipeline(model, self.store / "base", self.store / "lora", folder)
        elif kind == "causal-lm" and hasattr(model, "peft_config"):
            write_peft_lm(model, how["tokenizer"], self.store / "base", folder)
        elif kind == "causal-lm":
            write_lm(model, how["tokenizer"], folder)
        else:
            config = classifier_config(model, load_hf(f"hf:{self.data}"), how["factory"], how["kwargs"])
            write_classifier(model, config, folder)
        record.update(model_fingerprint=fingerprint, adapter=kind, checkpoint=folder.name)
        return folder

    def _write_data(self, data, folder: Path, record: dict, key: str) -> Path:
        ds = as_hf_dataset(data)
        fingerprint = dataset_fingerprint(ds)
        if folder.exists() and record.get(f"{key}_fingerprint") == fingerprint:
            return folder
        if folder.exists() and not self.overwrite:
            raise UserError(f"{folder} holds other {key} data (its fingerprint differs); pass overwrite=True to "
                            "replace it, or use another store")
        write_dataset(ds, folder, self.progress)
        record[f"{key}_fingerprint"] = fingerprint
        return folder

    # ------------------------------------------------------------------ the stages
    def _featurize(self, data: Path, out: Path):
        spec = FeaturizeSpec(checkpoint=str(self.checkpoint), data=f"hf:{data}", out=str(out),
                             overwrite=self.overwrite, **self.options)
        return featurize_run(spec, progress=self.progress)

    def featurize(self):
        """The training set's feature store (`STORE/train`; resumed, or reused when complete)."""
        return self._featurize(self.data, self.store / "train")

    def sample(self, prompts: list[str], **options) -> Path:
        """Images generated by a text-to-image model, one per prompt (`SampleSpec` options: seed, guidance,
        sample_steps, ...): the samples directory `STORE/queries/HASH/samples` (reused when complete)."""
        key = hashlib.sha256(json.dumps([list(prompts), options], sort_keys=True, default=str).encode())
        out = self.store / "queries" / f"prompts-{key.hexdigest()[:16]}" / "samples"
        return sample_run(SampleSpec(checkpoint=str(self.checkpoint), out=str(out), texts=list(prompts), **options),
                          progress=self.progress)

    def featurize_queries(self, queries, name: str | None = None, **sample_options) -> Path:
        """The feature store of `queries` (texts, images, (image, label) pairs or a Dataset; for a text-to-image
        model, prompts: their images are sampled first, see `sample`): `STORE/queries/NAME/features`, NAME
        defaulting to the queries' fingerprint."""
        if self._takes_prompts(queries):
            samples = self.sample(queries, **sample_options)
            spec = FeaturizeSpec(checkpoint=str(self.checkpoint), samples=str(samples),
                                 out=str(samples.parent / "features"), overwrite=self.overwrite, **self.options)
            return featurize_run(spec, progress=self.progress).path
        if sample_options:
            raise UserError(f"sampling options ({', '.join(sample_options)}) need prompts for a text-to-image model")
        ds = as_hf_dataset(queries)
        folder = self.store / "queries" / (name or dataset_fingerprint(ds))
        record = read_json(folder / RECORD, "tracer record") if (folder / RECORD).is_file() else {}
        data = self._write_data(ds, folder / "data", record, "queries")
        write_json_atomic(folder / RECORD, record)
        self._featurize(data, folder / "features")
        return folder / "features"

    def _takes_prompts(self, queries) -> bool:
        """True for a list of strings given to a text-to-image model (prompts to sample, not documents)."""
        if not (isinstance(queries, (list, tuple)) and queries and all(isinstance(q, str) for q in queries)):
            return False
        adapter = adapter_of(self.checkpoint)
        if type(adapter).sample is ModelAdapter.sample:  # a model that does not generate: the strings are documents
            return False
        try:
            request = adapter.query_request(adapter.load(self.checkpoint), len(queries), aspect=None, seed=0,
                                            prompts=list(queries))
        except UserError:
            return False
        return "texts" in request

    def attribute(self, queries, *, method: str = "trak", top_k: int = 10, out=None, sample: dict | None = None,
                  **options) -> AttributionResult:
        """Score `queries` against the training set (featurized first when needed) with `method`; the other
        options are `AttributeSpec`'s (kernel, lambda_c, weights, aspect, compare_uniform, report); `sample`: the
        sampling options of prompts. Returns the result, written to `out` (default
        `STORE/attributions/QUERIES-METHOD`)."""
        train = self.featurize().path
        query_store = self.featurize_queries(queries, **(sample or {}))
        out = Path(out) if out is not None else self.store / "attributions" / f"{query_store.parent.name}-{method}"
        if out.exists() and self.overwrite:
            shutil.rmtree(out)
        options = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}  # weights
        spec = AttributeSpec(train=str(train), queries=str(query_store), out=str(out), method=method, top_k=top_k,
                             **options)
        attribute_run(spec, progress=self.progress)
        self._remember(self.runs, out)
        return AttributionResult.open(out)

    def learn_weights(self, queries, *, out=None, **options) -> WeightsResult:
        """Learn the label-free group weights on learning `queries` (never the evaluation ones); the other options
        are `LearnWeightsSpec`'s. Returns the weights file (a path: `attribute(..., weights=w)` takes it; inline in
        Jupyter: its chart)."""
        train = self.featurize().path
        query_store = self.featurize_queries(queries)
        out = Path(out) if out is not None else self.store / "weights" / f"{query_store.parent.name}.json"
        path, _ = learn_weights_run(LearnWeightsSpec(train=str(train), queries=str(query_store), out=str(out),
                                                     **options), progress=self.progress)
        self._remember(self.weights, Path(path))
        return WeightsResult.open(path)

    def report(self, path, *, attributions=None, weights=None, **options) -> Path:
        """The HTML report (the `gradtrace report` stage, `report_run`) of attribution runs: `attributions` (results
        or output folders; default: this tracer's runs that score the queries of its latest run, side by side) and
        `weights` files charted beside uniform (default: the ones this tracer learned). The other options are
        `ReportSpec`'s (title, max_queries). Returns the page's path."""
        if attributions is None:
            if not self.runs:
                raise UserError("no attribution to report yet; call tracer.attribute(queries) first, or pass "
                                "attributions=[folder, ...]")
            last = _queries_of(self.runs[-1])
            attributions = [r for r in self.runs if r.is_dir() and _queries_of(r) == last]
        runs = [str(getattr(a, "path", a)) for a in attributions]
        files = [os.fspath(w) for w in (self.weights if weights is None else weights)]
        return report_run(ReportSpec(attributions=runs, weights=files, out=str(path), **options),
                          progress=self.progress)

    @staticmethod
    def _remember(seen: list[Path], path: Path) -> None:
        if path in seen:
            seen.remove(path)
        seen.append(path)


def _queries_of(run: Path):
    """What a run scored: its query feature store (or, for a method that scores the model, its query source)."""
    manifest = AttributionResult.open(run).doc["manifest"]
    return manifest.get("query_store") or json.dumps(manifest.get("query_source"), sort_keys=True)
