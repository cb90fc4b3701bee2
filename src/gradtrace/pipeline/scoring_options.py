"""The scoring options every scoring stage shares (attribute, learn-weights, eval lds, eval counterfactual).

One definition of each: the method, the kernel (default per-group) and the λ scale c (the rule in
`gradtrace.attribution.lambda_rule`), so every stage offers the same choices with the same defaults. The names
come from `gradtrace.choices` (no torch: the CLI builds its options from them at start-up).
"""
from __future__ import annotations

from gradtrace.choices import DEFAULT_C, DEFAULT_KERNEL, KERNELS, METHODS, parse_c
from gradtrace.pipeline.spec import option


def method_option():
    return option("trak", "base attribution method", choices=METHODS)


def kernel_option():
    return option(DEFAULT_KERNEL, "TRAK/D-TRAK kernel: one per parameter group (default) or one shared",
                  choices=KERNELS)


def lambda_c_option(default=None):
    if default is None:
        text = (f"λ = c · mean diag(ΦᵀΦ): a number >= 0, or 'auto' (SNR-best on --learning-queries); "
                f"default: the weights' c, else {DEFAULT_C}")
    else:
        text = "λ scale c: a number >= 0, or 'auto' (default: the SNR-best c on the learning queries)"
    return option(default, text, type=str, check=lambda value, flag: parse_c(value))


def learning_queries_option():
    return option(None, "with --lambda-c auto: feature store of learning queries (never the --queries)", type=str)
