"""``polynet convert SRC DST``: released or trained weights to safetensors, or to the port."""

from __future__ import annotations

import argparse

from polynet.cli import summary
from polynet.io.loading import convert
from polynet.io.outputs import check_output
from polynet.io.weights import PORT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand."""
    p = subparsers.add_parser(
        "convert",
        help=summary("convert"),
        description=(
            "Convert a weights file (the released port's state dict, a polynet checkpoint or "
            "safetensors) to .safetensors with the model name and preprocessing in its "
            "metadata, or with --to-port back to the released port's key layout."
        ),
    )
    p.add_argument("src", help="source weights file")
    p.add_argument("dst", help="destination (.safetensors, or a .pth file with --to-port)")
    p.add_argument(
        "--model",
        help=f"model the weights belong to (default: the one SRC names, else {PORT_MODEL})",
    )
    p.add_argument(
        "--to-port",
        action="store_true",
        help="write the pretrainedmodels port's state-dict layout instead of ours",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert and print a one-line summary."""
    check_output(args.dst, [args.src], args.overwrite, "destination")
    summary = convert(args.src, args.dst, model_name=args.model, to_port=args.to_port)
    layout = "the released port's layout" if args.to_port else "safetensors"
    print(
        f"wrote {summary['dst']} ({layout}): {summary['model_name']}, "
        f"{summary['tensors']} tensors, {summary['params']:,} parameters"
    )
    return 0
