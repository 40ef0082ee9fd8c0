"""Export a Demucs v2 model to ONNX with its sidecar.

The graph is the network itself: ``mix`` [batch, channels, time] -> ``stems``
[batch, sources, channels, time']. Batch and time are both dynamic axes: the batched hot path
always sends ``padded_length`` samples (one segment plus real context), and the last, shorter
segment of a track is sent at its own valid length, which is what keeps served output equal
to demucs' ``apply_model``. The caller center-trims, as ``apply_model`` does.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from stemserve.checkpoints import CheckpointInfo
from stemserve.model import Demucs
from stemserve.spec import ModelSpec, output_length

logger = logging.getLogger(__name__)

OPSET = 17
MODEL_NAME = "demucs"


def build_spec(model: Demucs, info: CheckpointInfo, segment_length: int,
               precision: str = "fp32", onnx_file: str = "model.onnx") -> ModelSpec:
    """The sidecar for ``model`` served with segments of ``segment_length`` samples."""
    padded = model.valid_length(segment_length)
    return ModelSpec(
        model_name=MODEL_NAME,
        checkpoint=info.name,
        checkpoint_sha256=info.sha256,
        sample_rate=model.samplerate,
        audio_channels=model.audio_channels,
        sources=tuple(model.sources),
        segment_length=segment_length,
        padded_length=padded,
        output_length=output_length(padded, **model.valid_length_params),
        valid_length_params=model.valid_length_params,
        precision=precision,
        onnx_file=onnx_file,
    )


def export_onnx(model: Demucs, info: CheckpointInfo, out_dir: Path, *,
                segment_length: int | None = None, fp16: bool = False,
                opset: int = OPSET) -> ModelSpec:
    """Write ``model.onnx`` and ``model.json`` (and the fp16 pair) into ``out_dir``.

    Files are written under temporary names and renamed at the end, so an interrupted export
    never leaves a model that looks complete. Returns the fp32 spec.
    """
    model = model.eval()
    segment_length = int(segment_length or model.segment_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = build_spec(model, info, segment_length)
    example = torch.zeros(1, model.audio_channels, spec.padded_length)

    onnx_path = out_dir / spec.onnx_file
    start = time.perf_counter()
    tmp = onnx_path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about Python ints taken from shapes in julius and center_trim;
        # those are exported as shape ops and checked by the parity tests.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(tmp),
            input_names=[spec.input_name], output_names=[spec.output_name],
            dynamic_axes={spec.input_name: {0: "batch", 2: "time"},
                          spec.output_name: {0: "batch", 3: "out_time"}},
            opset_version=opset, dynamo=False)
    onnx.checker.check_model(str(tmp))
    _commit(tmp, onnx_path, spec, out_dir / "model.json")
    logger.info("exported %s in %.1f s", onnx_path, time.perf_counter() - start)

    if fp16:
        half = build_spec(model, info, segment_length, precision="fp16",
                          onnx_file="model.fp16.onnx")
        to_fp16(onnx_path, out_dir / half.onnx_file, half, out_dir / "model.fp16.json")
    return spec


def to_fp16(src: Path, dst: Path, spec: ModelSpec, sidecar: Path) -> None:
    """Convert weights and compute to fp16, keeping fp32 inputs and outputs.

    Inputs and outputs stay fp32 so that clients send the same tensors to either variant.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    tmp = dst.with_suffix(".onnx.tmp")
    onnx.save(half, str(tmp))
    onnx.checker.check_model(str(tmp))
    _commit(tmp, dst, spec, sidecar)


def _commit(tmp: Path, dst: Path, spec: ModelSpec, sidecar: Path) -> None:
    """Rename the finished graph into place, then write its sidecar (the sidecar last)."""
    os.replace(tmp, dst)
    sidecar_tmp = sidecar.with_suffix(".json.tmp")
    spec.save(sidecar_tmp)
    os.replace(sidecar_tmp, sidecar)


def onnx_parity(model: Demucs, onnx_path: Path, spec: ModelSpec, batch_sizes=(1, 3),
                seed: int = 0) -> dict[int, float]:
    """Max abs error between PyTorch and ONNX Runtime on random input, per batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    errors = {}
    for batch in batch_sizes:
        mix = torch.randn(batch, spec.audio_channels, spec.padded_length, generator=generator)
        with torch.no_grad():
            expected = model(mix).numpy()
        got = session.run([spec.output_name], {spec.input_name: mix.numpy()})[0]
        errors[batch] = float(np.abs(expected - got).max())
    return errors
