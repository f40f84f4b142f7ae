"""`vlm-serve`: the project's command line (the server itself starts with `serve run`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _make_demo_model(args: argparse.Namespace) -> int:
    from demo.model import make_demo_model

    out = make_demo_model(args.out, seed=args.seed)
    print(f"demo checkpoint written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("make-demo-model", help="build the embedded demo checkpoint offline")
    demo.add_argument("out", help="directory to write the checkpoint to")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_make_demo_model)

    from demo import evaluate
    from serve_app.cli import bench, quantize

    quantize.register(commands)
    bench.register(commands)
    evaluate.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
