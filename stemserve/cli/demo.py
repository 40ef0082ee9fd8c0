"""``stemserve demo``: a random-weight model of any family, to try everything offline."""
from __future__ import annotations

import argparse
from pathlib import Path

from stemserve.errors import StemserveError


DEMO_MODELS = ("htdemucs", "htdemucs_6s", "hdemucs_mmi", "demucs_mdx", "demucs")
"""What ``stemserve demo`` builds (stemserve.models.demo.CONFIGS), listed without torch."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="write a random-weight model of any family, to try "
                                         "everything with no download")
    parser.add_argument("name", nargs="?", choices=DEMO_MODELS, default="htdemucs",
                        help="the release configuration to build (default: %(default)s)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="checkpoint file to write (default: demo-<name>.th here)")
    parser.add_argument("--small", action="store_true",
                        help="a few channels: exports and separates in seconds")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from stemserve.models.demo import save_demo
    except ImportError as err:
        raise StemserveError(f"building a model needs PyTorch ({err}): pip install "
                             "'stemserve[export]'") from None
    path = save_demo(args.name, args.out or Path(f"demo-{args.name}.th"), small=args.small,
                     seed=args.seed)
    print(f"wrote {path}: {'a small ' if args.small else ''}{args.name} with random weights "
          f"(its stems are noise, not music). Try: stemserve separate -n {path} song.wav")
    return 0
