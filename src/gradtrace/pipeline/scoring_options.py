"""The scoring options every scoring stage shares (attribute, learn-weights, eval lds, eval counterfactual).

One definition of each: the method, the kernel (default per-group) and the λ scale c (the rule in
`gradtrace.attribution.lambda_rule`), so every stage offers the same choices with the same defaults.
"""
from __future__ import annotations

from gradtrace.choices import DEFAULT_C, DEFAULT_KERNEL, KERNELS, MethodNames, parse_c
from gradtrace.pipeline.spec import option


def method_option():
    """The base method by name: every registered one (`gradtrace.methods.register_method`), read when parsed."""
    return option("trak", "base attribution method (ekfac: on the model directly, with --checkpoint and --ids)",
                  choices=MethodNames())


def kernel_option():
    return option(DEFAULT_KERNEL, "TRAK/D-TRAK kernel: one per parameter group (default) or one shared",
                  choices=KERNELS)


def lambda_c_option(default=None):
    if default is None:
        text = (f"λ = c · mean diag(ΦᵀΦ) (EK-FAC: δ = c · mean(Λ)): a number >= 0, or 'auto' (SNR-best on "
                f"--learning-queries, or --learning-ids); default: the weights' c, else the method's ({DEFAULT_C}; "
                f"EK-FAC 0.1)")
    else:
        text = "λ scale c: a number >= 0, or 'auto' (default: the SNR-best c on the learning queries)"
    return option(default, text, type=str, check=lambda value, flag: parse_c(value))


def learning_queries_option():
    return option(None, "with --lambda-c auto: feature store of learning queries (never the --queries)", type=str)
