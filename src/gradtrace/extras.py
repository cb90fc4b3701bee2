"""Optional dependencies: which extra of `pip install 'gradtrace[EXTRA]'` brings each package, and the one line a
user gets when a package a step needs is missing (a `UserError`, exit code 2 on the command line), never an
ImportError traceback.

The core (torch, numpy, scipy, safetensors, Pillow, tqdm, scikit-learn) featurizes, scores and learns weights for
the classifier adapter and any adapter or method of one's own. The extras:

    diffusers      the tiny diffusion UNets and diffusers pipelines (text-to-image pipelines: also transformers)
    transformers   causal language models and text encoders (transformers, tokenizers, peft for LoRA)
    ekfac          kronfluence's runtime dependencies (kronfluence itself: pip install --no-deps kronfluence==1.0.1,
                   it declares torchvision, which it never imports)
    report         the figures and the HTML report (matplotlib)
    hf             Hugging Face datasets as data (`--data hf:PATH`, in-memory datasets and lists)
    notebook       to_pandas() and the inline views (pandas, matplotlib)

Where they are checked: the command line turns any missing optional package into its line (`gradtrace.cli.main`);
library callers get it from the front door (`gradtrace.__getattr__`), the adapter registry, and `require` where a
package is imported on first use (EK-FAC's engine, the report's pyplot, datasets, pandas).
"""
from __future__ import annotations

import sys
from importlib import import_module
from importlib.util import find_spec
from types import ModuleType

from gradtrace.errors import UserError

EXTRA_OF = {"diffusers": "diffusers", "transformers": "transformers", "tokenizers": "transformers",
            "peft": "transformers", "kronfluence": "ekfac", "accelerate": "ekfac", "einops": "ekfac",
            "einconv": "ekfac", "opt_einsum": "ekfac", "matplotlib": "report", "datasets": "hf", "pyarrow": "hf",
            "pandas": "notebook"}
ALSO = {"kronfluence": " and then pip install --no-deps kronfluence==1.0.1"}


def install_line(package: str) -> str:
    """How to install the extra that brings `package` (a top-level module name)."""
    return f"pip install 'gradtrace[{EXTRA_OF[package]}]'" + ALSO.get(package, "")


def missing_extra(exc: BaseException, what: str = "this step") -> UserError | None:
    """The one-line error for a missing module of an optional package (None for anything else: a real bug)."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None
    package = name.split(".")[0]
    if package not in EXTRA_OF:
        return None
    if package != name and installed(package):  # the package is there, one of its modules is not: its version
        return UserError(f"{what} needs {name}, which the installed {package} lacks; pip install --upgrade "
                         f"'gradtrace[{EXTRA_OF[package]}]'")
    return UserError(f"{what} needs {package}, which is not installed; {install_line(package)}")


def installed(package: str) -> bool:
    """Whether a top-level package can be imported (without importing it)."""
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, what: str) -> ModuleType:
    """`import module` for `what`, or the one-line error naming the extra that brings it."""
    try:
        return import_module(module)
    except ImportError as exc:
        error = missing_extra(exc, what)
        if error is None:
            raise
        raise error from None
