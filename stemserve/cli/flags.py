"""Flags more than one sub-command takes: how a model is named, seconds, precisions."""
from __future__ import annotations

import argparse
import math

from stemserve.precision import PRECISIONS, Precision


INEXACT = "its stems differ slightly from demucs' (docs/performance.md gives the SDR)"


def _precision_help(name: Precision) -> str:
    info = PRECISIONS[name]
    extra = {Precision.BF16: ", the 'openvino' extra, slower than fp32 for Demucs v2 on CPUs "
                             "without AMX"}.get(name, "")
    return info.help + extra + ("" if info.exact else ", " + INEXACT)


def add_precision(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                  default: str | None, what: str,
                  aliases: tuple[Precision, ...] = (Precision.INT8, Precision.BF16)) -> None:
    """``--precision NAME`` and its documented aliases (``--int8``, ``--bf16``, ...), one of
    them: which graph of the export ``what`` (help text) uses."""
    choices = "; ".join(f"{name.value}: {_precision_help(name)}" for name in Precision)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--precision", choices=[name.value for name in Precision],
                       default=default, help=f"the graph {what}. {choices}")
    for name in aliases:
        group.add_argument(PRECISIONS[name].flag, dest="precision", action="store_const",
                           const=name.value, help=f"--precision {name.value}")


def add_precisions(parser: argparse.ArgumentParser) -> None:
    """``--precision NAME``, repeatable, and its aliases: the variants an export writes
    besides the fp32 graph."""
    names = [name for name in Precision if name is not Precision.FP32]
    parser.add_argument("--precision", dest="precisions", action="append", default=[],
                        choices=[name.value for name in names], metavar="NAME",
                        help="also write this variant (repeatable): " + "; ".join(
                            f"{name.value}: {_precision_help(name)}" for name in names))
    for name in names:
        parser.add_argument(PRECISIONS[name].flag, dest="precisions", action="append_const",
                            const=name.value, help=f"--precision {name.value}")


def seconds(text: str) -> float:
    """A number of seconds above 0 for a flag (argparse names the flag when it refuses)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def add_model(parser: argparse.ArgumentParser, default: str | None, help_text: str) -> None:
    """``-n/--model`` and ``--config``: the one way every command names a model."""
    parser.add_argument("-n", "--model", default=default, help=help_text)
    parser.add_argument("--config", default=None, metavar="RELEASE|YAML",
                        help="for a RoFormer checkpoint given with -n, its training config.yaml "
                             "(default: <checkpoint>.yaml beside it); for a plain Demucs "
                             "state dict, the release whose configuration it has (e.g. "
                             "demucs48_hq; default: demucs)")
