"""Export a Demucs v2 model to ONNX with its sidecar.

The graph is the network itself: ``mix`` [batch, channels, time] -> ``stems``
[batch, sources, channels, time']. Batch and time are both dynamic axes: the batched hot path
always sends ``padded_length`` samples (one segment plus real context), and the last, shorter
segment of a track is sent at its own valid length, which is what keeps served output equal
to demucs' ``apply_model``. The caller center-trims, as ``apply_model`` does.
"""
from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from stemserve.defaults import TRITON_MODEL
from stemserve.files import atomic_path
from stemserve.model import Demucs
from stemserve.spec import ModelSpec

if TYPE_CHECKING:
    from stemserve.checkpoints import CheckpointInfo

logger = logging.getLogger(__name__)

OPSET = 17
TRACE_LENGTH = 4096


def build_spec(model: Demucs, info: CheckpointInfo, segment_length: int,
               precision: str = "fp32", onnx_file: str = "model.onnx") -> ModelSpec:
    """The sidecar for ``model`` served with segments of ``segment_length`` samples."""
    return ModelSpec.for_model(model, checkpoint=info.name, checkpoint_sha256=info.sha256,
                               segment_length=segment_length, model_name=TRITON_MODEL,
                               precision=precision, onnx_file=onnx_file)


class HalfPrecision(nn.Module):
    """Run ``model`` in fp16 behind fp32 inputs and outputs.

    Clients send the same fp32 tensors to either variant; only the weights and compute halve.
    """

    def __init__(self, model: Demucs):
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return self.model(mix.half()).float()


def export_onnx(model: Demucs, info: CheckpointInfo, out_dir: Path, *,
                segment_length: int | None = None, fp16: bool = False,
                opset: int = OPSET) -> ModelSpec:
    """Write ``model.onnx`` and ``model.json`` (and ``model.fp16.*`` if asked) into ``out_dir``.

    Returns the fp32 spec.
    """
    model = model.eval()
    segment_length = int(segment_length or model.segment_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = build_spec(model, info, segment_length)
    _export_graph(model, spec, out_dir, opset)
    if fp16:
        half = build_spec(model, info, segment_length, precision="fp16",
                          onnx_file="model.fp16.onnx")
        _export_graph(HalfPrecision(model), half, out_dir, opset)
    return spec


def _export_graph(module: nn.Module, spec: ModelSpec, out_dir: Path, opset: int) -> None:
    """Trace ``module`` to ``out_dir/spec.onnx_file`` and write its sidecar beside it.

    The graph goes to a temporary name and is renamed, then the sidecar is written the same
    way, so an interrupted export never leaves a pair that looks complete.
    """
    onnx_path = out_dir / spec.onnx_file
    # Both axes are dynamic, so a short example traces the same graph at a fraction of the
    # cost (tracing runs one forward pass; fp16 on a CPU is slow).
    example = torch.zeros(1, spec.audio_channels, spec.valid_length(TRACE_LENGTH))
    start = time.perf_counter()
    with atomic_path(onnx_path) as graph, warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about Python ints taken from shapes in julius and center_trim;
        # they are exported as shape ops, which the parity tests at other lengths check.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(graph),
            input_names=[spec.input_name], output_names=[spec.output_name],
            dynamic_axes={spec.input_name: {0: "batch", 2: "time"},
                          spec.output_name: {0: "batch", 3: "out_time"}},
            opset_version=opset, dynamo=False)
        _fix_output_dims(graph, spec)
        onnx.checker.check_model(str(graph))
    spec.save(out_dir / Path(spec.onnx_file).with_suffix(".json").name)
    logger.debug("exported %s in %.1f s", onnx_path, time.perf_counter() - start)


def _fix_output_dims(path: Path, spec: ModelSpec) -> None:
    """State the sources and channels axes of ``stems`` as numbers, not symbols.

    The tracer names them symbolically; serving configs and TensorRT read them as fixed.
    """
    graph = onnx.load(str(path))
    dims = graph.graph.output[0].type.tensor_type.shape.dim
    for axis, size in ((1, len(spec.sources)), (2, spec.audio_channels)):
        dims[axis].Clear()
        dims[axis].dim_value = size
    onnx.save(graph, str(path))


def onnx_parity(model: Demucs, onnx_path: Path, spec: ModelSpec, batch_sizes=(1, 3),
                seed: int = 0, progress: bool = False) -> dict[int, float]:
    """Max abs error between PyTorch and ONNX Runtime on random input, per batch size.

    Each batch is one full padded segment through both; for the full model that is about
    a minute in all, so ``progress`` shows a bar over the runs.
    """
    import onnxruntime as ort
    import tqdm

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    with tqdm.tqdm(total=2 * len(batch_sizes), desc="parity check", unit="run",
                   disable=not progress) as bar:
        for batch in batch_sizes:
            mix = torch.randn(batch, spec.audio_channels, spec.padded_length,
                              generator=generator)
            bar.set_postfix_str(f"PyTorch, batch {batch}")
            with torch.no_grad():
                expected = model(mix).numpy()
            bar.update()
            bar.set_postfix_str(f"ONNX Runtime, batch {batch}")
            got = session.run([spec.output_name], {spec.input_name: mix.numpy()})[0]
            bar.update()
            errors[batch] = float(np.abs(expected - got).max())
    return errors
