"""Stage specs: one dataclass per stage owns its settings' defaults, help text and validation.

    @dataclass
    class SampleSpec(Spec):
        checkpoint: str = option(None, "checkpoint directory", required=True)
        num: int = option(16, "number of images", check=positive)

Python callers build the spec (`SampleSpec(checkpoint="run", num=8)`, checked on construction); the CLI
builds its arguments from the same fields (`gradtrace.cli.args`), so both get the same defaults; the
stage's manifest stores `spec.to_dict()`.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, field, fields
from typing import Any, Callable

from gradtrace.errors import UserError
from gradtrace.io import jsonable


def option(default: Any, help: str, *, flag: str | None = None, type: Callable | None = None,
           choices: tuple | list | None = None, required: bool = False, append: bool = False,
           metavar: str | None = None, check: Callable[[Any, str], None] | None = None, cli: bool = True):
    """A spec field: its default and help text, how the CLI spells it, and an optional check(value, flag)."""
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "required": required,
            "append": append, "metavar": metavar, "check": check, "cli": cli}
    if append or isinstance(default, (list, dict)):
        return field(default_factory=lambda: list(default or []), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def positive(value, flag: str) -> None:
    """A check: None or a positive integer."""
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise UserError(f"{flag} must be a positive integer, got {value}")


def positive_number(value, flag: str) -> None:
    """A check: a number > 0."""
    if value is None or isinstance(value, bool) or not value > 0:
        raise UserError(f"{flag} must be a positive number, got {value}")


def non_negative(value, flag: str) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
        raise UserError(f"{flag} must be >= 0, got {value}")


class Spec:
    """Base of the stage specs (dataclasses): required fields and each field's check run on construction."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("required") and value is None:
                raise UserError(f"{flag_of(f)} is required")
            if isinstance(value, float) and not math.isfinite(value):  # every number a spec takes is finite
                raise UserError(f"{flag_of(f)} must be a finite number, got {value}")
            if f.metadata.get("choices") and value is not None and value not in f.metadata["choices"]:
                raise UserError(f"{flag_of(f)} must be one of {', '.join(map(str, f.metadata['choices']))}, "
                                f"got {value!r}")
            if f.metadata.get("check") is not None:
                f.metadata["check"](value, flag_of(f))
        self.validate()

    def validate(self) -> None:
        """Checks across fields (subclasses)."""

    def to_dict(self) -> dict:
        return jsonable(asdict(self))
