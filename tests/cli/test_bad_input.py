"""The bad-input catalogue: wrong values, wrong or damaged artefacts and paths, for every subcommand and every
kind of artefact (checkpoint, feature store, weights file, retraining folder, samples folder, data folder,
pipeline, LoRA folder). Each case must end with exit code 2, exactly one line on stderr naming the problem, no
traceback or usage block, and every file under the artefacts' root byte-for-byte unchanged (no artefact
altered, no output written).

A case is `subcommand args`, with {name} standing for a path of the module's artefacts (see `ARTEFACTS`) or
{new} for a path that does not exist yet; the text the one line must contain; and optional environment."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.pipelines import tiny_pipeline
from fixtures.probe import PROBE_CASES, probe_cases
from fixtures.reliability import ok, refused, tmpfs
from gradtrace.cli import COMMANDS, EVAL_COMMANDS

pytestmark = pytest.mark.usefixtures("one_thread")
FEAT = "--dim 64 --timesteps 1 --chunk 4"
NEW = "{new}"

# (id, command, words in the one line[, environment])
CASES = [
    # -- usage: values argparse refuses, options missing (every subcommand)
    ("train-steps-text", "train --data digits --steps abc --out {new}", "invalid int value"),
    ("train-lr-text", "train --data digits --lr fast --out {new}", "invalid float value"),
    ("sample-sampler", "sample --checkpoint {ckpt} --sampler euler --out {new}", "invalid choice"),
    ("featurize-dtype", "featurize --checkpoint {ckpt} --store-dtype float64 --out {new}", "invalid choice"),
    ("attribute-method", "attribute --train {train} --queries {queries} --method shap --out {new}",
     "invalid choice"),
    ("learn-weights-k", "learn-weights --train {train} --queries {learn} --k 1.5", "invalid int value"),
    ("retrain-subsets", "retrain --run {ckpt} --subsets many", "invalid int value"),
    ("eval-lds-no-retrain", "eval lds --run {ckpt} --train-features {train} --queries {queries} --out {new}",
     "required: --retrain"),
    ("eval-tail-patch-top-k", "eval tail-patch --run {ckpt} --train-features {train} --queries {queries} --top-k 0 "
     "--out {new}", "--top-k must be a positive integer"),
    ("eval-tail-patch-lr", "eval tail-patch --run {ckpt} --train-features {train} --queries {queries} --lr -1 "
     "--out {new}", "--lr must be a positive number"),
    ("eval-cf-top-k", "eval counterfactual --run {ckpt} --train-features {train} --queries {queries} --top-k x "
     "--out {new}", "invalid int value"),
    ("eval-retrieval-k", "eval retrieval --attributions {new} --labels subject --k 0 --out {new}",
     "--k must be positive integers"),
    ("eval-retrieval-no-run", "eval retrieval --attributions {new} --labels subject --out {new}",
     "has no attributions.json"),
    ("eval-nothing", "eval", "required"),
    ("attribute-ekfac-c", "attribute-ekfac --checkpoint {ckpt} --ids {far_ids} --lambda-c -1 --out {new}",
     "--lambda-c must be a number"),
    ("learn-weights-ekfac-k", "learn-weights-ekfac --checkpoint {ckpt} --ids {far_ids} --k 0 --out {new}",
     "--k must be a positive integer"),
    ("attribute-ekfac-store", "attribute-ekfac --checkpoint {train} --ids {far_ids} --out {new}", "not a checkpoint"),
    ("attribute-ekfac-ids", "attribute-ekfac --checkpoint {ckpt} --ids {far_ids} --out {new}", "not in dataset"),
    ("eval-lds-attributions", "eval lds --run {ckpt} --retrain {retrain} --attributions {train} --out {new}",
     "has no attributions.json"),
    ("build-size-text", "build-pipeline --size big --out {new}", "invalid int value"),
    ("import-lora-no-lora", "import-lora --base {pipe} --out {new}", "required: --lora"),
    ("demo-unknown", "demo --fast", "unrecognized arguments"),
    ("unknown-subcommand", "frobnicate", "invalid choice"),
    # -- train
    ("train-steps-zero", "train --data digits --steps 0 --out {new}", "--steps must be a positive integer"),
    ("train-lr-nan", "train --data digits --lr nan --out {new}", "--lr must be a finite number"),
    ("train-n-zero", "train --data digits --n 0 --out {new}", "--n must be a positive integer"),
    ("train-lora-no-base", "train --data digits --lora-rank 2 --out {new}", "pass --base"),
    ("train-model-kind", "train --data digits --model giant --out {new}", "--model must be auto or one of"),
    ("train-dtype", "train --data digits --dtype bfloat16 --out {new}", "drop --dtype"),
    ("train-unknown-data", "train --data mnist-ish --out {new}", "mnist-ish"),
    ("train-folder-missing", "train --data imagefolder:{new} --out {new}", "not found"),
    ("train-folder-empty", "train --data imagefolder:{empty_dir} --out {new}", "no images"),
    ("train-folder-bad-metadata", "train --data imagefolder:{bad_metadata} --out {new}", "line 1 is not valid JSON"),
    ("train-ids-empty", "train --data digits --n 12 --ids {empty_ids} --out {new}", "holds no ids"),
    ("train-ids-unknown", "train --data digits --n 12 --ids {far_ids} --out {new}", "not in dataset"),
    ("train-out-file", "train --data digits --n 12 --steps 1 --out {a_file}", "is a file"),
    ("train-other-checkpoint", "train --data digits --n 12 --steps 3 --batch-size 4 --out {ckpt}",
     "pass --overwrite"),
    ("train-state-every", "train --data digits --n 12 --steps 1 --out {new}", "GRADTRACE_TRAIN_STATE_EVERY",
     {"GRADTRACE_TRAIN_STATE_EVERY": "often"}),
    # -- sample (checkpoint artefacts)
    ("sample-no-checkpoint", "sample --checkpoint {new} --out {new}", "checkpoint directory not found"),
    ("sample-store-as-checkpoint", "sample --checkpoint {train} --out {new}", "not a checkpoint"),
    ("sample-num-zero", "sample --checkpoint {ckpt} --num 0 --out {new}", "--num must be a positive integer"),
    ("sample-guidance-inf", "sample --checkpoint {ckpt} --guidance inf --out {new}", "finite"),
    ("sample-attr-unconditional", "sample --checkpoint {ckpt} --attr style=dots --out {new}", "unconditional"),
    ("sample-attr-form", "sample --checkpoint {ckpt} --attr style --out {new}", "is not NAME=VALUE"),
    ("sample-prompt-on-tokens", "sample --checkpoint {ckpt} --prompt 'a cat' --num 1 --out {new}", "not text"),
    ("sample-out-file", "sample --checkpoint {ckpt} --num 1 --sample-steps 1 --out {a_file}", "is a file"),
    ("ckpt-weights-garbage", "sample --checkpoint {ckpt_garbage} --out {new}", "checkpoint weights are corrupt"),
    ("ckpt-weights-missing", "sample --checkpoint {ckpt_no_weights} --out {new}", "checkpoint weights missing"),
    ("ckpt-weights-swapped", "sample --checkpoint {ckpt_swapped} --out {new}", "do not match the fingerprint"),
    ("ckpt-config-broken", "sample --checkpoint {ckpt_bad_json} --out {new}", "not valid JSON"),
    ("ckpt-config-list", "sample --checkpoint {ckpt_list_json} --out {new}", "not a gradtrace checkpoint config"),
    ("ckpt-unfinished", "featurize --checkpoint {ckpt_unfinished} --out {new}", "not a checkpoint"),
    # -- featurize (samples and data folders)
    ("featurize-data-and-samples", "featurize --checkpoint {ckpt} --data digits --samples {samples} --out {new}",
     "either --data or --samples"),
    ("featurize-samples-missing", "featurize --checkpoint {ckpt} --samples {new} --out {new}", "samples"),
    ("featurize-store-as-samples", "featurize --checkpoint {ckpt} --samples {train} --out {new}",
     "not a gradtrace samples directory"),
    ("samples-images-garbage", "featurize --checkpoint {ckpt} --samples {samples_garbage} --out {new}",
     "cannot read samples"),
    ("samples-ids-short", "featurize --checkpoint {ckpt} --samples {samples_short} --out {new}", "expected"),
    ("featurize-dim-zero", "featurize --checkpoint {ckpt} --out {new} --dim 0", "--dim must be a positive"),
    ("featurize-groups-regex", f"featurize --checkpoint {{ckpt}} --groups 'a=(' --out {{new}} {FEAT}", "regex"),
    ("featurize-measurement", f"featurize --checkpoint {{ckpt}} --measurement entropy --out {{new}} {FEAT}",
     "entropy"),
    ("featurize-ids-duplicate", f"featurize --checkpoint {{ckpt}} --data digits --n 12 --ids {{dup_ids}} "
     f"--out {{new}} {FEAT}", "more than once"),
    ("featurize-size-no-data", f"featurize --checkpoint {{ckpt}} --size 16 --out {{new}} {FEAT}", "pass --data too"),
    ("featurize-other-settings", "featurize --checkpoint {ckpt} --out {train} --dim 32 --timesteps 1 --chunk 4",
     "pass --overwrite"),
    ("featurize-foreign-folder", f"featurize --checkpoint {{ckpt}} --out {{foreign_dir}} {FEAT}",
     "is not a feature store"),
    ("featurize-wrong-size-data", f"featurize --checkpoint {{ckpt}} --data shapes --n 4 --out {{new}} {FEAT}",
     "the model takes"),
    # -- attribute (feature stores, weights files)
    ("attribute-no-store", "attribute --train {new} --queries {queries} --out {new}", "no feature store"),
    ("attribute-top-k-zero", "attribute --train {train} --queries {queries} --top-k 0 --out {new}",
     "--top-k must be a positive integer"),
    ("attribute-top-k-large", "attribute --train {train} --queries {queries} --top-k 99 --out {new}", "--top-k"),
    ("attribute-lambda-negative", "attribute --train {train} --queries {queries} --lambda-c -1 --out {new}",
     "--lambda-c"),
    ("attribute-lambda-text", "attribute --train {train} --queries {queries} --lambda-c lots --out {new}",
     "--lambda-c"),
    ("attribute-lambda-auto-alone", "attribute --train {train} --queries {queries} --lambda-c auto --out {new}",
     "--learning-queries"),
    ("attribute-weights-and-aspect", "attribute --train {train} --queries {queries} --weights {weights} "
     "--aspect style --out {new}", "either --weights FILE or --aspect NAME"),
    ("attribute-aspect-unlearned", "attribute --train {train} --queries {queries} --aspect style --out {new}",
     "style"),
    ("attribute-learning-queries", "attribute --train {train} --queries {learn} --weights {weights} --out {new}",
     "learning queries"),
    ("attribute-out-file", "attribute --train {train} --queries {queries} --out {a_file}", "is a file"),
    ("store-unfinished", "attribute --train {train_unfinished} --queries {queries} --out {new}", "unfinished"),
    ("store-other-model", "attribute --train {train} --queries {other_queries} --out {new}",
     "'model_fingerprint' differs"),
    ("store-nan", "attribute --train {train} --queries {queries_nan} --out {new}", "NaN/Inf in rows 3"),
    ("store-missing-ids", "attribute --train {train} --queries {queries_no_ids} --out {new}", "lacks ids.npy"),
    ("store-manifest-broken", "attribute --train {train} --queries {queries_bad_manifest} --out {new}",
     "not valid JSON"),
    ("weights-missing", "attribute --train {train} --queries {queries} --weights {new} --out {new}", "not found"),
    ("weights-not-json", "attribute --train {train} --queries {queries} --weights {weights_text} --out {new}",
     "not valid JSON"),
    ("weights-no-object", "attribute --train {train} --queries {queries} --weights {weights_list} --out {new}",
     "'weights' object"),
    ("weights-other-groups", "attribute --train {train} --queries {queries} --weights {weights_groups} "
     "--out {new}", "do not name the feature groups"),
    ("weights-negative", "attribute --train {train} --queries {queries} --weights {weights_negative} --out {new}",
     "non-negative"),
    ("weights-text-values", "attribute --train {train} --queries {queries} --weights {weights_text_values} "
     "--out {new}", "must be numbers"),
    ("weights-other-method", "attribute --train {train} --queries {queries} --method tracin --weights {weights} "
     "--out {new}", "not tracin"),
    # -- learn-weights
    ("learn-neither", "learn-weights --train {train}", "exactly one of --queries STORE or --generate N"),
    ("learn-both", "learn-weights --train {train} --queries {learn} --generate 4", "exactly one of"),
    ("learn-prompts-alone", "learn-weights --train {train} --queries {learn} --prompts {a_file}",
     "use it with --generate N"),
    ("learn-aspect-other-than-the-set", "learn-weights --train {train} --queries {learn_set} --aspect style",
     "generated for no aspect (general weights); drop --aspect"),
    ("learn-steps-zero", "learn-weights --train {train} --queries {learn} --steps 0", "--steps must be a positive"),
    ("learn-other-model", "learn-weights --train {train} --queries {other_queries} --steps 2 --out {new}",
     "'model_fingerprint' differs"),
    ("learn-out-dir", "learn-weights --train {train} --queries {learn} --steps 2 --out {empty_dir}",
     "is a directory"),
    ("learn-aspect-unconditional", "learn-weights --train {train} --generate 2 --aspect style --out {new}",
     "this model is unconditional"),
    # -- retrain (retraining folders)
    ("retrain-no-run", "retrain --run {new}", "checkpoint"),
    ("retrain-store-as-run", "retrain --run {train}", "checkpoint"),
    ("retrain-fraction", "retrain --run {ckpt} --fraction 1.5 --out {new}", "fraction"),
    ("retrain-workers-zero", "retrain --run {ckpt} --workers 0 --out {new}", "--workers must be a positive"),
    ("retrain-max-models", "retrain --run {ckpt} --max-models -1 --out {new}", "--max-models must be >= 0"),
    ("retrain-other-settings", "retrain --run {ckpt} --subsets 3 --out {retrain}", "other settings"),
    ("retrain-foreign-folder", "retrain --run {ckpt} --subsets 2 --out {foreign_dir}",
     "is not a retraining directory"),
    # -- eval lds / eval counterfactual / eval mislabel
    ("mislabel-not-classifier", "eval mislabel --run {ckpt} --out {new}", "without class labels"),
    ("mislabel-fraction", "eval mislabel --run {ckpt} --fraction 1 --out {new}", "strictly between 0 and 1"),
    ("lds-no-retraining", "eval lds --run {ckpt} --retrain {new} --train-features {train} --queries {queries} "
     "--out {new}", "no retraining"),
    ("lds-store-as-retraining", "eval lds --run {ckpt} --retrain {train} --train-features {train} --queries "
     "{queries} --out {new}", "not an LDS retraining directory"),
    ("lds-unfinished", "eval lds --run {ckpt} --retrain {retrain_unfinished} --train-features {train} --queries "
     "{queries} --out {new}", "unfinished"),
    ("lds-subsets-changed", "eval lds --run {ckpt} --retrain {retrain_tampered} --train-features {train} "
     "--queries {queries} --out {new}", "the files were modified"),
    ("lds-timesteps-zero", "eval lds --run {ckpt} --retrain {retrain} --train-features {train} --queries {queries} "
     "--timesteps 0 --out {new}", "--timesteps must be a positive"),
    ("cf-top-k-too-large", "eval counterfactual --run {ckpt} --train-features {train} --queries {queries} "
     "--top-k 12 --out {new}", "smaller than the training set"),
    ("cf-not-the-training-set", "eval counterfactual --run {ckpt} --train-features {queries} --queries {queries} "
     "--out {new}", "not the run's training set"),
    ("cf-num-queries-zero", "eval counterfactual --run {ckpt} --train-features {train} --queries {queries} "
     "--num-queries 0 --out {new}", "--num-queries must be a positive"),
    # -- build-pipeline, import-lora (pipelines, LoRA folders), demo
    ("build-size-odd", "build-pipeline --size 6 --out {new}", "multiple of 4"),
    ("build-lr-zero", "build-pipeline --lr 0 --out {new}", "--lr must be a positive number"),
    ("build-no-captions", "build-pipeline --data digits --n 4 --out {new}", "text"),
    ("build-medium-size", "build-pipeline --model-size medium --size 20 --out {new}", "multiple of 8"),
    ("build-model-size", "build-pipeline --model-size huge --out {new}", "invalid choice"),
    ("check-captions-zero", "check-captions --checkpoint {pipe} --captions 0", "--captions must be a positive"),
    ("check-captions-not-t2i", "check-captions --checkpoint {ckpt} --out {new}", "not a text-to-image model"),
    ("build-lm-vocab", "build-lm --vocab-size 10 --out {new}", "--vocab-size must be >= 260"),
    ("build-lm-image-data", "build-lm --data digits --n 4 --out {new}", "is not text"),
    ("import-out-not-empty", "import-lora --base {pipe} --lora {lora} --out {foreign_dir}", "not empty"),
    ("import-lora-missing", "import-lora --base {pipe} --lora {new} --out {new}", "lora"),
    ("import-base-not-pipeline", "import-lora --base {ckpt} --lora {lora} --out {new}", "pipeline"),
    ("import-lora-garbage", "import-lora --base {pipe} --lora {lora_garbage} --out {new}", "safetensors"),
    ("import-alpha-zero", "import-lora --base {pipe} --lora {lora} --alpha 0 --out {new}", "--alpha must be"),
    ("demo-out-file", "demo --quick --out {a_file}", "is a file"),
    ("report-no-attributions", "report --attributions {new} --out {new}", "never-made"),
    ("report-store-as-attributions", "report --attributions {train} --out {new}", "attributions"),
    # -- more of each kind: data folders and ids files
    ("folder-corrupt-image", "train --data imagefolder:{corrupt_image_dir} --out {new}", "cannot read image"),
    ("ids-text", "train --data digits --n 12 --ids {text_ids} --out {new}", "write one integer id per line"),
    ("ids-json-object", "train --data digits --n 12 --ids {dict_ids} --out {new}", "must be a flat list of integers"),
    ("ids-negative", "train --data digits --n 12 --ids {neg_ids} --out {new}", "not in dataset 'digits': [-1]"),
    ("train-size-zero", "train --data digits --size 0 --out {new}", "--size must be a positive integer"),
    ("train-base-not-pipeline", "train --base {ckpt} --lora-rank 2 --data shapes --n 4 --out {new}",
     "is not a text-to-image pipeline"),
    ("train-adapter-unknown", "train --data digits --adapter nosuch --out {new}", "unknown model adapter 'nosuch'"),
    ("train-adapter-not-adapter", "train --data digits --adapter os.path:join --out {new}",
     "is not a gradtrace ModelAdapter subclass"),
    # -- checkpoints, samples, stores, weights
    ("ckpt-model-config", "sample --checkpoint {ckpt_bad_model_config} --out {new}", "has a bad model config"),
    ("ckpt-is-a-file", "featurize --checkpoint {a_file} --out {new}", "checkpoint directory not found"),
    ("sample-prompts-on-tokens", "sample --checkpoint {ckpt} --prompts {a_file} --out {new}", "not text"),
    ("sample-attr-on-text", "sample --checkpoint {lora} --attr style=dots --out {new}", "drop --attr"),
    ("samples-prompt-count", "featurize --checkpoint {ckpt} --samples {samples_prompts} --out {new}",
     "have 3 images but 2 prompts"),
    ("featurize-chunk-zero", "featurize --checkpoint {ckpt} --chunk 0 --out {new}", "--chunk must be a positive"),
    ("store-ids-garbage", "attribute --train {train} --queries {queries_ids_garbage} --out {new}",
     "has an unreadable array"),
    ("attribute-lambda-inf", "attribute --train {train} --queries {queries} --lambda-c inf --out {new}",
     "--lambda-c must be a number or 'auto'"),
    ("attribute-learning-is-evaluation", "attribute --train {train} --queries {queries} --lambda-c auto "
     "--learning-queries {queries} --out {new}", "must be disjoint"),
    ("weights-nan", "attribute --train {train} --queries {queries} --weights {weights_nan} --out {new}",
     "must be finite"),
    ("weights-empty", "attribute --train {train} --queries {queries} --weights {weights_empty} --out {new}",
     "do not name the feature groups"),
    ("learn-lambda-nan", "learn-weights --train {train} --queries {learn} --lambda-c nan",
     "--lambda-c must be a number or 'auto'"),
    ("learn-prompts-missing", "learn-weights --train {train} --generate 2 --prompts {new}", "prompt file not found"),
    ("learn-sample-steps-zero", "learn-weights --train {train} --generate 2 --sample-steps 0",
     "--sample-steps must be a positive"),
    # -- retraining folders and evaluation outputs
    ("retrain-fraction-zero", "retrain --run {ckpt} --fraction 0 --out {new}", "strictly between 0 and 1"),
    ("retrain-run-unfinished", "retrain --run {ckpt_unfinished} --out {new}", "is not a finished checkpoint"),
    ("retrain-out-file", "retrain --run {ckpt} --subsets 2 --out {a_file}", "is not a retraining directory"),
    ("lds-run-other", "eval lds --run {other} --retrain {retrain} --train-features {train} --queries {queries} "
     "--out {new}", "was made from another run"),
    ("lds-queries-other-model", "eval lds --run {ckpt} --retrain {retrain} --train-features {train} --queries "
     "{other_queries} --out {new}", "'model_fingerprint' differs"),
    ("lds-weights-other-groups", "eval lds --run {ckpt} --retrain {retrain} --train-features {train} --queries "
     "{queries} --weights {weights_groups} --out {new}", "do not name the feature groups"),
    ("lds-out-file", "eval lds --run {ckpt} --retrain {retrain} --train-features {train} --queries {queries} "
     "--out {a_file}", "is a file"),
    ("cf-out-file", "eval counterfactual --run {ckpt} --train-features {train} --queries {queries} --top-k 2 "
     "--num-queries 1 --out {a_file}", "is not a retraining directory"),
    ("cf-draws-zero", "eval counterfactual --run {ckpt} --train-features {train} --queries {queries} --draws 0 "
     "--out {new}", "--draws must be a positive integer"),
    ("import-lora-empty-folder", "import-lora --base {pipe} --lora {empty_dir} --out {new}", "no LoRA weights"),
    ("report-weights-garbage", "report --attributions {new} --weights {weights_text} --out {new}",
     "has no attributions.json"),
    ("demo-t2i-out-file", "demo --text-to-image --quick --out {a_file}", "is a file"),
    ("merge-no-shards", "merge-features --out {new}", "pass at least one --shard DIR"),
    ("merge-shard-not-a-store", "merge-features --shard {empty_dir} --out {new}", "no feature store"),
    ("merge-mismatched-shards", "merge-features --shard {train} --shard {other_queries} --out {new}",
     "is not a shard of the same store"),
    ("merge-out-is-shard", "merge-features --shard {train} --out {train}", "not one of the shards"),
    ("merge-into-other-store", "merge-features --shard {train_unfinished} --out {queries}", "other settings"),
    *PROBE_CASES,
]
if not torch.cuda.is_available():
    CASES.append(("featurize-cuda", "featurize --checkpoint {ckpt} --device cuda --out {new}", "torch sees no GPU"))


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Every kind of artefact, whole and damaged, under one root (built once)."""
    root = tmp_path_factory.mktemp("artefacts")
    p = {name: root / name for name in ("ckpt", "samples", "train", "queries", "learn", "weights", "retrain",
                                        "other", "pipe", "lora")}
    ok("train", "--data", "digits", "--n", 12, "--steps", 2, "--batch-size", 4, "--out", p["ckpt"])
    ok("sample", "--checkpoint", p["ckpt"], "--num", 3, "--sample-steps", 2, "--out", p["samples"])
    feat = FEAT.split()
    ok("featurize", "--checkpoint", p["ckpt"], "--out", p["train"], *feat)
    ok("featurize", "--checkpoint", p["ckpt"], "--data", "digits", "--n", 16, "--out", p["queries"], *feat)
    ok("featurize", "--checkpoint", p["ckpt"], "--samples", p["samples"], "--out", p["learn"], *feat)
    ok("learn-weights", "--train", p["train"], "--queries", p["learn"], "--steps", 2, "--lambda-c", 0.01,
       "--out", root / "weights.json")
    ok("learn-weights", "--train", p["train"], "--generate", 2, "--sample-steps", 2, "--steps", 2, "--lambda-c", 0.01,
       "--out", root / "generated.json")  # a generated learning-query set (general: this model is unconditional)
    learn_set = Path(json.loads((root / "generated.json").read_text())["provenance"]["learning_queries"]["store"])
    ok("retrain", "--run", p["ckpt"], "--subsets", 2, "--out", p["retrain"])
    ok("train", "--data", "digits", "--n", 12, "--steps", 1, "--batch-size", 4, "--seed", 1, "--out", p["other"])
    ok("featurize", "--checkpoint", p["other"], "--data", "digits", "--n", 16, "--out", root / "other_queries",
       *feat)
    tiny_pipeline(p["pipe"])
    ok("train", "--base", p["pipe"], "--lora-rank", 2, "--data", "shapes", "--n", 4, "--steps", 1, "--batch-size",
       2, "--out", p["lora"])
    ok("attribute", "--train", p["train"], "--queries", p["queries"], "--top-k", 3, "--out", root / "attr")
    paths = {k: v for k, v in p.items() if k != "weights"} | {"weights": root / "weights.json",
                                                               "other_queries": root / "other_queries",
                                                               "attr": root / "attr", "learn_set": learn_set}
    damaged(root, paths)
    return root, paths


