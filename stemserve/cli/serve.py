"""``stemserve serve``: Triton Inference Server with a model, exported first if need be."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stemserve.cli.flags import add_model, add_precision
from stemserve.defaults import DEFAULT_MODEL, repository_root
from stemserve.errors import ServerError
from stemserve.precision import asked_as, check_precision, row


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="serve an exported model with Triton Inference Server")
    add_model(parser, DEFAULT_MODEL, "release name, checkpoint path or export folder, "
                                      "exported first when need be (default: %(default)s)")
    parser.add_argument("--repository", type=Path, default=None,
                        help="model repository to fill (default: <cache>/model_repository/cpu, "
                             "or /gpu when serving on a GPU)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0: all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--no-batching", action="store_true",
                        help="run every request alone (no dynamic batching)")
    add_precision(parser, default="fp32", what="the server runs (made once if need be)")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true",
                        help="require the NGC tritonserver image on this host's GPUs (docker)")
    device.add_argument("--cpu", action="store_true",
                        help="use the local CPU server even where a GPU and docker are usable")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stemserve.client.models import export_dir_for
    from stemserve.model_repository.server import (DockerTritonServer, TritonServer,
                                                   docker_gpu_unavailable)
    from stemserve.model_repository.writer import fill_repository
    from stemserve.spec import load_export

    precision = check_precision(args.precision, gpu=args.gpu)
    export_dir = export_dir_for(args.model, args.config, precision)
    reason = ("--cpu was given" if args.cpu else f"{asked_as(precision)} was given"
              if row(precision).device == "cpu" else docker_gpu_unavailable())
    if reason and args.gpu:
        raise ServerError(f"--gpu needs docker and an NVIDIA GPU: {reason}")
    if reason:
        print(f"serving on the CPU: {reason}", file=sys.stderr)
    variant = "cpu" if reason else "gpu"
    repository = args.repository or repository_root() / variant
    fill_repository(export_dir, repository, variant, precision=precision,
                    dynamic_batching=not args.no_batching)
    layout = load_export(export_dir)
    spec = layout.spec
    print(f"serving {layout.bag.name} ("
          + (f"{spec.rules.title}, sha256 {spec.checkpoint_sha256[:8]}"
             if len(layout.members) == 1 else f"a bag of {len(layout.members)} models")
          + f", {precision}) from {export_dir}", file=sys.stderr, flush=True)

    server_class = TritonServer if reason else DockerTritonServer
    server = server_class(repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host,
                          log_verbose=1 if args.verbose else 0, log_all=args.verbose)
    print(f"starting tritonserver on {args.host} ({variant}, repository {repository}; its "
          "warnings and errors follow, all of its log with -v)", file=sys.stderr, flush=True)
    try:
        # A first GPU start may pull the image and build TensorRT engines: minutes.
        server.start(timeout=300 if reason else 1800)
        print(f"Triton is ready ({variant}, repository {repository}):\n"
              f"  gRPC    {server.grpc_url}\n  HTTP    {server.http_url}\n"
              f"  metrics {server.metrics_url}\nCtrl-C stops it.", flush=True)
        code = server.wait()
    except KeyboardInterrupt:
        print("stopping tritonserver", file=sys.stderr)
        return 0
    finally:
        server.stop()
    raise ServerError(f"tritonserver exited on its own with code {code}; its log is above")
