"""The one line (or table) each command prints about its result: `say(result, spec)`.

Loaded after a command has run (it imports the evaluation modules whose tables it prints), so the CLI's start-up
does not pay for it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from gradtrace.evaluate.caption_fidelity import fidelity_line
from gradtrace.evaluate.counterfactual import RESULT as COUNTERFACTUAL_RESULT, counterfactual_table
from gradtrace.evaluate.eval_lds import RESULT as LDS_RESULT
from gradtrace.evaluate.eval_retrieval import RESULT as RETRIEVAL_RESULT, TABLE as RETRIEVAL_TABLE
from gradtrace.evaluate.mislabel import RESULT as MISLABEL_RESULT, mislabel_table
from gradtrace.evaluate.tail_patch import RESULT as TAIL_PATCH_RESULT, tail_patch_table
from gradtrace.io import read_json
from gradtrace.pipeline.build_manifest import MANIFEST


def train(path, spec) -> str:
    return f"checkpoint: {path}"


def sample(path, spec) -> str:
    return f"samples: {path}"


def featurize(store, spec) -> str:
    line = f"features: {store.path} ({store.features.shape[0]} x {store.features.shape[1]})"
    if not store.complete:  # a rank whose share is done while other ranks still write
        line += (f"; {len(store.missing_chunks())} chunks left to other ranks (the last to finish completes the "
                 "store; rerun the same command if one was stopped)")
    return line


def merge(store, spec) -> str:
    overlap = store.manifest.get("provenance", {}).get("merge_overlap_chunks")
    return featurize(store, spec) + (f"; {overlap} chunk(s) were in more than one shard (identical bytes, taken "
                                     "once)" if overlap else "")


def attribute(doc, spec) -> str:
    if doc is None:  # a rank of a torchrun job: the last rank merges the ranks' shares
        return f"attributions: this rank's rows scored; the last rank writes {Path(spec.out) / 'attributions.json'}"
    return f"attributions: {Path(spec.out) / 'attributions.json'}"


def weights(result, spec) -> str:
    if result is None:  # a rank of a torchrun job: the last rank writes the weights file
        return "weights: this rank's rows learned with the others; the last rank writes the weights file"
    path, doc = result
    prov = doc["provenance"]
    top = sorted(doc["weights"].items(), key=lambda kv: -kv[1])[:5]
    how = f"{prov.get('objective', 'snr')} objective"
    if prov.get("apply") == "inside":
        how += f", inside the shared kernel at c = {prov['lambda_c']:g}"
    signal = (prov.get("learner") or {}).get("family_signal")
    if signal and not signal["learned"]:
        how += f"; kept uniform: no family signal, p = {signal['p_value']:.3f}"
    guard = prov.get("guard")
    if guard:
        shrink = guard["shrink"]
        if shrink == 0:
            how += ("; holdout guard: kept uniform, the gain did not carry over to held-out learning queries (more "
                    "learning queries can show one; --guard none keeps the weights as learned)")
        else:
            how += (f"; holdout guard: shrink {shrink:g} towards uniform" if shrink < 1
                    else "; holdout guard: kept as learned")
    return (f"weights: {path} ({how}; loss {prov['loss_first']:.4f} -> {prov['loss_last']:.4f}; top groups: "
            + ", ".join(f"{n}={v:.3f}" for n, v in top) + ")")


def build(path, spec) -> str:
    fidelity = read_json(Path(path) / MANIFEST, "build manifest").get("caption_fidelity")
    return f"pipeline: {path}" + (f"; {fidelity_line(fidelity)}" if fidelity else "")


def check_captions(result, spec) -> str:
    return fidelity_line(result) + (f"; written to {spec.out}" if spec.out else "")


def build_lm(path, spec) -> str:
    return f"model: {path}"


def report(path, spec) -> str:
    return f"report: {path}"


def demo(summary, spec) -> str:
    return "demo: " + ", ".join(str(v) for v in summary["outputs"].values())


def retrain(res, spec) -> str:
    line = f"retraining: {res['out']} ({res['finished']}/{res['models']} models finished"
    if res.get("world", 1) > 1:
        line += f"; rank {res['rank']}/{res['world']} trained {res['trained']}"
    return line + ")"


def lds(doc, spec) -> str:
    r = doc["lds"]
    if r["warning"]:
        print(f"gradtrace eval lds: warning: {r['warning']}", file=sys.stderr)
    mean = "undefined" if r["mean"] is None else f"{r['mean']:.4f}"
    ci = "" if r["ci95"][0] is None else f" [95% CI {r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"
    undef = f", {r['n_undefined']} undefined" if r["n_undefined"] else ""
    return f"LDS {mean}{ci} over {r['n_defined']} queries{undef}: {Path(spec.out) / LDS_RESULT}"


def counterfactual(doc, spec) -> str:
    if not doc.get("finished"):
        return f"counterfactual: {len(doc['missing'])} models still to train; rerun the same command"
    return f"{counterfactual_table(doc)}\ncounterfactual: {Path(spec.out) / COUNTERFACTUAL_RESULT}"


def mislabel(doc, spec) -> str:
    return f"{mislabel_table(doc)}\nmislabel: {Path(spec.out) / MISLABEL_RESULT}"


def tail_patch(doc, spec) -> str:
    return f"{tail_patch_table(doc)}\ntail-patch: {Path(spec.out) / TAIL_PATCH_RESULT}"


def retrieval(doc, spec) -> str:
    return f"{(Path(spec.out) / RETRIEVAL_TABLE).read_text()}retrieval: {Path(spec.out) / RETRIEVAL_RESULT}"
