"""``stemserve web``: the upload page and its HTTP API."""
from __future__ import annotations

import argparse

from stemserve.cli.flags import add_model, add_precision
from stemserve.connection import ConnectionOptions
from stemserve.defaults import DEFAULT_MODEL, TRITON_URL_ENV, triton_url_from_env


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Flags from :class:`~stemserve.web.settings.Settings`; the settings without a help text
    of their own (where separation runs, the model, other sites) are written here."""
    from stemserve.client.options import add_options
    from stemserve.web.settings import Settings

    parser = sub.add_parser("web", help="serve the upload page and HTTP API (port 8080; "
                                        "--port 8000 for the demucs image's)")
    add_options(parser, Settings, skip=("precision",))
    add_precision(parser, default=None, what="to separate with (default: fp32 in-process, "
                  "whatever Triton serves; with Triton, checks that the server serves it)")
    for alias in ("--no-int8", "--no-bf16"):  # web's flags before --precision: kept working
        parser.add_argument(alias, dest="precision", action="store_const", const=None,
                            help="the default precision (as no flag)")
    add_options(parser.add_argument_group("Triton"), ConnectionOptions)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help="Triton gRPC address(es) to separate on (default: "
                            f"${TRITON_URL_ENV}; if unset, in-process)")
    where.add_argument("--backend", choices=("onnx",), default=None,
                       help="separate in-process with ONNX Runtime, even if "
                            f"${TRITON_URL_ENV} is set")
    add_model(parser, None, "default model: release name, checkpoint file or export folder "
                             f"(default: what Triton serves; {DEFAULT_MODEL} in-process)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="another site whose pages may post here, e.g. "
                             "https://music.example.com (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from stemserve.client.options import options_from
    from stemserve.defaults import WEB_TOKEN_ENV
    from stemserve.web.server import serve
    from stemserve.web.settings import Settings

    url = args.url or (None if args.backend else triton_url_from_env())
    serve(options_from(args, Settings, triton_url=url or None, model=args.model,
                       config=args.config, allow_origins=tuple(args.allow_origin),
                       token=args.token or os.environ.get(WEB_TOKEN_ENV) or None,
                       connection=options_from(args, ConnectionOptions)))
    return 0
