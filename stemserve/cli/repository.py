"""``stemserve repository``: fill a Triton model repository from an export, or check one."""
from __future__ import annotations

import argparse
from pathlib import Path

from stemserve.cli.flags import add_precision
from stemserve.precision import Precision


def add_parser(sub: argparse._SubParsersAction) -> None:
    from stemserve.model_repository.writer import VARIANTS

    parser = sub.add_parser("repository", help="fill or check a Triton model repository")
    actions = parser.add_subparsers(dest="action", required=True)
    fill = actions.add_parser("fill", help="fill a repository from an export folder")
    fill.add_argument("export_dir", type=Path, help="folder with model.json and its graph")
    fill.add_argument("repo_dir", type=Path, help="Triton model repository to fill")
    fill.add_argument("--variant", choices=VARIANTS, default="cpu")
    add_precision(fill, default="fp32", what="of the export the repository serves (fp16: "
                  "gpu; int8, bf16: cpu)", aliases=(Precision.FP16, Precision.INT8, Precision.BF16))
    fill.add_argument("--no-tensorrt", action="store_true",
                      help="gpu variant: ONNX Runtime's CUDA provider without TensorRT")
    fill.add_argument("--version", type=int, default=1, help="version folder to fill")
    fill.add_argument("--max-batch-size", type=int, default=None)
    fill.add_argument("--no-batching", action="store_true", help="no dynamic batching")
    check = actions.add_parser("check", help="refuse a repository whose config, model file "
                                             "and sidecar do not belong together")
    check.add_argument("repo_dir", type=Path)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stemserve.model_repository.writer import check_repository, fill_repository

    if args.action == "fill":
        fill_repository(args.export_dir, args.repo_dir, args.variant,
                        precision=args.precision, tensorrt=not args.no_tensorrt,
                        version=args.version,
                        max_batch_size=args.max_batch_size,
                        dynamic_batching=not args.no_batching)
        print(f"filled {args.repo_dir} ({args.variant})")
    layout = check_repository(args.repo_dir)
    for _, spec in layout.members:
        print(f"{args.repo_dir}: {spec.model_name} serves {spec.checkpoint} "
              f"({spec.checkpoint_sha256[:12]}, {spec.family}): consistent")
    if len(layout.members) > 1:
        print(f"{args.repo_dir}: the bag {layout.bag.name} of {len(layout.members)} models")
    return 0
