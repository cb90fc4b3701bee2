"""Query plans for conditional models: which attribute tokens each generated query gets.

- ``aspect=None``: every attribute set (the general learning or evaluation queries); values drawn
  uniformly from a seed.
- ``aspect="style"``: only that attribute's token set, cycling through its values (balanced); every
  other attribute gets the null token (-1). Training images that share the set value rise in the
  pseudo-top-k, so weights learned on such queries emphasise the groups that carry that aspect.
"""
from __future__ import annotations

import numpy as np

from gradtrace.errors import UserError


def query_codes(attribute_values: dict[str, list[str]], n: int, *, aspect: str | None = None,
                seed: int = 0) -> np.ndarray:
    """(n, A) int64 conditioning codes for n queries (-1 = null token)."""
    names = list(attribute_values)
    if not names:
        raise UserError("this model is unconditional; aspects need a conditional model (train on a dataset "
                        "with attributes)")
    if n < 1:
        raise UserError(f"the number of queries must be positive, got {n}")
    rng = np.random.default_rng([int(seed), 7919])
    if aspect is None:
        return np.stack([rng.integers(0, len(attribute_values[a]), n) for a in names], axis=1).astype(np.int64)
    if aspect not in attribute_values:
        raise UserError(f"unknown aspect '{aspect}'; this model's attributes are {', '.join(names)}")
    codes = np.full((n, len(names)), -1, dtype=np.int64)
    k = len(attribute_values[aspect])
    codes[:, names.index(aspect)] = rng.permutation(np.arange(n) % k)
    return codes
