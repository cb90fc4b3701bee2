"""The picture of an attribution run: each query, then its top-k training examples with their scores (for text:
the same as a Markdown page, `write_text_attributions`)."""
from __future__ import annotations

import numpy as np

from gradtrace.data.registry import is_text_spec
from gradtrace.data.sources import load_source, open_dataset
from gradtrace.features.store import FeatureStore
from gradtrace.io import atomic_write
from gradtrace.report.grids import attribution_grid

MAX_QUERIES = 16


def draw_attributions(train: FeatureStore, queries: FeatureStore, doc: dict, path) -> None:
    """Draw the first MAX_QUERIES queries of an attributions document, reloading images from the stores' sources."""
    train_ex = load_source(train.settings["source"])
    query_ex = load_source(queries.settings["source"])
    pos_t = {int(i): r for r, i in enumerate(train_ex.ids)}
    pos_q = {int(i): r for r, i in enumerate(query_ex.ids)}
    rows = doc["queries"][:MAX_QUERIES]
    q_img = np.stack([query_ex.images[pos_q[r["query_id"]]].numpy() for r in rows])
    t_img = np.stack([[train_ex.images[pos_t[t["train_id"]]].numpy() for t in r["top"]] for r in rows])
    scores = np.array([[t["score"] for t in r["top"]] for r in rows])
    q_titles = [query_ex.captions[pos_q[r["query_id"]]] for r in rows]
    t_titles = [[train_ex.captions[pos_t[t["train_id"]]] for t in r["top"]] for r in rows]
    info = doc["manifest"]["method"]
    title = (f"{info.get('method', '?')} ({info.get('kernel', 'identity')} kernel): query, then "
             f"top-{doc['manifest']['top_k']}")
    attribution_grid(q_img, t_img, scores, path, query_titles=q_titles, train_titles=t_titles, title=title)


def is_text_store(store: FeatureStore) -> bool:
    source = store.settings.get("source") or {}
    return source.get("kind") == "dataset" and is_text_spec(source.get("spec", ""))


def write_text_attributions(train: FeatureStore, queries: FeatureStore, doc: dict, path) -> None:
    """Each query's text, then its top-k training texts with their scores, as Markdown (text datasets)."""
    def texts(store):
        ds = open_dataset(store.settings["source"])
        return {int(i): t for i, t in zip(ds.ids, ds.texts)}

    def quote(text: str) -> str:
        return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())

    train_text, query_text = texts(train), texts(queries)
    info = doc["manifest"]["method"]
    lines = [f"# Attributions: {info.get('method', '?')} ({info.get('kernel', 'identity')} kernel), "
             f"top-{doc['manifest']['top_k']}", ""]
    for r in doc["queries"][:MAX_QUERIES]:
        lines += [f"## Query {r['query_id']}", "", quote(query_text[int(r['query_id'])]), ""]
        for rank, t in enumerate(r["top"], start=1):
            file = (t.get("source") or {}).get("file")
            name = f"{t['train_id']} ({file})" if file else f"{t['train_id']}"
            lines += [f"{rank}. training document {name} (score {t['score']:.4g})", "",
                      quote(train_text[int(t['train_id'])]), ""]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines), encoding="utf-8")
