"""The numeric precisions of an export, one row each: the one place that says what a
precision is, what runs it, where, and which command makes and serves it.

A precision names a graph of an export (its sidecar), never a way of running PyTorch: the
PyTorch backend's autocast is an argument of its own. Every command takes
``--precision NAME`` (``--fp16``, ``--int8`` and ``--bf16`` are aliases), and every place
that must refuse a combination asks :func:`check_precision`. Adding a precision is a row
in :data:`PRECISIONS`, the code that makes its variant (``make`` names it), the runtime
that runs it, and its Triton template if it has one; see
docs/architecture.md, "Adding a precision".
"""
from __future__ import annotations

import dataclasses
import enum

from stemserve.errors import StemserveError


class Precision(str, enum.Enum):
    """A graph of an export; its value is the name on the command line and in sidecars."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    BF16 = "bf16"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class PrecisionRow:
    """What one :class:`Precision` is.

    ``sidecar``: its sidecar file in an export folder; ``runtime``: what runs its graph
    (its name in messages); ``device``: ``any``, ``cpu`` or ``gpu``; ``variants``: the Triton
    repository variants that may carry it (``gpu-trt`` builds its own engine from the fp32
    graph, its precision chosen there); ``backends``: the ``open_backend`` kinds that run
    it; ``make``: how its variant is made from a model (``export``: written by the export
    itself) or from the fp32 export (``quantize``, ``sidecar``); ``flag``: its alias on the
    command line; ``exact``: whether its stems are demucs' own (to float32 rounding);
    ``help``: what it is, in a few words.
    """

    sidecar: str
    runtime: str
    device: str
    variants: tuple[str, ...]
    backends: tuple[str, ...]
    make: str
    flag: str | None
    exact: bool
    help: str


PRECISIONS: dict[Precision, PrecisionRow] = {
    Precision.FP32: PrecisionRow(
        "model.json", "ONNX Runtime", "any", ("cpu", "gpu", "gpu-trt"),
        ("onnx", "triton", "triton-stream", "torch"), "export", None, True,
        "the exact graph, demucs' own stems"),
    Precision.FP16: PrecisionRow(
        "model.fp16.json", "ONNX Runtime", "gpu", ("cpu", "gpu"), ("onnx", "triton", "triton-stream"),
        "export", "--fp16", False, "the half-precision graph, for GPUs (ONNX Runtime's CPU "
        "kernels run it too, slowly)"),
    Precision.INT8: PrecisionRow(
        "model.int8.json", "ONNX Runtime", "cpu", ("cpu",), ("onnx", "triton", "triton-stream"), "quantize",
        "--int8", False,
        "the int8 graph (dynamic quantization of the LSTM and matrix products), a CPU fast "
        "path"),
    Precision.BF16: PrecisionRow(
        "model.bf16.json", "OpenVINO", "cpu", ("cpu",), ("onnx", "triton", "triton-stream"), "sidecar",
        "--bf16", False,
        "the fp32 graph run by OpenVINO with bf16 arithmetic on a CPU with AMX or "
        "AVX512_BF16, the other CPU fast path"),
}
"""Every precision's row; :class:`Precision` and this table have the same members."""


def precision_of(name: str | Precision) -> Precision:
    """``name`` as a :class:`Precision`, refusing any other name."""
    try:
        return Precision(name)
    except ValueError:
        raise StemserveError(f"precision must be one of {', '.join(p.value for p in Precision)}"
                             f", not {name!r}") from None


def row(precision: str | Precision) -> PrecisionRow:
    """The row of ``precision``."""
    return PRECISIONS[precision_of(precision)]


def asked_as(precision: str | Precision) -> str:
    """How a user asks for ``precision`` on the command line: its alias, else
    ``--precision NAME``."""
    name = precision_of(precision)
    return PRECISIONS[name].flag or f"--precision {name.value}"


def check_precision(precision: str | Precision, *, variant: str | None = None,
                    backend: str | None = None, gpu: bool = False, tensorrt: bool = False,
                    error: type[StemserveError] = StemserveError) -> Precision:
    """``precision`` as a :class:`Precision`, or ``error`` saying why it cannot run there: on
    a repository ``variant``, an ``open_backend`` kind ``backend``, a GPU server (``gpu``)
    or beside a TensorRT engine (``tensorrt``)."""
    name = precision_of(precision)
    info = PRECISIONS[name]
    flag = asked_as(name)
    if (tensorrt or gpu) and info.device == "cpu":
        raise error(f"{flag} is a CPU fast path; TensorRT builds its own engine from the fp32 "
                    "graph" if tensorrt else f"{flag} is a CPU fast path: drop --gpu")
    if backend is not None and backend not in info.backends:
        *others, last = info.backends
        raise error(f"the {name.value} graph runs on {info.runtime}: {flag} takes --backend "
                    f"{', '.join(others)} or {last}, not {backend}")
    if variant == "gpu-trt" and name is not Precision.FP32:
        raise error("gpu-trt serves the engine `stemserve export --tensorrt` built (its "
                    "precision is chosen there): leave precision out")
    if variant is not None and variant not in info.variants:
        raise error(f"the {name.value} variant runs on {info.runtime}'s "
                    f"{info.device.upper()} kernels: fill the "
                    f"{' or '.join(info.variants)} variant with it")
    return name
