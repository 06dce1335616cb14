"""Run parameters as dataclasses, and the command-line flags made from them (``bvip sft``, ``bvip dpo``).

As in the TRL examples, one dataclass per method holds every setting with its help text
(:func:`param`); :func:`add_flags` turns its fields into ``--flags`` and :func:`from_flags` back into the
dataclass. Command-line paths are read from the current directory, as every Unix tool reads them; a
boolean flag takes true/false, 1/0 or yes/no and nothing else (``--eval Ture`` is an error, not False).
"""

from __future__ import annotations

import argparse
from dataclasses import field, fields
from pathlib import Path
from typing import Any, TypeVar

from bvip_helpers.io import resolve_cli_path

T = TypeVar("T")


def param(default: Any, help: str, *, path: bool = False, cli: bool = True) -> Any:
    """A dataclass field with its flag's help text; ``path``: a command-line path, ``cli=False``: no flag."""
    return field(default=default, metadata={"help": help, "path": path, "cli": cli})


def parse_bool(text: str) -> bool:
    """A boolean flag's value: true/false, 1/0 or yes/no, and nothing else (``Ture`` is an error, not False)."""
    value = str(text).strip().lower()
    if value in {"1", "true", "yes"}:
        return True
    if value in {"0", "false", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true or false (or 1/0, yes/no)")


class _Given(argparse.Action):
    """Store a flag's value and remember that the user gave it (a ``--recipe`` never overrides it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace._given = {*getattr(namespace, "_given", set()), self.dest}


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (fields with ``cli=False`` left out), with its help."""
    defaults = cls()
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        default, help_text = getattr(defaults, f.name), f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", type=parse_bool, default=default, metavar="BOOL", action=_Given,
                                help=f"{help_text} (default {str(default).lower()})")
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default, action=_Given,
                                help=f"{help_text} (default {default!r})")


def from_flags(args: argparse.Namespace, cls: type[T]) -> T:
    """The dataclass ``cls`` from parsed flags: paths read from the cwd, a local ``model`` folder too, and the
    names of the flags the user gave in ``explicit`` when ``cls`` has that field."""
    names = {f.name for f in fields(cls)}
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli", True)}
    if "explicit" in names:
        values["explicit"] = tuple(sorted(getattr(args, "_given", ())))
    for f in fields(cls):
        if f.metadata.get("path") and values.get(f.name):
            values[f.name] = str(resolve_cli_path(values[f.name]))
    if values.get("resume") not in (None, "", "auto"):
        values["resume"] = str(resolve_cli_path(values["resume"]))
    if values.get("model") and Path(values["model"]).expanduser().is_dir():  # a local checkpoint, named from the cwd
        values["model"] = str(resolve_cli_path(values["model"]))
    return cls(**values)
