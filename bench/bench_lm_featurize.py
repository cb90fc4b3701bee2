"""Featurization cost of a causal LM against the forward + backward floor (same run): the `build-lm` GPT-2 (2 blocks,
width 64, context 64) on the first 256 fortunes at 64 tokens, block groups, --dim 4096, the default projection and
Kronecker, for the full model and a rank-4 LoRA adapter; one torch thread; each rate the best of 3 passes after a
warm-up (the machine is shared).

    python bench/bench_lm_featurize.py [--out bench_out/lm_featurize]
"""
from __future__ import annotations

import argparse

from common import lm_featurization_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/lm_featurize")
    args = parser.parse_args()
    lm_featurization_cost(args.out, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
