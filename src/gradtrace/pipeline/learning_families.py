"""Which objective learn-weights uses, and the families of its learning queries.

`--objective auto` (the default) learns an aspect's weights (`--aspect NAME`) with the family objective
(`gradtrace.weights.family`) and general weights with the SNR objective. An aspect's learning queries are generated
in families, several per value of the aspect, and the value each was generated with makes its family, with no
labels on the training data: the value recorded beside a generated set (text-to-image: whole captions built with
that value, the other factors drawn at random), else the attribute's token the samples carry, else the prompt text
(a user's prompts: identical prompts are one family). With the family signal test and, on the shared kernel, their
own c (`gradtrace.pipeline.learn_weights`), such weights beat uniform on their own aspect on the text-to-image
benchmark (five builds of the medium pipeline, D-TRAK and DAS with both kernels) in 54 of 60 cases, none worse; on
shapes with tokens in 12 of 12; on held-out shapes with queries from the image alone in 7 of 12, none worse
(docs/benchmarks.md, "The shared kernel's c for inside weights"). SNR aspect weights on the first four builds' queries
beat uniform in 13 of 48 cases and were worse in 25 ("Aspect weights from prompt families").

`auto` falls back to the SNR objective, in one warning line, when the learning queries form no families (every
query its own value, or a single value), when the aspect's values cannot be read from them, when the holdout guard
is asked for (it is the SNR objective's), or when their dense contributions would not fit in memory.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from gradtrace.data.sources import samples_examples
from gradtrace.errors import GradtraceWarning, UserError
from gradtrace.evaluate.eval_retrieval import labels_of
from gradtrace.features.store import FeatureStore
from gradtrace.io import read_json
from gradtrace.weights.family import MAX_DENSE_BYTES, family_codes

SET_MANIFEST = "learning-queries.json"  # beside a generated learning-query set's features/ (`learn_weights`)


def query_families(queries: FeatureStore, column: str, labels_file: str | None) -> list:
    """One family value per learning query: `column` from `labels_file`; else, for a generated set of `column`'s
    aspect, the value each prompt was built with (recorded in its manifest); else, for generated queries, the
    attribute value they were sampled with, or the prompt they were generated from (`column` 'prompt', or an aspect
    that only their prompts name); else the source data's metadata."""
    source = queries.settings.get("source") or {}
    if labels_file is None and source.get("kind") == "samples":
        ex = samples_examples(source["path"])
        rows = {int(i): r for r, i in enumerate(ex.ids)}
        record = queries.path.parent / SET_MANIFEST
        made = read_json(record, "learning-query set manifest") if record.exists() else {}
        if made.get("families") and made.get("aspect") == column:
            return [made["families"][rows[int(i)]] for i in queries.ids]
        manifest = read_json(Path(source["path"]) / "manifest.json", "samples manifest")
        if column not in (manifest.get("attribute_values") or {}) and ex.texts is not None:
            return [ex.texts[rows[int(i)]] for i in queries.ids]
    return labels_of(source, queries.ids, [column], labels_file, "family")[column]


def resolve_objective(objective: str, *, aspect: str | None, family: str | None, labels_file: str | None,
                      guard: str, queries: FeatureStore, n_train: int, n_groups: int) -> tuple[str, list | None]:
    """(objective, the learning queries' family values or None for SNR): `objective` as given, or "auto" resolved
    (module docstring); `family` given with "auto" asks for the family objective."""
    if objective == "auto" and family is not None:
        objective = "family"
    if objective != "auto":
        if objective == "snr":
            return "snr", None
        return objective, query_families(queries, family or aspect, labels_file)
    if aspect is None:
        return "snr", None
    why = None
    if guard == "holdout":
        why = "--guard holdout is the SNR objective's"
    elif len(queries.ids) * n_train * n_groups * 8 > MAX_DENSE_BYTES:
        why = (f"the family objective holds {len(queries.ids)} x {n_train} x {n_groups} contributions in memory "
               f"(over {MAX_DENSE_BYTES // 2**30} GiB)")
    else:
        try:
            families = query_families(queries, family or aspect, labels_file)
            family_codes(families)
            return "family", families
        except UserError as exc:
            why = str(exc)
    warnings.warn(GradtraceWarning(f"aspect weights ({aspect}) learned with the SNR objective, not the family "
                                   f"objective: {why}"), stacklevel=3)
    return "snr", None

