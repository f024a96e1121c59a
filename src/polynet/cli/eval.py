"""``polynet eval``: single-crop or the paper's multi-crop evaluation of a weights file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polynet.cli import add_precision_argument, add_runtime_argument, summary
from polynet.devices import resolve_device, resolve_precision
from polynet.distributed import ProcessGroup, join, launch_env, leave
from polynet.errors import UserError
from polynet.evaluation import MultiCrop, SingleCrop
from polynet.evaluation.api import REPORT_FILES, evaluate_weights, write_reports
from polynet.evaluation.pooling import DEFAULT_TOP_FRACTION, SCORE_TYPES
from polynet.inference.fuse import check_runtime
from polynet.io.outputs import check_output


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser(
        "eval",
        help=summary("eval"),
        description=(
            "Evaluate a checkpoint or weights file. Single-crop follows the model's "
            "pretrained_cfg; --multi-crop is the paper's 36 crops x scales with top-k pooling. "
            "Under torchrun every process evaluates a disjoint share of the images."
        ),
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="polynet checkpoint, .safetensors or the released port's .pth",
    )
    p.add_argument(
        "--model",
        help="registered model to build (default: the one the file "
        "names; polynet_very_deep for the released file)",
    )
    p.add_argument("--data", required=True, help="'fashion-mnist' or an ImageNet-layout folder")
    p.add_argument(
        "--split",
        default="val",
        help="split to evaluate (default: val; Fashion-MNIST's val is its test split)",
    )
    crop = p.add_argument_group("single-crop protocol (default: the model's pretrained_cfg)")
    crop.add_argument("--crop-pct", type=float, help="crop fraction, e.g. 0.875")
    crop.add_argument(
        "--crop-mode",
        choices=("center", "squash"),
        help="center: keep aspect; squash: resize both sides (released model)",
    )
    crop.add_argument(
        "--flip",
        action="store_true",
        help="test-time flips: average each image's logits with its mirror image's (what "
        "training's eval_flip reports); the report also gives the top-1 without",
    )
    multi = p.add_argument_group("multi-crop protocol (paper section 5)")
    multi.add_argument(
        "--multi-crop",
        action="store_true",
        help="36 crops per scale, top-k pooled per class, mean over scales",
    )
    multi.add_argument(
        "--scales",
        type=int,
        nargs="+",
        metavar="PX",
        help="shorter-side lengths (default: 8 scales, input size x 16/14 ... "
        "23/14, e.g. 32 34 ... 46 at 28 px)",
    )
    multi.add_argument(
        "--top-fraction",
        type=float,
        default=DEFAULT_TOP_FRACTION,
        help="share of a scale's crops averaged per class (default: 0.3)",
    )
    multi.add_argument(
        "--score",
        choices=SCORE_TYPES,
        default="softmax",
        help="what is pooled (default: softmax probabilities)",
    )
    run = p.add_argument_group("running")
    run.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="crops (images for single-crop) per forward pass; halved on CUDA OOM",
    )
    run.add_argument("--workers", type=int, default=2, help="data-loading processes")
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    add_precision_argument(run)
    add_runtime_argument(run)
    run.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument(
        "--no-fuse",
        action="store_true",
        help="evaluate the model as built, not its inference-optimised copy (folded norms, "
        "joined convolutions; same outputs within float rounding)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", help="write the JSON report to OUT")
    out.add_argument("--out", metavar="DIR", help=f"write {', '.join(REPORT_FILES)} to DIR")
    out.add_argument("--overwrite", action="store_true", help="replace existing report files")
    p.set_defaults(func=run_eval)


def _check(args: argparse.Namespace) -> None:
    if not args.multi_crop and (
        args.scales or args.score != "softmax" or args.top_fraction != DEFAULT_TOP_FRACTION
    ):
        raise UserError("--scales, --score and --top-fraction need --multi-crop")
    if args.multi_crop and (args.crop_pct is not None or args.crop_mode is not None or args.flip):
        raise UserError(
            "--crop-pct, --crop-mode and --flip set the single-crop protocol; drop them "
            "or drop --multi-crop"
        )
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise UserError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--limit", args.limit, 1),
        ("--workers", args.workers, 0),
    ):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    # A device that does not exist, int8 or ONNX Runtime off the CPU, or bf16 in ONNX Runtime
    # fails now, not after loading.
    device = resolve_device(args.device)
    check_runtime(args.runtime, resolve_precision(args.precision, device, args.runtime))
    if args.runtime == "onnxruntime" and device.type != "cpu":
        raise UserError(f"--runtime onnxruntime runs on the CPU, not {device}; add --device cpu")
    # Outputs are checked before the evaluation starts; inputs are never written over.
    inputs = [args.checkpoint]
    if args.json:
        check_output(args.json, inputs, args.overwrite, "--json")
    if args.out:
        check_output(args.out, inputs, args.overwrite, "--out", folder=True)
        for name in REPORT_FILES:
            check_output(Path(args.out) / name, inputs, args.overwrite, "--out")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print a summary and write the requested reports (rank 0 only)."""
    _check(args)
    if args.multi_crop:
        protocol = MultiCrop(
            tuple(args.scales) if args.scales else None, args.top_fraction, args.score
        )
    else:
        protocol = SingleCrop(args.crop_pct, args.crop_mode, flip=args.flip)
    # Under torchrun every process joins the one process group, on this process's GPU or the
    # CPU, and evaluates its share of the images.
    group = join(resolve_device(args.device)) if launch_env().launched else None
    finished = False
    try:
        _evaluate_and_report(args, protocol, group)
        finished = True
        return 0
    finally:
        if group is not None:
            # Rank 0 hosts the rendezvous store: leaving before the others finish their last
            # collective would reset their connections.
            if finished:
                group.barrier()
            leave()


def _evaluate_and_report(
    args: argparse.Namespace, protocol: MultiCrop | SingleCrop, group: ProcessGroup | None
) -> None:
    device = group.device if group is not None else resolve_device(args.device)
    chosen = resolve_precision(args.precision, device, args.runtime)
    main = group is None or group.is_main
    if main:
        auto = " (auto)" if args.precision == "auto" else ""
        engine = ", onnxruntime" if args.runtime == "onnxruntime" else ""
        print(f"polynet: precision {chosen}{auto}{engine}", file=sys.stderr)
    report, result = evaluate_weights(
        args.checkpoint,
        args.data,
        args.split,
        protocol,
        model_name=args.model,
        batch_size=args.batch_size,
        device=device,
        num_workers=args.workers,
        limit=args.limit,
        progress=not args.no_progress,
        fuse=not args.no_fuse,
        precision=chosen,
        runtime=args.runtime,
        group=group,
    )
    if not main:
        return
    for path, reason in result.unreadable:
        print(f"polynet: warning: skipped unreadable image {path}: {reason}", file=sys.stderr)
    m = report["metrics"]
    print(
        f"{report['model']['name']} on {args.data} {report['data']['split']} "
        f"({report['protocol']['name']}): top-1 {m['top1_accuracy']:.2f}% "
        f"(error {m['top1_error']:.2f}%), top-5 {m['top5_accuracy']:.2f}% "
        f"(error {m['top5_error']:.2f}%) on {m['images']} images, "
        f"{len(result.unreadable)} unreadable; {report['runtime']['images_per_second']:.1f} "
        f"images/s in {result.precision}"
        + (
            f"; top-1 without the flips {m['top1_accuracy_unflipped']:.2f}%"
            if "top1_accuracy_unflipped" in m
            else ""
        )
    )
    for path in write_reports(report, args.out, args.json):
        print(f"wrote {path}")
