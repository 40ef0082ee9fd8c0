"""``stemserve export``: a model to ONNX with its sidecar (and its TensorRT engine on a GPU
host)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stemserve.cli.flags import add_model, add_precisions, seconds
from stemserve.defaults import DEFAULT_MODEL
from stemserve.precision import check_precision


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a Demucs model to ONNX with its sidecar "
                                           "(and build a TensorRT engine on a GPU host)")
    add_model(parser, DEFAULT_MODEL, "release name or checkpoint path (default: %(default)s)")
    parser.add_argument("--segment", type=seconds, default=None,
                        help="segment length in seconds (default: the model's training "
                             "segment, what demucs' apply_model splits by)")
    add_precisions(parser)
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output folder (default: <cache>/export/<model>, where every "
                             "command looks for it; the cache is $STEMSERVE_CACHE or "
                             "~/.cache/stemserve)")
    parser.add_argument("--portable", action="store_true",
                        help="standard ONNX operators only, for runtimes other than ONNX "
                             "Runtime and OpenVINO (--tensorrt implies it); otherwise a "
                             "RoFormer's attention uses ONNX Runtime's fused operators")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the PyTorch vs ONNX Runtime parity check")
    tensorrt = parser.add_argument_group(
        "TensorRT", "build model.plan for the gpu-trt repository with trtexec (on the GPU "
                    "host that serves it), from the export (made first if need be)")
    tensorrt.add_argument("--tensorrt", action="store_true", help="build the engine")
    tensorrt.add_argument("--max-batch", type=int, default=8,
                          help="largest batch of the engine (default: %(default)s)")
    tensorrt.add_argument("--opt-batch", type=int, default=None,
                          help="batch the engine is tuned for (default: --max-batch)")
    tensorrt.add_argument("--fp32", action="store_true", help="no fp16 kernels")
    tensorrt.add_argument("--workspace-mib", type=int, default=4096)
    tensorrt.add_argument("--print", action="store_true",
                          help="print the trtexec command, run nothing")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stemserve.spec import is_export, load_export

    out = args.out
    if out is None or not is_export(out) or not args.tensorrt:
        out = _export_onnx(args)
    if args.tensorrt:
        from stemserve.export.tensorrt import build_engine, trtexec_command

        for folder, _ in load_export(out).members:  # one engine per model of a bag
            command = trtexec_command(folder, max_batch=args.max_batch,
                                      opt_batch=args.opt_batch, fp16=not args.fp32,
                                      workspace_mib=args.workspace_mib)
            print(" ".join(command))
            if not args.print:
                build_engine(command)
    return 0


def _export_onnx(args: argparse.Namespace) -> Path:
    """Export ``args.model`` (every model of a bag) to ONNX, unless ``--tensorrt`` finds it
    exported in standard operators; its folder."""
    from stemserve.client.models import export_model, local_export
    from stemserve.export.tensorrt import onnx_runtime_domains
    from stemserve.export.to_onnx import onnx_parity
    from stemserve.spec import load_export

    if args.tensorrt and args.out is None and args.segment is None \
            and (local := local_export(args.model, args.config)) is not None:
        for precision in args.precisions:
            check_precision(precision, tensorrt=True)
        if not any(onnx_runtime_domains(folder) for folder, _ in load_export(local).members):
            return local
        print(f"{local} has ONNX Runtime's fused attention, which TensorRT does not read: "
              "exporting it again with --portable", file=sys.stderr, flush=True)

    def announce(index: int, count: int, info) -> None:
        if count > 1:
            print(f"  model {index + 1} of {count}: {info.name}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    out, bag = export_model(args.model, args.config, segment=args.segment, out=args.out,
                            precisions=args.precisions, on_member=announce,
                            portable=args.portable or args.tensorrt)
    layout = load_export(out)
    print(f"exported {bag.name} to {out} in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{spec.checkpoint} ({spec.family}, sha256 {spec.checkpoint_sha256[:8]}, "
                      f"segment {spec.segment_seconds:g} s, requests of {spec.padded_length} "
                      "samples)" for _, spec in layout.members))
    if not args.no_check:
        print("checking ONNX Runtime against PyTorch on random full segments (--no-check "
              "skips it)", file=sys.stderr, flush=True)
        for (folder, spec), model in zip(layout.members, bag.models):
            errors = onnx_parity(model, folder / spec.onnx_file, spec,
                                 progress=True)
            print(f"ONNX Runtime vs PyTorch max abs error, {spec.checkpoint}: "
                  + ", ".join(f"batch {batch}: {error:.2e}" for batch, error in errors.items()))
    return out
