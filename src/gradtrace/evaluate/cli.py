"""CLI for evaluation: `gradtrace retrain`, `gradtrace eval lds`, `gradtrace eval counterfactual`.

`add_commands(subparsers)` adds the subcommands to the main parser; each sets `handler` (called by
`gradtrace.cli.main`, which maps UserError to one line on stderr and exit code 2).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from gradtrace.errors import UserError


def add_commands(sub) -> None:
    from gradtrace.cli import _add_common
    from gradtrace.methods import DEFAULT_C, KERNELS, known_methods

    p = sub.add_parser("retrain", help="retrain the run's model on random training subsets (for the LDS)",
                       epilog="Resumable: rerun the same command after an interruption. Several machines: "
                              "torchrun --nnodes N --nproc-per-node 1 ... -m gradtrace.cli -- retrain --run RUN "
                              "--out SHARED_DIR (the -- stops torchrun reading --run as its --run-path); rank r "
                              "trains the models i with i % WORLD_SIZE == r.")
    p.add_argument("--run", required=True, help="checkpoint directory of the full model")
    p.add_argument("--subsets", type=int, default=64, help="number of subsets S")
    p.add_argument("--fraction", type=float, default=0.5, help="subset size as a fraction α of the training set")
    p.add_argument("--seeds", type=int, default=1, help="training seeds R per subset")
    p.add_argument("--workers", type=int, default=1, help="single-threaded worker processes")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset draw (recorded)")
    p.add_argument("--max-models", type=int, default=None, help="stop after training this many models")
    p.add_argument("--out", default=None, help="retraining directory (default: RUN/retrain)")
    _add_common(p)
    p.set_defaults(handler=cmd_retrain)

    p = sub.add_parser("eval", help="evaluate attributions (LDS, counterfactual retraining)")
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    def scoring_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--run", required=True, help="checkpoint directory of the full model")
        q.add_argument("--train-features", required=True, help="feature store of the run's training set")
        q.add_argument("--queries", required=True, help="feature store of the evaluation queries")
        q.add_argument("--method", choices=known_methods(), default="trak")
        q.add_argument("--kernel", choices=KERNELS, default="per-group")
        q.add_argument("--lambda-c", default=None,
                       help=f"λ = c · mean diag(ΦᵀΦ): a number, or auto = the SNR-best c on --learning-queries "
                            f"(default: the weights' c, else {DEFAULT_C})")
        q.add_argument("--learning-queries", default=None,
                       help="with --lambda-c auto: feature store of learning queries (never the --queries)")
        q.add_argument("--weights", default=None, help="learned group weights file (default: uniform)")
        q.add_argument("--timesteps", type=int, default=10, help="timesteps of the model-output grid")
        q.add_argument("--draws", type=int, default=4, help="noise draws per timestep of the model-output grid")
        q.add_argument("--out", required=True, help="output directory")

    q = esub.add_parser("lds", help="linear datamodeling score against a finished retraining")
    scoring_args(q)
    q.add_argument("--retrain", required=True, help="retraining directory (from `gradtrace retrain`)")
    q.add_argument("--per-group", action="store_true", help="also the LDS of each parameter group alone (+ plot)")
    q.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    _add_common(q)
    q.set_defaults(handler=cmd_eval_lds)

    q = esub.add_parser("counterfactual", help="retrain without each query's top-k and k random training images")
    scoring_args(q)
    q.add_argument("--num-queries", type=int, default=5, help="the first N queries of the store")
    q.add_argument("--top-k", type=int, default=10, help="training images removed per query")
    q.add_argument("--seeds", type=int, default=1, help="training seeds R per model")
    q.add_argument("--workers", type=int, default=1, help="single-threaded worker processes")
    q.add_argument("--random-seed", type=int, default=0, help="seed of the random removals")
    q.add_argument("--max-models", type=int, default=None, help="stop after training this many models")
    _add_common(q)
    q.set_defaults(handler=cmd_eval_counterfactual)


def _grid(args):
    from gradtrace.evaluate.outputs import OutputGrid

    for value, flag in ((args.timesteps, "--timesteps"), (args.draws, "--draws")):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    return OutputGrid(num_timesteps=args.timesteps, num_draws=args.draws)


def _check_c(args) -> None:
    """--lambda-c: None, 'auto' or a number > 0 (stored back as a float)."""
    if args.lambda_c is None or str(args.lambda_c).lower() == "auto":
        return
    try:
        value = float(args.lambda_c)
    except ValueError:
        raise UserError(f"--lambda-c must be a number or 'auto', got {args.lambda_c!r}") from None
    if not value > 0:
        raise UserError(f"--lambda-c must be > 0, got {args.lambda_c}")
    args.lambda_c = value


def cmd_retrain(args) -> None:
    from gradtrace.evaluate.retrain import retrain_run

    if args.max_models is not None and args.max_models < 0:
        raise UserError(f"--max-models must be >= 0, got {args.max_models}")
    res = retrain_run(args.run, args.out, n_subsets=args.subsets, fraction=args.fraction, n_seeds=args.seeds,
                      workers=args.workers, subset_seed=args.subset_seed, max_models=args.max_models,
                      progress=not args.no_progress)
    line = f"retraining: {res['out']} ({res['finished']}/{res['models']} models finished"
    if res.get("world", 1) > 1:
        line += f"; rank {res['rank']}/{res['world']} trained {res['trained']}"
    print(line + ")")


def cmd_eval_lds(args) -> None:
    from gradtrace.evaluate.eval_lds import RESULT, eval_lds_run

    _check_c(args)
    with warnings.catch_warnings():  # the undefined-query warning is printed below as one line
        warnings.simplefilter("ignore", UserWarning)
        doc = eval_lds_run(args.run, args.retrain, args.train_features, args.queries, args.out, method=args.method,
                           kernel=args.kernel, c=args.lambda_c, weights_path=args.weights, per_group=args.per_group,
                           learning_queries=args.learning_queries, grid=_grid(args), seed=args.seed,
                           progress=not args.no_progress)
    r = doc["lds"]
    if r["warning"]:
        print(f"gradtrace eval lds: warning: {r['warning']}", file=sys.stderr)
    mean = "undefined" if r["mean"] is None else f"{r['mean']:.4f}"
    ci = "" if r["ci95"][0] is None else f" [95% CI {r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"
    undef = f", {r['n_undefined']} undefined" if r["n_undefined"] else ""
    print(f"LDS {mean}{ci} over {r['n_defined']} queries{undef}: {Path(args.out) / RESULT}")


def cmd_eval_counterfactual(args) -> None:
    from gradtrace.evaluate.counterfactual import RESULT, counterfactual_run, counterfactual_table

    _check_c(args)
    if args.max_models is not None and args.max_models < 0:
        raise UserError(f"--max-models must be >= 0, got {args.max_models}")
    doc = counterfactual_run(args.run, args.train_features, args.queries, args.out, method=args.method,
                             kernel=args.kernel, c=args.lambda_c, weights_path=args.weights,
                             learning_queries=args.learning_queries, num_queries=args.num_queries, k=args.top_k,
                             n_seeds=args.seeds, workers=args.workers,
                             random_seed=args.random_seed, grid=_grid(args), max_models=args.max_models,
                             progress=not args.no_progress)
    if not doc.get("finished"):
        print(f"counterfactual: {len(doc['missing'])} models still to train; rerun the same command")
        return
    print(counterfactual_table(doc))
    print(f"counterfactual: {Path(args.out) / RESULT}")

