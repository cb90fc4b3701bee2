"""The `gradtrace` command: one subcommand per pipeline stage (`eval` has its own), plus `demo`.

Each subcommand parses its arguments from its stage's spec (`gradtrace.cli.args`), builds the spec, makes
one pipeline call and prints one line. Bad input ends with one line on stderr and exit code 2 (``--debug``
shows the traceback).

Start-up stays light: the specs (`gradtrace.pipeline.specs`) import no torch, and the table below names each
stage's function as a "module:function" string that is imported only when its command runs (and the printed
line's function in `gradtrace.cli.say`), so `--help` and refusals of bad arguments take a fraction of a second.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from importlib import import_module

from gradtrace import __version__
from gradtrace.cli.args import add_spec_arguments, common_arguments, spec_from_args
from gradtrace.errors import GradtraceWarning, UserError, os_error_line
from gradtrace.extras import missing_extra
from gradtrace.pipeline.specs.attribute import AttributeSpec
from gradtrace.pipeline.specs.build_lm import BuildLMSpec
from gradtrace.pipeline.specs.build_pipeline import BuildPipelineSpec
from gradtrace.pipeline.specs.check_captions import CheckCaptionsSpec
from gradtrace.pipeline.specs.demo import DemoSpec
from gradtrace.pipeline.specs.ekfac import AttributeEkfacSpec, LearnWeightsEkfacSpec
from gradtrace.pipeline.specs.eval_retrieval import EvalRetrievalSpec
from gradtrace.pipeline.specs.evaluate import (
    RETRAIN_EPILOG,
    CounterfactualSpec,
    EvalLDSSpec,
    MislabelSpec,
    RetrainSpec,
    TailPatchSpec,
)
from gradtrace.pipeline.specs.featurize import FeaturizeSpec
from gradtrace.pipeline.specs.import_lora import ImportLoraSpec
from gradtrace.pipeline.specs.learn_weights import LearnWeightsSpec
from gradtrace.pipeline.specs.merge_features import MergeFeaturesSpec
from gradtrace.pipeline.specs.report import ReportSpec
from gradtrace.pipeline.specs.sample import SampleSpec
from gradtrace.pipeline.specs.train import TrainSpec

EXIT_USAGE = 2
SAY = "gradtrace.cli.say"  # the module of the printed lines (imported after a command ran)


def load(ref: str):
    """The object a "module:name" reference names (the module is imported now)."""
    module, _, name = ref.partition(":")
    return getattr(import_module(module), name)


@dataclass(frozen=True)
class Command:
    spec: type
    run_ref: str  # "module:function" of the stage: (spec, progress=...) -> result; imported when the command runs
    say_ref: str  # the function of `gradtrace.cli.say` that prints the result: (result, spec) -> the one line
    help: str
    epilog: str | None = None
    takes_log: bool = False       # the run reports its stages through a `log` callback (printed)
    one_line_warnings: bool = False  # `say` prints the stage's warnings itself, as one line

    def run(self, spec, **kwargs):
        return load(self.run_ref)(spec, **kwargs)

    def say(self, result, spec) -> str:
        return load(f"{SAY}:{self.say_ref}")(result, spec)




COMMANDS: dict[str, Command] = {
    "train": Command(TrainSpec, "gradtrace.pipeline.train:train_run", "train",
                     "train a model (default: a tiny diffusion UNet, DDPM)"),
    "sample": Command(SampleSpec, "gradtrace.pipeline.sample:sample_run", "sample",
                      "generate images from a checkpoint"),
    "featurize": Command(FeaturizeSpec, "gradtrace.pipeline.featurize:featurize_run", "featurize",
                         "per-example projected gradient features into a feature store"),
    "merge-features": Command(MergeFeaturesSpec, "gradtrace.pipeline.merge_features:merge_features_run", "merge",
                              "one feature store from the partial stores of a torchrun job's machines"),
    "attribute": Command(AttributeSpec, "gradtrace.pipeline.attribute:attribute_run", "attribute",
                         "top-k training examples per query with per-group breakdown"),
    "learn-weights": Command(LearnWeightsSpec, "gradtrace.pipeline.learn_weights:learn_weights_run", "weights",
                             "learn one non-negative weight per parameter group, without labels"),
    "attribute-ekfac": Command(AttributeEkfacSpec, "gradtrace.pipeline.ekfac:attribute_ekfac_run", "attribute",
                               "deprecated alias of `attribute --method ekfac` (the same options and output)"),
    "learn-weights-ekfac": Command(LearnWeightsEkfacSpec, "gradtrace.pipeline.ekfac:learn_weights_ekfac_run",
                                   "weights",
                                   "deprecated alias of `learn-weights --method ekfac` (the same options and output)"),
    "report": Command(ReportSpec, "gradtrace.pipeline.report:report_run", "report",
                      "one self-contained HTML page: queries, top-k per run, weights, LDS and counterfactual"),
    "demo": Command(DemoSpec, "gradtrace.pipeline.demo:run_demo", "demo",
                    "train, sample, featurize, attribute and draw, end to end", takes_log=True),
    "retrain": Command(RetrainSpec, "gradtrace.pipeline.evaluate:retrain", "retrain",
                       "retrain the run's model on random training subsets (for the LDS)", RETRAIN_EPILOG),
    "build-pipeline": Command(BuildPipelineSpec, "gradtrace.pipeline.build_pipeline:build_pipeline_run", "build",
                              "build and pretrain a small text-to-image pipeline (SD layout) from configs"),
    "check-captions": Command(CheckCaptionsSpec, "gradtrace.pipeline.check_captions:check_captions_run",
                              "check_captions", "how well a text-to-image model renders its training captions "
                              "(nearest training image of generated ones; no labels)"),
    "build-lm": Command(BuildLMSpec, "gradtrace.pipeline.build_lm:build_lm_run", "build_lm",
                        "a small GPT-2 from a config and a BPE tokenizer trained on a text corpus (save_pretrained)"),
    "import-lora": Command(ImportLoraSpec, "gradtrace.pipeline.import_lora:import_lora_run", "train",
                           "UNet LoRA weights trained elsewhere (diffusers' scripts) + their base, as a checkpoint"),
}
EVAL_COMMANDS: dict[str, Command] = {
    "lds": Command(EvalLDSSpec, "gradtrace.pipeline.evaluate:eval_lds", "lds",
                   "linear datamodeling score against a finished retraining", one_line_warnings=True),
    "counterfactual": Command(CounterfactualSpec, "gradtrace.pipeline.evaluate:eval_counterfactual", "counterfactual",
                              "retrain without each query's top-k and k random training images"),
    "mislabel": Command(MislabelSpec, "gradtrace.pipeline.evaluate:eval_mislabel", "mislabel",
                        "flip a fraction of a classifier's training labels, retrain, and find them by self-influence"),
    "tail-patch": Command(TailPatchSpec, "gradtrace.pipeline.evaluate:eval_tail_patch", "tail_patch",
                          "one small gradient step on each query's top-k training examples (against k random ones)"),
    "retrieval": Command(EvalRetrievalSpec, "gradtrace.pipeline.eval_retrieval:eval_retrieval", "retrieval",
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
    p = sub.add_parser("eval", help="evaluate attributions (LDS, counterfactual retraining, mislabel detection, "
                       "retrieval)")
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    for name, command in EVAL_COMMANDS.items():
        _add(esub, name, command, f"eval {name}")
    return parser


def command_of(path: str) -> Command:
    return EVAL_COMMANDS[path.split()[1]] if path.startswith("eval ") else COMMANDS[path]


def _keep_warnings(kept: list[str], show):
    """`warnings.showwarning` that keeps gradtrace's own warnings (printed as one line each once the command has
    succeeded: a refusal stays one line) and shows others as Python does."""
    def showwarning(message, category, *args, **kwargs):
        if issubclass(category, GradtraceWarning):
            kept.append(str(message))
        else:
            show(message, category, *args, **kwargs)
    return showwarning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m gradtrace.cli -- retrain ...` (the -- keeps torchrun off our options)
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    command = command_of(args.command_path)
    try:
        spec = spec_from_args(command.spec, args)
        extra = {"log": (lambda line: print(line, flush=True))} if command.takes_log and not args.no_progress else {}
        kept: list[str] = []
        with warnings.catch_warnings():
            if command.one_line_warnings:
                warnings.simplefilter("ignore", UserWarning)
            warnings.showwarning = _keep_warnings(kept, warnings.showwarning)
            result = command.run(spec, progress=not args.no_progress, **extra)
        print(command.say(result, spec))
        for line in dict.fromkeys(kept):  # each once, in order
            print(f"gradtrace {args.command_path}: warning: {line}", file=sys.stderr)
    except (UserError, OSError, ImportError) as exc:
        if args.debug or (isinstance(exc, ImportError) and missing_extra(exc) is None):
            raise  # an ImportError of a package that is not optional is a bug: its traceback
        if isinstance(exc, ImportError):  # an optional package a step needs: the extra that brings it
            exc = missing_extra(exc, f"gradtrace {args.command_path}")
        line = os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        print(f"gradtrace {args.command_path}: error: {line}", file=sys.stderr)
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: skip the interpreter's teardown, where gloo
            sys.stdout.flush()                     # can abort (SIGABRT) on a peer rank that has already exited,
            sys.stderr.flush()                     # so the launcher reports this exit code 2 and its one line
            os._exit(EXIT_USAGE)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradtrace: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:  # pragma: no cover
    sys.exit(main())
