"""The int8 fast path: ONNX Runtime's dynamic quantization of an exported graph.

Weights of the recurrent and matrix-product layers are stored as int8 and their inputs are
quantized on the fly (``quantize_dynamic``): the LSTM becomes ``DynamicQuantizeLSTM`` and
``MatMul``/``Gemm`` become ``MatMulInteger``-based nodes. The convolutions stay fp32:
ONNX Runtime's ``ConvInteger`` is slower than its fp32 convolutions on CPUs. The result is
``model.int8.onnx`` with its sidecar ``model.int8.json`` (``precision: int8``) beside the
fp32 graph (one per model of a bag: :func:`quantize_export`); the stems change (this path is opt-in, ``--int8``), by an amount the quality
meter (``benchmarks/quality/``) reports as an SDR difference.

``reduce_range`` (7-bit weights) avoids the saturation of ``vpmaddubsw`` on x86 CPUs without
VNNI; with VNNI (``avx512_vnni``/``avx_vnni`` in /proc/cpuinfo) the full 8 bits are kept.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from stemserve.cpu import cpu_has_vnni
from stemserve.errors import ModelError
from stemserve.files import atomic_path
from stemserve.spec import ModelSpec, load_export, load_export_spec, sidecar_name

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
QUANTIZED_OPS = ("LSTM", "MatMul", "Gemm")
"""What is quantized: the recurrent layers and every matrix product (attention, linear)."""
LSTM_WEIGHTS = {1: "W", 2: "R"}
"""The LSTM inputs ``quantize_dynamic`` quantizes, by position: it needs them initializers."""
PREPROCESS_ADVICE = "pre-processing before quantization"
"""In ONNX Runtime's warning on every graph it quantizes that has not been through its
``quant_pre_process`` (shape inference and optimisations for static quantization's
calibration): nothing a stemserve user can act on."""
TMPDIR_HINT = "TMPDIR chooses the folder"
"""Where the temporary copies of a graph go, for the errors about them."""


@contextlib.contextmanager
def write_errors(folder: Path, what: str) -> Iterator[None]:
    """A write inside that fails (a full disk, a file size limit, permissions) as a
    :class:`ModelError` naming ``what`` and the reason, about ``folder``: not a traceback."""
    try:
        yield
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        raise ModelError(f"cannot write {what}: {reason}", where=str(folder)) from err


def quantize_int8(export_dir: Path, *, reduce_range: bool | None = None) -> ModelSpec:
    """Write the int8 graph and sidecar of the fp32 export in ``export_dir``; its spec.

    ``reduce_range`` None picks by the CPU this runs on (the CPU that serves should be the
    one that quantizes; the choice is recorded in the log). Every LSTM of the graph must
    come out quantized, or this fails: an LSTM whose weights are not initializers would
    silently stay fp32; LSTMs that share their weights get a copy each first
    (:func:`untie_lstm_weights`). ONNX Runtime's temporary copies of the graph go to a
    temporary folder, which is removed whatever happens.
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnxruntime.quantization import QuantType, quantize_dynamic

    export_dir = Path(export_dir)
    spec = load_export_spec(export_dir)
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    source = export_dir / spec.onnx_file
    model = onnx.load(str(source))
    untied = untie_lstm_weights(model.graph)
    lstms = [node for node in model.graph.node if node.op_type == "LSTM"]
    with tempfile.TemporaryDirectory(prefix="stemserve-int8-") as work:
        prepared = Path(work) / spec.onnx_file
        # The weights in a file of their own: ONNX's shape inference (C++, whose failed
        # writes are silent) then rewrites only the small graph, and the large writes are
        # Python's, which raise.
        with write_errors(Path(work), f"a temporary copy of the graph ({TMPDIR_HINT})"):
            onnx.save_model(model, str(prepared), save_as_external_data=True,
                            location=f"{spec.onnx_file}.data")
        with write_errors(export_dir, INT8_FILE), \
                atomic_path(export_dir / INT8_FILE) as target, _without_preprocess_advice():
            try:
                quantize_dynamic(str(prepared), str(target),
                                 op_types_to_quantize=list(QUANTIZED_OPS),
                                 weight_type=QuantType.QInt8, reduce_range=reduce_range,
                                 per_channel=False)
            except DecodeError:
                raise ModelError("ONNX Runtime could not read back the shape-inferred graph "
                                 "it wrote here: the write failed unreported (ONNX's shape "
                                 "inference does not check it), most likely for want of "
                                 f"space ({TMPDIR_HINT})", where=work) from None
            graph = onnx.load(str(target), load_external_data=False).graph
            left = [node.name for node in graph.node if node.op_type == "LSTM"]
            if left:
                raise ModelError(
                    f"{len(lstms) - len(left)} of the graph's {len(lstms)} LSTM layers were "
                    "quantized (their weights must be initializers); not quantized: "
                    + "; ".join(_weight_sources(model.graph, name) for name in left),
                    where=str(source))
    int8 = dataclasses.replace(spec, precision="int8", onnx_file=INT8_FILE)
    with write_errors(export_dir, sidecar_name("int8")):
        int8.save(export_dir / sidecar_name("int8"))
    logger.info("int8 graph: %d LSTM quantized (%d given their own copy of weights they "
                "shared), reduce_range=%s", len(lstms), untied, reduce_range)
    return int8


