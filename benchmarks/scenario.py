"""A scenario: one question a benchmark answers, the configuration it is asked with, its rows.

In the manner of optimum-benchmark's ``Scenario`` / ``InferenceConfig``: a scenario module
defines a frozen config dataclass whose fields carry their help text and their value under
``--quick`` (:func:`option`), a ``run(config) -> rows`` function, and a module-level
``SCENARIO``. :mod:`benchmarks.run_all` turns the fields into flags, runs the scenario and
saves its rows through the one results writer (:mod:`benchmarks.results`); a scenario never
parses arguments, writes files of its own, or words conclusions (those go into
``docs/performance.md``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator

#: Exported graphs, trained models and server logs (git-ignored), one folder per scenario.
CACHE = Path(__file__).resolve().parent / ".cache"

_NO_QUICK = object()


def option(default: Any, help: str, *, quick: Any = _NO_QUICK) -> Any:
    """A config field: its full-run ``default``, its ``--help`` text and its ``--quick`` value."""
    metadata = {"help": help}
    if quick is not _NO_QUICK:
        metadata["quick"] = quick
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a scenario's markdown table: a row key (dotted reaches into dicts)."""

    key: str
    title: str
    format: str | None = None


@dataclasses.dataclass(frozen=True)
class Scenario:
    """What :mod:`benchmarks.run_all` needs to run, save and plot one benchmark.

    ``name`` is the module's path under ``benchmarks`` (``forward.backends``) and names the
    results section. ``notes`` are caveats a reader must see beside the numbers (what was
    measured and how), never conclusions. ``plots`` name :data:`benchmarks.plots.PLOTS`
    entries drawn from the rows.
    """

    name: str
    title: str
    config: type
    run: Callable[[Any], list[dict]]
    columns: tuple[Column, ...]
    notes: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()


def _parser_for(hint: Any) -> tuple[Callable[[str], Any], bool]:
    """``(convert, is_flag)`` for a field's type: scalars, ``X | None``, ``tuple[X, ...]``."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = next(arg for arg in args if arg is not type(None))
        convert, is_flag = _parser_for(inner)
        return (lambda text: None if text.lower() == "none" else convert(text)), is_flag
    if typing.get_origin(hint) is tuple:
        item, _ = _parser_for(args[0])
        return (lambda text: tuple(item(part) for part in text.split(",") if part)), False
    if hint is bool:
        return bool, True
    if hint in (int, float, str, Path):
        return hint, False
    raise TypeError(f"config fields of type {hint!r} have no flag form")


def _flag(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _shown(value: Any) -> str:
    """A value as one would type it as a flag (tuples comma-separated)."""
    return ",".join(str(item) for item in value) if isinstance(value, tuple) else str(value)


def add_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """One flag per field of ``config``: ``--field-name``, typed from its annotation, with its
    help and its full-run default (tuples are given comma-separated)."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        convert, is_flag = _parser_for(hints[field.name])
        help_text = f"{field.metadata['help']} (default: {_shown(field.default)}".replace("%", "%%")
        if "quick" in field.metadata:
            help_text += f"; --quick: {_shown(field.metadata['quick'])}".replace("%", "%%")
        help_text += ")"
        if is_flag:
            parser.add_argument(_flag(field), dest=field.name, default=argparse.SUPPRESS,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(_flag(field), dest=field.name, default=argparse.SUPPRESS,
                                type=convert, metavar=field.name.upper(), help=help_text)


def config_from(namespace: argparse.Namespace, config: type, *, quick: bool) -> Any:
    """The config a command line asked for: defaults, then ``--quick`` values, then flags."""
    values = {}
    for field in dataclasses.fields(config):
        if field.name in vars(namespace):
            values[field.name] = getattr(namespace, field.name)
        elif quick and "quick" in field.metadata:
            values[field.name] = field.metadata["quick"]
    return config(**values)


@contextlib.contextmanager
def tritonservers(export: Path, work: Path, count: int = 1, **options: Any) -> Iterator[list]:
    """``count`` fresh tritonservers on loopback serving ``export``, their logs in ``work``:
    the one way a scenario starts a server, so every measurement starts from the same state."""
    from stemserve.model_repository.local import local_servers

    options.setdefault("start_timeout", 900)
    with local_servers(export, count, root=work, logs=work, **options) as servers:
        yield servers
