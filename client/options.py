"""Command-line flags generated from option dataclasses, so each option is declared once.

A dataclass field with a ``help`` in its metadata becomes ``--field-name`` (or the
metadata's ``flag``), typed from its annotation: ``Literal`` fields become choices, ``bool``
fields on/off switches, ``X | None`` fields optional. :func:`options_from` turns the parsed
arguments back into the dataclass.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable, TypeVar

Options = TypeVar("Options")


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options (those with a help text)."""
    return [field for field in dataclasses.fields(cls) if "help" in field.metadata]


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                skip: Iterable[str] = ()) -> None:
    """One flag per option field of ``cls``, with its default shown in the help."""
    hints = typing.get_type_hints(cls)
    skipped = set(skip)
    for field in option_fields(cls):
        if field.name in skipped:
            continue
        kind = _concrete(hints[field.name])
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        default = field.default if field.default is not dataclasses.MISSING \
            else field.default_factory()
        help_text = field.metadata["help"] + (" (default: %(default)s)" if default is not None
                                              and default is not False else "")
        extra: dict[str, Any] = {}
        if typing.get_origin(kind) is typing.Literal:
            extra["choices"] = typing.get_args(kind)
        elif kind is bool:
            extra["action"] = argparse.BooleanOptionalAction
        else:
            extra["type"] = kind
        if "metavar" in field.metadata:
            extra["metavar"] = field.metadata["metavar"]
        parser.add_argument(flag, dest=field.name, default=default, help=help_text, **extra)


def options_from(args: argparse.Namespace, cls: type[Options], **given: Any) -> Options:
    """``cls`` built from the parsed option fields, and ``given`` for the others."""
    values = {field.name: getattr(args, field.name) for field in option_fields(cls)
              if hasattr(args, field.name) and field.name not in given}
    return cls(**values, **given)


def _concrete(annotation: Any) -> Any:
    """``X`` for ``X | None``; the annotation itself otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
