"""The int8 fast path: ONNX Runtime's dynamic quantization of an exported graph.

Weights of the recurrent and matrix-product layers are stored as int8 and their inputs are
quantized on the fly (``quantize_dynamic``): the LSTM becomes ``DynamicQuantizeLSTM`` and
``MatMul``/``Gemm`` become ``MatMulInteger``-based nodes. The convolutions stay fp32:
ONNX Runtime's ``ConvInteger`` is slower than its fp32 convolutions on CPUs. The result is
``model.int8.onnx`` with its sidecar ``model.int8.json`` (``precision: int8``) beside the
fp32 graph (one per model of a bag: :func:`quantize_export`); the stems change (this path is opt-in, ``--int8``), by an amount the quality
meter (``benchmarks/quality.py``) reports as an SDR difference.

``reduce_range`` (7-bit weights) avoids the saturation of ``vpmaddubsw`` on x86 CPUs without
VNNI; with VNNI (``avx512_vnni``/``avx_vnni`` in /proc/cpuinfo) the full 8 bits are kept.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from stemserve.errors import ModelError
from stemserve.files import atomic_path
from stemserve.spec import PRECISION_SIDECARS, ModelSpec, load_export, load_export_spec

logger = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
QUANTIZED_OPS = ("LSTM", "MatMul", "Gemm")
"""What is quantized: the recurrent layers and every matrix product (attention, linear)."""


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has int8 dot-product instructions (VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize_int8(export_dir: Path, *, reduce_range: bool | None = None) -> ModelSpec:
    """Write the int8 graph and sidecar of the fp32 export in ``export_dir``; its spec.

    ``reduce_range`` None picks by the CPU this runs on (the CPU that serves should be the
    one that quantizes; the choice is recorded in the log). Every LSTM of the graph must
    come out quantized, or this fails: an LSTM whose weights are not initializers would
    silently stay fp32.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    export_dir = Path(export_dir)
    spec = load_export_spec(export_dir)
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    source = export_dir / spec.onnx_file
    lstms = sum(node.op_type == "LSTM"
                for node in onnx.load(str(source), load_external_data=False).graph.node)
    with atomic_path(export_dir / INT8_FILE) as target:
        quantize_dynamic(str(source), str(target), op_types_to_quantize=list(QUANTIZED_OPS),
                         weight_type=QuantType.QInt8, reduce_range=reduce_range,
                         per_channel=False)
        graph = onnx.load(str(target), load_external_data=False).graph
        quantized = sum(node.op_type == "DynamicQuantizeLSTM" for node in graph.node)
        if quantized != lstms:
            raise ModelError(f"{quantized} of the graph's {lstms} LSTM layers were quantized "
                             "(their weights must be initializers)", where=str(source))
    int8 = dataclasses.replace(spec, precision="int8", onnx_file=INT8_FILE)
    int8.save(export_dir / PRECISION_SIDECARS["int8"])
    logger.info("int8 graph: %d LSTM quantized, reduce_range=%s", quantized, reduce_range)
    return int8


def quantize_export(export_dir: Path, *, reduce_range: bool | None = None) -> list[ModelSpec]:
    """:func:`quantize_int8` for every model of an export (a bag's members too)."""
    return [quantize_int8(folder, reduce_range=reduce_range)
            for folder, _ in load_export(export_dir).members]
