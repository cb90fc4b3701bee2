"""gradtrace: training data attribution for diffusion models with learned parameter-group weights."""

__version__ = "0.1.0"

from gradtrace.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
