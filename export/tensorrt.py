"""Build a TensorRT engine from an exported ONNX model, on a GPU host.

Runs NVIDIA's ``trtexec`` (shipped in the NGC TensorRT and Triton images) with fp16 and one
optimisation profile taken from the export's shape contract
(:meth:`~stemserve.spec.ModelSpec.tensorrt_profile`): the shortest request a track can end
with at batch 1, full segments at full batches (what the dynamic batcher sends), the longest
request at the largest batch. The engine is tied to the GPU and TensorRT version that built
it, so it is built where it is served and never committed.

    stemserve export -n demucs_quantized --tensorrt --max-batch 8

TensorRT's ONNX parser reads standard operators only: the engine is built from a portable
export (``stemserve export --portable``, what ``--tensorrt`` makes), without the fused
``com.microsoft`` attention the RoFormers' graphs have otherwise
(:mod:`stemserve.export.attention`).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from stemserve.errors import ModelError
from stemserve.spec import load_export_spec

PLAN_FILE = "model.plan"
"""The engine's name in an export folder, where the ``gpu-trt`` repository looks for it."""


def onnx_runtime_domains(export_dir: Path) -> set[str]:
    """The operator domains of ``export_dir``'s graph that only ONNX Runtime (and OpenVINO)
    read: empty for a portable graph."""
    import onnx

    spec = load_export_spec(export_dir)
    graph = onnx.load(str(Path(export_dir) / spec.onnx_file), load_external_data=False)
    return {entry.domain for entry in graph.opset_import} - {"", "ai.onnx"}


def trtexec_command(export_dir: Path, engine: Path | None = None, *, max_batch: int = 8,
                    opt_batch: int | None = None, fp16: bool = True,
                    workspace_mib: int = 4096, trtexec: str = "trtexec") -> list[str]:
    """The trtexec command line that turns ``export_dir``'s graph into ``engine`` (default:
    ``export_dir/model.plan``)."""
    spec = load_export_spec(export_dir)
    if domains := onnx_runtime_domains(export_dir):
        raise ModelError(f"{export_dir}: the graph has ONNX Runtime's operators "
                         f"({', '.join(sorted(domains))}), which TensorRT does not read: "
                         "export it again with --portable")
    engine = engine or Path(export_dir) / PLAN_FILE
    command = [trtexec, f"--onnx={Path(export_dir) / spec.onnx_file}", f"--saveEngine={engine}",
               f"--memPoolSize=workspace:{workspace_mib}M"]
    command += [f"--{bound}Shapes={spec.input_name}:{shape}"
                for bound, shape in spec.tensorrt_profile(max_batch, opt_batch).items()]
    if fp16:
        command.append("--fp16")
    return command


def build_engine(command: list[str]) -> None:
    """Run a :func:`trtexec_command`; a missing trtexec or a failed build is a clear error."""
    if shutil.which(command[0]) is None:
        raise ModelError("trtexec not found: build the engine on a GPU host with TensorRT, "
                         "e.g. inside nvcr.io/nvidia/tensorrt or the Triton image")
    result = subprocess.run(command, check=False)
    if result.returncode:
        raise ModelError(f"trtexec failed with code {result.returncode} (its output is above)")
