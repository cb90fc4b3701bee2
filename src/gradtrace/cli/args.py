"""argparse arguments from a stage spec: each spec field becomes one option with the spec's default and help."""
from __future__ import annotations

import argparse
from dataclasses import fields

from gradtrace.pipeline.spec import default_of, flag_of


def add_spec_arguments(parser: argparse.ArgumentParser, spec_cls) -> None:
    """One option per CLI field of `spec_cls` (dest = the field name); booleans are flags."""
    for f in fields(spec_cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        default = default_of(f)
        kwargs: dict = {"dest": f.name, "help": meta.get("help")}
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        elif meta.get("append"):
            kwargs.update(action="append", default=[], metavar=meta.get("metavar"))
        else:
            kind = meta.get("type") or (type(default) if default is not None else str)
            kwargs.update(type=kind, default=default, metavar=meta.get("metavar"))
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("required"):
                kwargs["required"] = True
            if default is not None and not meta.get("required"):
                kwargs["help"] = f"{kwargs['help']} (default: {default})"
        parser.add_argument(flag_of(f), **kwargs)


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def spec_from_args(spec_cls, args: argparse.Namespace):
    """The spec of the parsed arguments (validated on construction)."""
    return spec_cls(**{f.name: getattr(args, f.name) for f in fields(spec_cls) if f.metadata.get("cli", True)})
