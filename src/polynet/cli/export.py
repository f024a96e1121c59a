"""``polynet export MODEL --format onnx|torchscript|exported --out FILE``."""

from __future__ import annotations

import argparse

from polynet.cli import summary
from polynet.errors import UserError
from polynet.inference.export import (
    FORMATS,
    example_input,
    export,
    exported_max_error,
    onnx_max_error,
)
from polynet.io.loading import load_model
from polynet.io.outputs import check_output
from polynet.model.zoo import check_model_name, create_model


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser("export", help=summary("export"))
    p.add_argument("model", help="a registered model name (see 'polynet list')")
    p.add_argument("--checkpoint", help="weights to load (required unless --random-weights)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="export the untrained model (for tooling and benchmarks)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="output format (exported: a torch.export program, .pt2)",
    )
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--input-size", type=int, help="square input side (default: the model's)")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip comparing the ONNX or exported file with PyTorch",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build (and load) the model, export it and check an ONNX or exported file against it."""
    check_model_name(args.model)
    if not args.checkpoint and not args.random_weights:
        raise UserError(
            "export needs --checkpoint (the weights to export); pass --random-weights to "
            "export the untrained model on purpose"
        )
    if args.input_size is not None and args.input_size < 1:
        raise UserError(f"--input-size must be a positive number of pixels, got {args.input_size}")
    check_output(args.out, [args.checkpoint], args.overwrite, "--out")
    if args.checkpoint:
        model, _ = load_model(args.checkpoint, args.model)
    else:
        model = create_model(args.model).eval()
    input_size = model.pretrained_cfg["input_size"]
    if args.input_size is not None:
        input_size = (model.in_chans, args.input_size, args.input_size)
    path = export(model, args.out, args.format, input_size)
    print(f"wrote {path} ({args.format}, input {'x'.join(map(str, input_size))}, any batch)")
    if args.no_check or args.format == "torchscript":
        return 0
    x = example_input(model, input_size, batch_size=3)
    if args.format == "onnx":
        print(
            f"onnxruntime vs PyTorch on a batch of 3: max |difference| "
            f"{onnx_max_error(model, path, x):.2e}"
        )
    else:
        print(
            f"torch.export.load vs PyTorch on a batch of 3: max |difference| "
            f"{exported_max_error(model, path, x):.2e}"
        )
    return 0
