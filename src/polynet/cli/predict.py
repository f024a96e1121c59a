"""``polynet predict IMAGE... --checkpoint FILE``: top-5 classes of each image.

The first line printed is the precision the model runs in (``--precision``, and ``--runtime``
where it is ONNX Runtime); int8 calibrates on the first images given (at least 16 of them where
there are that many).
"""

from __future__ import annotations

import argparse
import sys

from polynet.cli import add_precision_argument, add_runtime_argument, summary
from polynet.devices import resolve_precision
from polynet.inference.predict import predict
from polynet.io.loading import load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` subcommand."""
    p = subparsers.add_parser("predict", help=summary("predict"))
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument(
        "--checkpoint", required=True, help="weights (.safetensors, checkpoint or released .pth)"
    )
    p.add_argument(
        "--model", help="model name (default: the one the file names, else polynet_very_deep)"
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    add_precision_argument(p)
    add_runtime_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print each image's top-k labels with probabilities."""
    model, weights = load_model(args.checkpoint, args.model)
    device = next(model.parameters()).device
    precision = resolve_precision(args.precision, device, args.runtime)
    # A status line, on stderr: stdout holds only the predictions, for scripts to read.
    auto = " (auto)" if args.precision == "auto" else ""
    engine = ", onnxruntime" if args.runtime == "onnxruntime" else ""
    print(f"polynet: precision {precision}{auto}{engine}", file=sys.stderr)
    results = predict(
        model,
        args.images,
        args.top_k,
        weights.class_names,
        precision=precision,
        runtime=args.runtime,
    )
    for image, top in zip(args.images, results, strict=True):
        print(image)
        for rank, p in enumerate(top, 1):
            print(f"  {rank}. {p.probability:6.2%}  {p.label} ({p.index})")
    return 0