def damaged(root, p) -> None:
    """The broken variants the cases name."""
    def copy(src, name):
        shutil.copytree(src, root / name)
        p[name] = root / name
        return root / name

    def write(name, text):
        p[name] = root / name
        p[name].write_text(text)

    write("a_file", "mine\n")
    write("empty_ids", "")
    write("far_ids", "5000\n5001\n")
    write("dup_ids", "1\n1\n")
    for name in ("empty_dir", "bad_metadata", "foreign_dir"):
        (root / name).mkdir()
        p[name] = root / name
    (root / "bad_metadata" / "metadata.jsonl").write_text("{not json\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "bad_metadata" / "a.png")
    (root / "foreign_dir" / "notes.txt").write_text("someone else's\n")
    copy(p["ckpt"], "ckpt_garbage").joinpath("model.safetensors").write_bytes(b"\0garbage" * 64)
    copy(p["ckpt"], "ckpt_no_weights").joinpath("model.safetensors").unlink()
    shutil.copy(p["other"] / "model.safetensors", copy(p["ckpt"], "ckpt_swapped") / "model.safetensors")
    copy(p["ckpt"], "ckpt_bad_json").joinpath("config.json").write_text("{\"format\": ")
    copy(p["ckpt"], "ckpt_list_json").joinpath("config.json").write_text("[]")
    copy(p["ckpt"], "ckpt_unfinished").joinpath("config.json").unlink()
    copy(p["samples"], "samples_garbage").joinpath("images.npy").write_bytes(b"garbage")
    np.save(copy(p["samples"], "samples_short") / "ids.npy", np.arange(2))
    manifest = json.loads((copy(p["train"], "train_unfinished") / "manifest.json").read_text())
    (root / "train_unfinished" / "manifest.json").write_text(json.dumps({**manifest, "status": "incomplete"}))
    feats = np.load(p["queries"] / "features.npy")
    feats[3, 5] = np.nan
    np.save(copy(p["queries"], "queries_nan") / "features.npy", feats)
    copy(p["queries"], "queries_no_ids").joinpath("ids.npy").unlink()
    copy(p["queries"], "queries_bad_manifest").joinpath("manifest.json").write_text("{\"settings\": {")
    doc = json.loads(p["weights"].read_text())
    write("weights_text", "weights: all equal\n")
    write("weights_list", "[0.5, 0.5]")
    groups = dict(doc["weights"])
    renamed = {("renamed-" + k if i == 0 else k): v for i, (k, v) in enumerate(groups.items())}
    write("weights_groups", json.dumps({"weights": renamed}))
    write("weights_negative", json.dumps({"weights": {k: -1.0 for k in groups}}))
    write("weights_text_values", json.dumps({"weights": {k: "high" for k in groups}}))
    copy(p["retrain"], "retrain_unfinished")
    shutil.rmtree(root / "retrain_unfinished" / "models" / "s0001-r0")
    np.save(copy(p["retrain"], "retrain_tampered") / "subsets.npy",
            np.load(p["retrain"] / "subsets.npy")[:, ::-1].copy())
    write("text_ids", "one\ntwo\n")
    write("dict_ids", json.dumps({"ids": [1, 2]}))
    p["dict_ids"] = p["dict_ids"].rename(root / "dict_ids.json")
    write("neg_ids", "-1\n2\n")
    (root / "corrupt_image_dir").mkdir()
    p["corrupt_image_dir"] = root / "corrupt_image_dir"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "corrupt_image_dir" / "a.png")
    (root / "corrupt_image_dir" / "b.png").write_bytes((root / "corrupt_image_dir" / "a.png").read_bytes()[:30])
    cfg = json.loads((copy(p["ckpt"], "ckpt_bad_model_config") / "config.json").read_text())
    (root / "ckpt_bad_model_config" / "config.json").write_text(json.dumps({**cfg, "model_config": {"kind": "x"}}))
    write("weights_nan", json.dumps({"weights": {k: float("nan") for k in groups}}))
    write("weights_empty", json.dumps({"weights": {}}))
    copy(p["queries"], "queries_ids_garbage").joinpath("ids.npy").write_bytes(b"garbage")
    man = json.loads((copy(p["samples"], "samples_prompts") / "manifest.json").read_text())
    (root / "samples_prompts" / "manifest.json").write_text(json.dumps({**man, "prompts": ["a", "b"]}))
    write("lora_garbage", "not safetensors")
    p["lora_garbage"] = p["lora_garbage"].rename(root / "lora_garbage.safetensors")
    probe_cases(root, p, copy, write, doc)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_and_nothing_changes(art, capsys, monkeypatch, case):
    root, paths = art
    _, command, words, *env = case
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value)
    argv = [arg.format(new=root / "never-made", **paths) for arg in shlex.split(command)]
    refused(capsys, argv, words, root)
    assert not (root / "never-made").exists()