def quantize_export(export_dir: Path, *, reduce_range: bool | None = None) -> list[ModelSpec]:
    """:func:`quantize_int8` for every model of an export (a bag's members too)."""
    return [quantize_int8(folder, reduce_range=reduce_range)
            for folder, _ in load_export(export_dir).members]


def untie_lstm_weights(graph: onnx.GraphProto) -> int:
    """Give every LSTM its own copy of weights it shares with another LSTM; how many copies.

    A layer that runs twice (:class:`~stemserve.models.blocks.BLSTM` with ``max_steps``
    traces both its whole and its framed run) is two LSTM nodes on the same weights, and
    torch's exporter deduplicates the equal initializers: the second node takes
    ``Identity(first node's W)``. ``quantize_dynamic`` quantizes only initializers, and
    one that two LSTMs take comes out wrong for both (it transposes the quantized copy
    again for the second). Weights behind anything other than such a shared ``Identity``
    are left as they are, for the check that every LSTM was quantized.
    """
    import onnx

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    aliases = {node.output[0]: node.input[0] for node in graph.node
               if node.op_type == "Identity" and node.input[0] in initializers}
    lstms = [node for node in graph.node if node.op_type == "LSTM"]
    takers = collections.Counter(aliases.get(node.input[slot], node.input[slot])
                                 for node in lstms for slot in LSTM_WEIGHTS)
    names = set(initializers) | {tensor.name for tensor in graph.input} | {
        output for node in graph.node for output in node.output}
    taken: set[str] = set()
    bypassed: set[str] = set()
    copies = 0
    for node in lstms:
        for slot in LSTM_WEIGHTS:
            weights = aliases.get(node.input[slot], node.input[slot])
            if weights not in initializers or takers[weights] < 2:
                continue
            if node.input[slot] != weights:
                bypassed.add(node.input[slot])
            if weights in taken:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[weights])
                copy.name = _unused_name(f"{weights}_{node.name}", names)
                graph.initializer.append(copy)
                weights = copy.name
                copies += 1
            taken.add(weights)
            node.input[slot] = weights
    used = {name for node in graph.node for name in node.input} | {
        output.name for output in graph.output}
    for node in [node for node in graph.node
                 if node.op_type == "Identity" and node.output[0] in bypassed - used]:
        graph.node.remove(node)
    return copies


def _unused_name(name: str, names: set[str]) -> str:
    """``name``, or with a number appended, so that it is none of ``names`` (then added)."""
    candidate, number = name, 0
    while candidate in names:
        number += 1
        candidate = f"{name}_{number}"
    names.add(candidate)
    return candidate


def _weight_sources(graph: onnx.GraphProto, name: str) -> str:
    """Where LSTM ``name``'s W and R come from, when not from initializers: why
    ``quantize_dynamic`` left it in fp32."""
    initializers = {tensor.name for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    node = next(node for node in graph.node if node.name == name)
    sources = []
    for slot, weights in LSTM_WEIGHTS.items():
        tensor = node.input[slot]
        if tensor in initializers:
            continue
        producer = producers.get(tensor)
        sources.append(f"{weights} from {producer.op_type} node {producer.name!r}" if producer
                       else f"{weights} is the graph input {tensor!r}")
    return f"{name!r} ({', '.join(sources) or 'W and R not float tensors of 3 dimensions'})"


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    """A root-logger filter: whether ``record`` is anything but the advice."""
    return PREPROCESS_ADVICE not in record.getMessage()


@contextlib.contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """Drop ONNX Runtime's advice to pre-process the graph (:data:`PREPROCESS_ADVICE`),
    which it logs on the root logger (``logging.warning``) for every graph; kept when
    stemserve logs at DEBUG (``-v``)."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    root = logging.getLogger()
    root.addFilter(_drop_preprocess_advice)
    try:
        yield
    finally:
        root.removeFilter(_drop_preprocess_advice)
