"""Input checks for attribution methods: group layouts, feature arrays, weights, row selections.

Every failure is a `UserError` with one line naming the problem and the fix.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gradtrace.errors import UserError


def check_group_slices(group_slices: Any, k: int | None = None) -> list[tuple[str, int, int]]:
    """Normalise `group_slices` to a list of (name, start, stop) tuples and check the layout.

    The blocks must be non-empty, contiguous, start at 0 and (when `k` is given) end at `k`;
    names must be unique strings. Lists from JSON (`[name, start, stop]`) are accepted.
    """
    fix = "pass group_slices as [(name, start, stop), ...], contiguous from 0 to the feature width"
    if group_slices is None or isinstance(group_slices, (str, bytes)):
        raise UserError(f"group_slices must be a list of (name, start, stop); {fix}")
    try:
        entries = list(group_slices)
    except TypeError:
        raise UserError(f"group_slices must be a list of (name, start, stop), got {type(group_slices).__name__}; "
                        f"{fix}") from None
    if not entries:
        raise UserError(f"group_slices is empty; {fix}")
    out: list[tuple[str, int, int]] = []
    expected_start = 0
    for i, entry in enumerate(entries):
        try:
            name, start, stop = entry
        except (TypeError, ValueError):
            raise UserError(f"group_slices[{i}] = {entry!r} is not (name, start, stop); {fix}") from None
        if not isinstance(name, str) or not name:
            raise UserError(f"group_slices[{i}] has name {name!r}, expected a non-empty string; {fix}")
        if not _is_int(start) or not _is_int(stop):
            raise UserError(f"group '{name}' has non-integer bounds ({start!r}, {stop!r}); {fix}")
        start, stop = int(start), int(stop)
        if start != expected_start:
            raise UserError(f"group '{name}' starts at column {start} but the previous group ends at "
                            f"{expected_start}; {fix}")
        if stop <= start:
            raise UserError(f"group '{name}' is empty or reversed ({start}, {stop}); {fix}")
        out.append((name, start, stop))
        expected_start = stop
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"group names are not unique ({', '.join(dupes)}); give every group its own name")
    if k is not None and expected_start != k:
        raise UserError(f"group_slices cover columns [0, {expected_start}) but the features have {k} columns; "
                        f"use the group layout the features were computed with")
    return out


def check_same_layout(expected: list[tuple[str, int, int]], found: Any, what: str = "query features") -> None:
    """Refuse when `found` (a group layout) differs from the layout the method was fitted on."""
    found = check_group_slices(found)
    if [tuple(e) for e in expected] != found:
        for i, (a, b) in enumerate(zip(expected, found)):
            if tuple(a) != b:
                raise UserError(f"{what} group layout differs from the fitted one at group {i} "
                                f"({b} vs fitted {tuple(a)}); featurize queries with the same groups and projection")
        raise UserError(f"{what} have {len(found)} groups but the method was fitted on {len(expected)}; "
                        f"featurize queries with the same groups and projection")


def check_matrix(x: Any, what: str, k: int | None = None) -> np.ndarray:
    """Return `x` as a 2-D floating array (no copy for numpy arrays / memmaps); check shape and width."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is bad input
            raise UserError(f"{what} could not be read as an array ({exc}); pass a 2-D float array") from None
    if x.ndim != 2:
        extra = "; reshape a single feature vector to (1, k)" if x.ndim == 1 else ""
        raise UserError(f"{what} must be 2-D (rows, k), got shape {tuple(x.shape)}{extra}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"{what} have dtype {x.dtype}, expected floating point; pass float32 features")
    if x.shape[0] == 0:
        raise UserError(f"{what} have no rows; featurize at least one example")
    if k is not None and x.shape[1] != k:
        raise UserError(f"{what} have {x.shape[1]} columns but the fitted method expects {k}; "
                        f"featurize with the same groups and projection as the training set")
    return x


def check_train_matrix(x: Any, what: str = "training features") -> Any:
    """As `check_matrix`, but a read-only row view (an object with ndim 2, shape, a float dtype and row
    slicing, such as a bfloat16 store's decoder) is returned as it is: training features are only ever
    read in row chunks, so they are never decoded or copied whole."""
    if not isinstance(x, np.ndarray) and getattr(x, "ndim", None) == 2 and hasattr(x, "__getitem__") \
            and np.issubdtype(getattr(x, "dtype", np.dtype(object)), np.floating):
        if x.shape[0] == 0:
            raise UserError(f"{what} have no rows; featurize at least one example")
        return x
    return check_matrix(x, what)


def raise_if_nonfinite(chunk: np.ndarray, offset: int, what: str) -> None:
    """Raise a UserError naming the rows (global indices) of `chunk` that hold NaN or Inf."""
    if np.issubdtype(chunk.dtype, np.integer):
        return
    finite_rows = np.isfinite(chunk).all(axis=1)
    if finite_rows.all():
        return
    bad = np.flatnonzero(~finite_rows) + offset
    shown = ", ".join(str(int(r)) for r in bad[:5])
    more = f" and {len(bad) - 5} more in this block" if len(bad) > 5 else ""
    raise UserError(f"{what} contain NaN/Inf in rows {shown}{more}; re-featurize those examples "
                    f"(or drop them) before scoring")


def check_weights(weights: Any, n_groups: int) -> np.ndarray | None:
    """Return group weights as a float64 (M,) array, or None for all ones."""
    if weights is None:
        return None
    if hasattr(weights, "detach"):
        weights = weights.detach().cpu().numpy()
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError("weights could not be read as numbers; pass one non-negative weight per group") from None
    if w.shape != (n_groups,):
        raise UserError(f"weights have shape {tuple(w.shape)} but there are {n_groups} groups; "
                        f"pass one non-negative weight per group")
    if not np.isfinite(w).all():
        raise UserError("weights contain NaN/Inf; pass finite non-negative weights")
    if (w < 0).any():
        raise UserError(f"weights contain negative values (min {w.min():.3g}); pass non-negative weights "
                        f"(e.g. a softmax)")
    return w


def check_rows(rows: Any, n: int) -> np.ndarray:
    """Return a selection of training rows as an int64 index array within [0, n)."""
    r = np.asarray(rows)
    if r.dtype == bool:
        if r.shape != (n,):
            raise UserError(f"a boolean rows mask must have length {n}, got shape {tuple(r.shape)}")
        return np.flatnonzero(r).astype(np.int64)
    if r.ndim == 0:
        r = r.reshape(1)
    if r.ndim != 1 or not (np.issubdtype(r.dtype, np.integer) or r.size == 0):
        raise UserError(f"rows must be a 1-D list of integer row indices, got shape {tuple(r.shape)} "
                        f"dtype {r.dtype}")
    r = r.astype(np.int64)
    if r.size and (r.min() < 0 or r.max() >= n):
        raise UserError(f"rows must lie in [0, {n}), got values from {r.min()} to {r.max()}; "
                        f"pass indices into the training set")
    return r


def check_positive_int(value: Any, what: str) -> int:
    if not _is_int(value) or int(value) < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def block_scale(group_slices: Sequence[tuple[str, int, int]], weights: np.ndarray, k: int) -> np.ndarray:
    """Per-column scale (k,) that multiplies block j by weights[j]."""
    scale = np.empty(k, dtype=np.float64)
    for (_, start, stop), w in zip(group_slices, weights):
        scale[start:stop] = w
    return scale


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
