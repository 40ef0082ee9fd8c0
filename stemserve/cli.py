"""The ``stemserve`` command: a thin layer over the library, one sub-command per job."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "demucs_quantized"
EXPORT_ROOT = Path("build") / "export"


def _add_export(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a Demucs v2 model to ONNX with its sidecar")
    parser.add_argument("-n", "--model", default=DEFAULT_MODEL,
                        help="release name or checkpoint path (default: %(default)s)")
    parser.add_argument("--config", default=None,
                        help="release whose configuration a plain state dict uses")
    parser.add_argument("--segment", type=float, default=None,
                        help="segment length in seconds (default: the model's training "
                             "segment, what demucs' apply_model splits by)")
    parser.add_argument("--fp16", action="store_true", help="also write an fp16 graph")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help=f"output folder (default: {EXPORT_ROOT}/<model>)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the PyTorch vs ONNX Runtime parity check")
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from stemserve.checkpoints import load_model
    from stemserve.export.to_onnx import export_onnx, onnx_parity

    model, info = load_model(args.model, config=args.config)
    segment = round(args.segment * model.samplerate) if args.segment else None
    out = args.out or EXPORT_ROOT / info.name
    start = time.perf_counter()
    spec = export_onnx(model, info, out, segment_length=segment, fp16=args.fp16)
    print(f"exported {info.name} to {out / spec.onnx_file} in {time.perf_counter() - start:.1f} s "
          f"(segment {spec.segment_seconds:g} s, padded to {spec.padded_length} samples)")
    if not args.no_check:
        errors = onnx_parity(model, out / spec.onnx_file, spec)
        print("ONNX Runtime vs PyTorch max abs error: "
              + ", ".join(f"batch {batch}: {error:.2e}" for batch, error in errors.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stemserve",
        description="Separate music into drums, bass, other and vocals with Demucs v2 on Triton.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
