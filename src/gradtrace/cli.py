"""The `gradtrace` command: one subcommand per pipeline stage, plus `demo`.

Bad input ends with one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gradtrace.errors import UserError

EXIT_USAGE = 2


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_data(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", required=required, help="digits | shapes | imagefolder:PATH")
    p.add_argument("--n", type=int, default=None, help="use the first N images of the dataset")
    p.add_argument("--size", type=int, default=None, help="image size (shapes, imagefolder)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of a generated dataset (shapes)")
    p.add_argument("--ids", default=None, help="file of example ids to use (.npy, .json or one per line)")


def build_parser() -> argparse.ArgumentParser:
    from gradtrace import __version__
    from gradtrace.features.projection import DEFAULT_TOTAL_DIM, KINDS
    from gradtrace.measure import MEASUREMENTS
    from gradtrace.methods import DEFAULT_C, KERNELS, known_methods

    parser = argparse.ArgumentParser(prog="gradtrace", description="Training data attribution for diffusion "
                                     "models, with per-parameter-group breakdown.")
    parser.add_argument("--version", action="version", version=f"gradtrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a tiny diffusion model (DDPM) on a dataset")
    _add_data(p, required=True)
    p.add_argument("--model", choices=["auto", "unconditional", "conditional"], default="auto",
                   help="auto: conditional when the dataset has attributes (digits: unconditional)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint directory")
    _add_common(p)

    p = sub.add_parser("sample", help="generate images from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num", type=int, default=16, help="number of images")
    p.add_argument("--attr", action="append", default=[], metavar="NAME=VALUE",
                   help="set one attribute token (repeatable); unset attributes use the null token")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--eta", type=float, default=1.0, help="DDIM noise level in [0, 1] (0 = deterministic DDIM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="samples directory")
    _add_common(p)

    p = sub.add_parser("featurize", help="per-example projected gradient features into a feature store")
    p.add_argument("--checkpoint", required=True)
    _add_data(p)
    p.add_argument("--samples", default=None, help="featurize a samples directory instead of a dataset")
    p.add_argument("--groups", default="block", help="tensor | module | block | 'name=regex,...;name2=regex'")
    p.add_argument("--projection", choices=KINDS, default="rademacher")
    p.add_argument("--dim", type=int, default=DEFAULT_TOTAL_DIM, help="total projection dimension")
    p.add_argument("--proj-seed", type=int, default=0)
    p.add_argument("--measurement", choices=MEASUREMENTS, default="loss")
    p.add_argument("--timesteps", type=int, default=10, help="T timesteps averaged per example")
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=64, help="examples per chunk")
    p.add_argument("--out", required=True, help="feature store directory")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    _add_common(p)

    p = sub.add_parser("attribute", help="top-k training examples per query with per-group breakdown")
    p.add_argument("--train", required=True, help="feature store of the training set")
    p.add_argument("--queries", required=True, help="feature store of the queries")
    p.add_argument("--method", choices=known_methods(), default="trak")
    p.add_argument("--kernel", choices=KERNELS, default="per-group",
                   help="TRAK/D-TRAK kernel: one per parameter group (default) or one shared")
    p.add_argument("--lambda-c", default=None,
                   help=f"λ = c · mean diag(ΦᵀΦ), or 'auto' (SNR-best on --learning-queries); "
                        f"default: the weights' c, else {DEFAULT_C}")
    p.add_argument("--learning-queries", default=None,
                   help="with --lambda-c auto: feature store of learning queries (never the --queries)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--weights", default=None, help="learned group weights (a learn-weights JSON file)")
    p.add_argument("--aspect", default=None, help="use the store's learned weights for this aspect (e.g. style)")
    p.add_argument("--out", required=True)
    p.add_argument("--no-report", action="store_true", help="skip report.png")
    _add_common(p)

    p = sub.add_parser("learn-weights", help="learn one non-negative weight per parameter group, without labels")
    p.add_argument("--train", required=True, help="feature store of the training set")
    p.add_argument("--queries", default=None, help="feature store of learning queries (never evaluation queries)")
    p.add_argument("--generate", type=int, default=None, metavar="N",
                   help="generate N learning queries from the store's checkpoint instead of --queries")
    p.add_argument("--aspect", default=None, help="with --generate: set only this attribute's token (e.g. style)")
    p.add_argument("--sample-seed", type=int, default=1, help="seed of the generated learning queries")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--method", choices=known_methods(), default="trak")
    p.add_argument("--kernel", choices=KERNELS, default="per-group",
                   help="TRAK/D-TRAK kernel: one per parameter group (default) or one shared")
    p.add_argument("--lambda-c", default="auto",
                   help="λ scale c, or 'auto' (default: the SNR-best c on the learning queries)")
    p.add_argument("--k", type=int, default=None, help="top-k of the objective (default 10)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--l2", type=float, default=None, help="λ‖w‖² penalty")
    p.add_argument("--out", default=None, help="weights JSON (default: STORE/weights/METHOD-KERNEL-ASPECT.json)")
    _add_common(p)

    p = sub.add_parser("demo", help="train, sample, featurize, attribute and draw, end to end")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="tiny settings (about a minute)")
    _add_common(p)
    from gradtrace.evaluate.cli import add_commands  # retrain, eval lds, eval counterfactual

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from gradtrace import commands

        handler = getattr(args, "handler", None) or getattr(commands, f"cmd_{args.command.replace('-', '_')}")
        handler(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"gradtrace {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("gradtrace: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
