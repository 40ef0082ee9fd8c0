"""Build a TensorRT engine from an exported ONNX model, on a GPU host.

Runs NVIDIA's ``trtexec`` (shipped in the NGC TensorRT and Triton images) with fp16 and one
optimisation profile: batch 1..max_batch, time from the shortest segment a track can end with
up to the padded segment, tuned for full batches of full segments, which is what the dynamic
batcher sends. The engine is tied to the GPU and TensorRT version that built it, so it is
built where it is served and never committed.

    python -m stemserve.export.tensorrt build/export/demucs_quantized --max-batch 8
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from stemserve.errors import StemserveError
from stemserve.spec import ModelSpec

MIN_TAIL_SECONDS = 0.1


def profile_shapes(spec: ModelSpec, max_batch: int, opt_batch: int) -> dict[str, str]:
    """trtexec's min/opt/max shapes for the ``mix`` input."""
    shortest = spec.valid_length(max(1, int(MIN_TAIL_SECONDS * spec.sample_rate)))
    channels = spec.audio_channels
    name = spec.input_name
    return {
        "--minShapes": f"{name}:1x{channels}x{shortest}",
        "--optShapes": f"{name}:{opt_batch}x{channels}x{spec.padded_length}",
        "--maxShapes": f"{name}:{max_batch}x{channels}x{spec.padded_length}",
    }


def trtexec_command(export_dir: Path, engine: Path, *, max_batch: int = 8,
                    opt_batch: int | None = None, fp16: bool = True,
                    workspace_mib: int = 4096, trtexec: str = "trtexec") -> list[str]:
    """The trtexec command line that turns ``export_dir/model.onnx`` into ``engine``."""
    spec = ModelSpec.load(export_dir / "model.json")
    shapes = profile_shapes(spec, max_batch, opt_batch or max_batch)
    command = [trtexec, f"--onnx={export_dir / spec.onnx_file}", f"--saveEngine={engine}",
               f"--memPoolSize=workspace:{workspace_mib}M"]
    command += [f"{flag}={value}" for flag, value in shapes.items()]
    if fp16:
        command.append("--fp16")
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemserve.export.tensorrt",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="folder with model.onnx and model.json")
    parser.add_argument("-o", "--engine", type=Path, default=None,
                        help="engine path (default: <export_dir>/model.plan)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--opt-batch", type=int, default=None)
    parser.add_argument("--fp32", action="store_true", help="build without fp16 kernels")
    parser.add_argument("--workspace-mib", type=int, default=4096)
    parser.add_argument("--print", action="store_true", help="print the command, run nothing")
    args = parser.parse_args(argv)
    engine = args.engine or args.export_dir / "model.plan"
    command = trtexec_command(args.export_dir, engine, max_batch=args.max_batch,
                              opt_batch=args.opt_batch, fp16=not args.fp32,
                              workspace_mib=args.workspace_mib)
    print(" ".join(command))
    if args.print:
        return 0
    if shutil.which(command[0]) is None:
        raise StemserveError("trtexec not found: run this on a GPU host with TensorRT, e.g. "
                             "inside nvcr.io/nvidia/tensorrt or the Triton image")
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StemserveError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
