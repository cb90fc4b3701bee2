"""The `gradtrace` command: one subcommand per pipeline stage (`eval` has its own), plus `demo`.

Each subcommand parses its arguments from its stage's spec (`gradtrace.cli.args`), builds the spec, makes
one pipeline call and prints one line. Bad input ends with one line on stderr and exit code 2 (``--debug``
shows the traceback).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gradtrace import __version__
from gradtrace.cli.args import add_spec_arguments, common_arguments, spec_from_args
from gradtrace.errors import UserError, os_error_line
from gradtrace.evaluate.counterfactual import RESULT as COUNTERFACTUAL_RESULT, counterfactual_table
from gradtrace.evaluate.eval_lds import RESULT as LDS_RESULT
from gradtrace.evaluate.mislabel import RESULT as MISLABEL_RESULT, mislabel_table
from gradtrace.pipeline import (AttributeSpec, CounterfactualSpec, DemoSpec, EvalLDSSpec, FeaturizeSpec,
                                LearnWeightsSpec, RetrainSpec, SampleSpec, TrainSpec, attribute_run,
                                eval_counterfactual, eval_lds, featurize_run, learn_weights_run, retrain, run_demo,
                                sample_run, train_run)
from gradtrace.pipeline.build_lm import BuildLMSpec, build_lm_run
from gradtrace.pipeline.build_pipeline import BuildPipelineSpec, build_pipeline_run
from gradtrace.pipeline.ekfac import (AttributeEkfacSpec, LearnWeightsEkfacSpec, attribute_ekfac_run,
                                      learn_weights_ekfac_run)
from gradtrace.pipeline.evaluate import RETRAIN_EPILOG, MislabelSpec, eval_mislabel
from gradtrace.pipeline.eval_retrieval import EvalRetrievalSpec, eval_retrieval
from gradtrace.evaluate.eval_retrieval import RESULT as RETRIEVAL_RESULT, TABLE as RETRIEVAL_TABLE
from gradtrace.evaluate.tail_patch import RESULT as TAIL_PATCH_RESULT, tail_patch_table
from gradtrace.pipeline.evaluate import RETRAIN_EPILOG, TailPatchSpec, eval_tail_patch
from gradtrace.pipeline.import_lora import ImportLoraSpec, import_lora_run
from gradtrace.pipeline.merge_features import MergeFeaturesSpec, merge_features_run
from gradtrace.pipeline.report import ReportSpec, report_run

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    spec: type
    run: Callable
    say: Callable  # (result, spec) -> the one line printed
    help: str
    epilog: str | None = None
    takes_log: bool = False       # the run reports its stages through a `log` callback (printed)
    one_line_warnings: bool = False  # `say` prints the stage's warnings itself, as one line


def _say_train(path, spec) -> str:
    return f"checkpoint: {path}"


def _say_sample(path, spec) -> str:
    return f"samples: {path}"


def _say_featurize(store, spec) -> str:
    line = f"features: {store.path} ({store.features.shape[0]} x {store.features.shape[1]})"
    if not store.complete:  # a rank whose share is done while other ranks still write
        line += (f"; {len(store.missing_chunks())} chunks left to other ranks (the last to finish completes the "
                 "store; rerun the same command if one was stopped)")
    return line


def _say_attribute(doc, spec) -> str:
    return f"attributions: {Path(spec.out) / 'attributions.json'}"


def _say_weights(result, spec) -> str:
    path, doc = result
    prov = doc["provenance"]
    top = sorted(doc["weights"].items(), key=lambda kv: -kv[1])[:5]
    return (f"weights: {path} (loss {prov['loss_first']:.4f} -> {prov['loss_last']:.4f}; top groups: "
            + ", ".join(f"{n}={v:.3f}" for n, v in top) + ")")


def _say_build(path, spec) -> str:
    return f"pipeline: {path}"


def _say_build_lm(path, spec) -> str:
    return f"model: {path}"


def _say_report(path, spec) -> str:
    return f"report: {path}"


def _say_demo(summary, spec) -> str:
    return "demo: " + ", ".join(str(v) for v in summary["outputs"].values())


def _say_retrain(res, spec) -> str:
    line = f"retraining: {res['out']} ({res['finished']}/{res['models']} models finished"
    if res.get("world", 1) > 1:
        line += f"; rank {res['rank']}/{res['world']} trained {res['trained']}"
    return line + ")"


def _say_lds(doc, spec) -> str:
    r = doc["lds"]
    if r["warning"]:
        print(f"gradtrace eval lds: warning: {r['warning']}", file=sys.stderr)
    mean = "undefined" if r["mean"] is None else f"{r['mean']:.4f}"
    ci = "" if r["ci95"][0] is None else f" [95% CI {r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"
    undef = f", {r['n_undefined']} undefined" if r["n_undefined"] else ""
    return f"LDS {mean}{ci} over {r['n_defined']} queries{undef}: {Path(spec.out) / LDS_RESULT}"


def _say_counterfactual(doc, spec) -> str:
    if not doc.get("finished"):
        return f"counterfactual: {len(doc['missing'])} models still to train; rerun the same command"
    return f"{counterfactual_table(doc)}\ncounterfactual: {Path(spec.out) / COUNTERFACTUAL_RESULT}"


def _say_mislabel(doc, spec) -> str:
    return f"{mislabel_table(doc)}\nmislabel: {Path(spec.out) / MISLABEL_RESULT}"


def _say_tail_patch(doc, spec) -> str:
    return f"{tail_patch_table(doc)}\ntail-patch: {Path(spec.out) / TAIL_PATCH_RESULT}"


def _say_retrieval(doc, spec) -> str:
    return f"{(Path(spec.out) / RETRIEVAL_TABLE).read_text()}retrieval: {Path(spec.out) / RETRIEVAL_RESULT}"


COMMANDS: dict[str, Command] = {
    "train": Command(TrainSpec, train_run, _say_train, "train a model (default: a tiny diffusion UNet, DDPM)"),
    "sample": Command(SampleSpec, sample_run, _say_sample, "generate images from a checkpoint"),
    "featurize": Command(FeaturizeSpec, featurize_run, _say_featurize,
                         "per-example projected gradient features into a feature store"),
    "merge-features": Command(MergeFeaturesSpec, merge_features_run, _say_featurize,
                              "one feature store from the partial stores of a torchrun job's machines"),
    "attribute": Command(AttributeSpec, attribute_run, _say_attribute,
                         "top-k training examples per query with per-group breakdown"),
    "learn-weights": Command(LearnWeightsSpec, learn_weights_run, _say_weights,
                             "learn one non-negative weight per parameter group, without labels"),
    "attribute-ekfac": Command(AttributeEkfacSpec, attribute_ekfac_run, _say_attribute,
                               "EK-FAC influence (kronfluence) on the model directly: top-k with per-group breakdown"),
    "learn-weights-ekfac": Command(LearnWeightsEkfacSpec, learn_weights_ekfac_run, _say_weights,
                                   "learn group weights for EK-FAC on learning queries (held-out ids)"),
    "report": Command(ReportSpec, report_run, _say_report,
                      "one self-contained HTML page: queries, top-k per run, weights, LDS and counterfactual"),
    "demo": Command(DemoSpec, run_demo, _say_demo, "train, sample, featurize, attribute and draw, end to end",
                    takes_log=True),
    "retrain": Command(RetrainSpec, retrain, _say_retrain,
                       "retrain the run's model on random training subsets (for the LDS)", RETRAIN_EPILOG),
    "build-pipeline": Command(BuildPipelineSpec, build_pipeline_run, _say_build,
                              "build and pretrain a small text-to-image pipeline (SD layout) from configs"),
    "build-lm": Command(BuildLMSpec, build_lm_run, _say_build_lm,
                        "a small GPT-2 from a config and a BPE tokenizer trained on a text corpus (save_pretrained)"),
    "import-lora": Command(ImportLoraSpec, import_lora_run, _say_train,
                           "UNet LoRA weights trained elsewhere (diffusers' scripts) + their base, as a checkpoint"),
}
EVAL_COMMANDS: dict[str, Command] = {
    "lds": Command(EvalLDSSpec, eval_lds, _say_lds, "linear datamodeling score against a finished retraining",
                   one_line_warnings=True),
    "counterfactual": Command(CounterfactualSpec, eval_counterfactual, _say_counterfactual,
                              "retrain without each query's top-k and k random training images"),
    "mislabel": Command(MislabelSpec, eval_mislabel, _say_mislabel,
                        "flip a fraction of a classifier's training labels, retrain, and find them by self-influence"),
    "tail-patch": Command(TailPatchSpec, eval_tail_patch, _say_tail_patch,
                          "one small gradient step on each query's top-k training examples (against k random ones)"),
    "retrieval": Command(EvalRetrievalSpec, eval_retrieval, _say_retrieval,
                         "Recall@k and mAP per aspect (label column) with bootstrap CIs, paired between runs"),
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors (an unknown option, a value that is not a number, an invalid choice) in one line, like every
    other error, instead of the whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add(sub, name: str, command: Command, path: str) -> None:
    p = sub.add_parser(name, help=command.help, epilog=command.epilog)
    add_spec_arguments(p, command.spec)
    common_arguments(p)
    p.set_defaults(command_path=path)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gradtrace", description="Training data attribution with learned "
                           "parameter-group weights, with per-group breakdown.")
    parser.add_argument("--version", action="version", version=f"gradtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        _add(sub, name, command, name)
    p = sub.add_parser("eval", help="evaluate attributions (LDS, counterfactual retraining, mislabel detection, retrieval)")
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    for name, command in EVAL_COMMANDS.items():
        _add(esub, name, command, f"eval {name}")
    return parser


def command_of(path: str) -> Command:
    return EVAL_COMMANDS[path.split()[1]] if path.startswith("eval ") else COMMANDS[path]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m gradtrace.cli -- retrain ...` (the -- keeps torchrun off our options)
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    command = command_of(args.command_path)
    try:
        spec = spec_from_args(command.spec, args)
        extra = {"log": (lambda line: print(line, flush=True))} if command.takes_log and not args.no_progress else {}
        with warnings.catch_warnings():
            if command.one_line_warnings:
                warnings.simplefilter("ignore", UserWarning)
            result = command.run(spec, progress=not args.no_progress, **extra)
        print(command.say(result, spec))
    except (UserError, OSError) as exc:
        if args.debug:
            raise
        line = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        print(f"gradtrace {args.command_path}: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradtrace: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:  # pragma: no cover
    sys.exit(main())
