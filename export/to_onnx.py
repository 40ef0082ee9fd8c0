"""Export a Demucs network (any generation) or a bag of them to ONNX, with sidecars.

A graph maps ``mix`` [batch, channels, time] to ``stems`` [batch, sources, channels, time'].
The batch axis is always dynamic. The time axis depends on the family (the sidecar's
``family``, :data:`stemserve.spec.FAMILIES`):

- Demucs v2 and the v3 waveform model take any valid length: the batched hot path sends
  ``padded_length`` samples (one segment plus real context) and a track's last, shorter
  segment goes at its own valid length, which keeps served output equal to demucs'
  ``apply_model``. v2 returns fewer samples; the caller center-trims, as ``apply_model``.
- Hybrid Demucs takes any length (the last segment of a track is as short as the track's
  end): its STFT, iSTFT and every length computation are inside the graph
  (:class:`~stemserve.export.exportable.HybridGraphSTFT`).
- HT Demucs takes exactly its training segment (343,980 samples for the releases): the
  time axis is fixed, so every request batches with every other.

A bag (``htdemucs_ft``, ``mdx``, ...) is one folder per member, each a graph with its
sidecar, and ``bag.json`` with the per-source weights, written last.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import onnx
import torch
from torch import nn

from stemserve.defaults import TRITON_MODEL
from stemserve.errors import ModelError
from stemserve.export.attention import fuse_attention
from stemserve.export.quantize import write_errors
from stemserve.files import atomic_path
from stemserve.models.families import family_of, forward_randrange, segment_samples
from stemserve.models.registry import of_model
from stemserve.spec import (BAG_FILE, MAX_SEGMENT_SECONDS, MIN_SEGMENT_SECONDS, PRECISION_NAMES,
                            SIDECAR_FILE, BagSpec, ModelSpec, family_rule, sidecar_name)
from stemserve.untrusted import safe_name

if TYPE_CHECKING:
    from stemserve.checkpoints import Bag, CheckpointInfo

logger = logging.getLogger(__name__)

OPSET = 17
TRACE_LENGTH = 4096
"""Length traced for networks with a dynamic time axis: short is cheap, and the parity
tests check other lengths."""


def build_spec(model: nn.Module, info: CheckpointInfo, segment_length: int,
               precision: str = "fp32", onnx_file: str = "model.onnx",
               model_name: str = TRITON_MODEL) -> ModelSpec:
    """The sidecar for ``model`` served with segments of ``segment_length`` samples."""
    return ModelSpec.for_model(model, checkpoint=safe_name(info.name),
                               checkpoint_sha256=info.sha256,
                               segment_length=segment_length, model_name=model_name,
                               family=family_of(model), forward_randrange=forward_randrange(model),
                               precision=precision, onnx_file=onnx_file)


def graph_module(model: nn.Module, segment_length: int, portable: bool = False) -> nn.Module:
    """What is traced for ``model`` served on segments of ``segment_length`` samples: the
    network itself, or what its family's registration names (for the hybrid models and the
    RoFormers, the network with its STFTs as real products: the complex ``torch.stft``
    does not export); unless ``portable``, with ONNX Runtime's fused attention
    (:mod:`stemserve.export.attention`), which TensorRT's parser does not read."""
    graph = of_model(model).graph
    module = model
    if graph is not None:
        factory, _, name = graph.partition(":")
        module = getattr(importlib.import_module(factory), name)(model, segment_length).eval()
    return module if portable else fuse_attention(module)