READ_ONLY = {
    "sample": "sample --checkpoint {ckpt} --num 1 --sample-steps 1 --out {ro}/s",
    "retrain": "retrain --run {ckpt} --subsets 2 --out {ro}/r",
    "eval lds": "eval lds --run {ckpt} --retrain {retrain} --train-features {train} --queries {queries} --out {ro}/l",
    "eval counterfactual": "eval counterfactual --run {ckpt} --train-features {train} --queries {queries} "
                           "--top-k 2 --num-queries 1 --out {ro}/c",
    "build-pipeline": "build-pipeline --n 8 --vae-steps 1 --unet-steps 1 --out {ro}/p",
    "import-lora": "import-lora --base {pipe} --lora {lora} --out {ro}/i",
    "demo": "demo --quick --out {ro}/d",
}


@pytest.mark.parametrize("stage", READ_ONLY)
def test_out_on_a_read_only_mount(art, capsys, tmp_path, stage):
    root, paths = art
    with tmpfs(tmp_path / "ro", "size=1m,ro", "the read-only cases need one") as mnt:
        argv = [arg.format(ro=mnt, **paths) for arg in shlex.split(READ_ONLY[stage])]
        refused(capsys, argv, "Read-only file system", root)


def test_the_catalogue_covers_every_subcommand():
    tried = {c[1].split()[0] if c[1].split()[0] != "eval" else " ".join(c[1].split()[:2]) for c in CASES}
    assert tried >= set(COMMANDS) | {f"eval {name}" for name in EVAL_COMMANDS}
    assert len(CASES) >= 60