class HalfPrecision(nn.Module):
    """Run ``model`` in fp16 behind fp32 inputs and outputs.

    Clients send the same fp32 tensors to either variant; only the weights and compute halve.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        return self.model(mix.half()).float()


def export_onnx(model: nn.Module, info: CheckpointInfo, out_dir: Path, *,
                segment_length: int | None = None, fp16: bool = False, opset: int = OPSET,
                model_name: str = TRITON_MODEL, portable: bool = False) -> ModelSpec:
    """Write ``model.onnx`` and ``model.json`` (and ``model.fp16.*`` if asked) into ``out_dir``;
    ``portable``: in standard ONNX operators only (:func:`graph_module`).

    ``segment_length`` defaults to what demucs splits by (the model's segment, which a
    bag's override has already set). Returns the fp32 spec. The other precisions' graphs of
    an earlier export in ``out_dir`` are removed: they belong to the model exported before.
    """
    registration = of_model(model)
    if fp16 and "fp16" in registration.unsupported:
        raise ModelError(f"no fp16 graph of {family_rule(registration.name).title}: "
                         f"{registration.unsupported['fp16']}")
    model = model.eval()
    segment_length = int(segment_length or segment_samples(model))
    check_segment(model, info, segment_length)
    out_dir = Path(out_dir)
    with write_errors(out_dir, "the export folder"):
        out_dir.mkdir(parents=True, exist_ok=True)
        for precision in PRECISION_NAMES:
            if precision != "fp32":
                sidecar = sidecar_name(precision)
                (out_dir / sidecar).unlink(missing_ok=True)
                (out_dir / Path(sidecar).with_suffix(".onnx")).unlink(missing_ok=True)
    spec = build_spec(model, info, segment_length, model_name=model_name)
    module = graph_module(model, segment_length, portable)
    _export_graph(module, spec, out_dir, opset)
    if fp16:
        half = build_spec(model, info, segment_length, precision="fp16",
                          onnx_file="model.fp16.onnx", model_name=model_name)
        _export_graph(HalfPrecision(module), half, out_dir, opset)
    return spec


def check_segment(model: nn.Module, info: CheckpointInfo, segment_length: int) -> None:
    """Refuse a segment outside :data:`~stemserve.spec.MIN_SEGMENT_SECONDS` to
    :data:`~stemserve.spec.MAX_SEGMENT_SECONDS`, or for HT Demucs longer than its training
    segment, as demucs 4 does (``HTDemucs.valid_length`` raises for a longer input, and
    ``separate`` refuses ``--segment`` over ``float(model.segment)``)."""
    rate = int(model.samplerate)
    shortest, longest = MIN_SEGMENT_SECONDS * rate, MAX_SEGMENT_SECONDS * rate
    limit = f"{MAX_SEGMENT_SECONDS} s"
    family = family_rule(family_of(model))
    if family.lengths == "fixed" and segment_samples(model) < longest:
        longest = segment_samples(model)
        limit = f"{family.title}' training segment, {segment_samples(model) / rate:g} s"
    if not shortest <= segment_length <= longest:
        raise ModelError(f"a segment of {segment_length} samples ({segment_length / rate:g} s) "
                         f"is out of range: {shortest} to {longest} samples "
                         f"({MIN_SEGMENT_SECONDS} s to {limit} at {rate} Hz)", where=info.name)


def member_name(index: int) -> str:
    """A bag member's folder in the export and its model name on a server."""
    return f"{TRITON_MODEL}_{index}"


def export_bag(bag: Bag, out_dir: Path, *, segment_length: int | None = None,
               fp16: bool = False, opset: int = OPSET, on_member=None,
               portable: bool = False) -> list[ModelSpec]:
    """Export every model of ``bag`` into ``out_dir``; a bag of one with unit weights is a
    plain single-model export. Returns the members' fp32 specs. ``portable``: as
    :func:`export_onnx`'s.

    ``on_member(index, count, info)`` is called before each member (for progress). Any
    earlier export in ``out_dir`` is replaced: its ``bag.json`` or ``model.json`` goes
    first, so a reader never sees a mix of two exports.
    """
    segments = [segment_length or segment_samples(model, bag.segment) for model in bag.models]
    for model, info, segment in zip(bag.models, bag.infos, segments):
        check_segment(model, info, segment)  # before an earlier export goes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BAG_FILE).unlink(missing_ok=True)
    (out_dir / SIDECAR_FILE).unlink(missing_ok=True)
    unit = all(weight == 1 for row in bag.weights for weight in row)
    if len(bag.models) == 1 and unit:
        if on_member:
            on_member(0, 1, bag.infos[0])
        return [export_onnx(bag.models[0], bag.infos[0], out_dir, fp16=fp16, opset=opset,
                            segment_length=segments[0], portable=portable)]
    # A model the bag lists twice (repro_mdx_a_hybrid_only) is one object, exported once.
    first = {id(model): index for index, model in reversed(list(enumerate(bag.models)))}
    exported: dict[int, ModelSpec] = {}
    for index, (model, info) in enumerate(zip(bag.models, bag.infos)):
        if first[id(model)] != index:
            continue
        if on_member:
            on_member(len(exported), len(first), info)
        folder = out_dir / member_name(index)
        shutil.rmtree(folder, ignore_errors=True)
        exported[index] = export_onnx(model, info, folder, fp16=fp16, opset=opset,
                                      segment_length=segments[index],
                                      model_name=member_name(index), portable=portable)
    members = [first[id(model)] for model in bag.models]
    BagSpec(safe_name(bag.name), tuple(member_name(index) for index in members),
            tuple(tuple(float(w) for w in row) for row in bag.weights),
            None if bag.segment is None else float(bag.segment)).save(out_dir / BAG_FILE)
    return [exported[index] for index in members]


def _export_graph(module: nn.Module, spec: ModelSpec, out_dir: Path, opset: int) -> None:
    """Trace ``module`` to ``out_dir/spec.onnx_file`` and write its sidecar beside it.

    The graph goes to a temporary name and is renamed, then the sidecar is written the same
    way, so an interrupted export never leaves a pair that looks complete.
    """
    onnx_path = out_dir / spec.onnx_file
    # With a dynamic time axis, a short example traces the same graph at a fraction of the
    # cost (tracing runs one forward pass; fp16 on a CPU is slow).
    fixed = spec.fixed_length
    example = torch.randn(1, spec.audio_channels, fixed or spec.valid_length(TRACE_LENGTH),
                          generator=torch.Generator().manual_seed(0))
    time_axes = ({} if fixed else {"mix": {2: "time"}, "stems": {3: "out_time"}})
    sidecar = out_dir / Path(spec.onnx_file).with_suffix(".json").name
    start = time.perf_counter()
    with write_errors(out_dir, spec.onnx_file), atomic_path(onnx_path) as graph, \
            warnings.catch_warnings(), torch.no_grad(), _attention_fast_path(False):
        # The tracer warns about Python ints and bools taken from shapes; the models keep
        # every length computation that varies as shape ops, which the parity tests at
        # other lengths check.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(graph),
            input_names=[spec.input_name], output_names=[spec.output_name],
            dynamic_axes={spec.input_name: {0: "batch", **time_axes.get("mix", {})},
                          spec.output_name: {0: "batch", **time_axes.get("stems", {})}},
            opset_version=opset, dynamo=False)
        _fix_output_dims(graph, spec)
        onnx.checker.check_model(str(graph))
    with write_errors(out_dir, sidecar.name):
        spec.save(sidecar)  # last: complete
    logger.debug("exported %s in %.1f s", onnx_path, time.perf_counter() - start)


@contextlib.contextmanager
def _attention_fast_path(enabled: bool) -> Iterator[None]:
    """Switch ``nn.MultiheadAttention``'s fused inference kernel (HTDemucs' transformer
    takes it under ``no_grad``) on or off: the fused operator has no ONNX export."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


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


def onnx_parity(model: nn.Module, onnx_path: Path, spec: ModelSpec, batch_sizes=(1, 3),
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
