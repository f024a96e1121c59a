"""``polynet bench``: throughput, memory and MACs against the released port and timm."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polynet.bench import BenchConfig, run_benchmark, to_markdown
from polynet.bench.candidates import LIKE_FOR_LIKE, REGISTRY
from polynet.cli import summary
from polynet.errors import UserError
from polynet.io.checkpoint import atomic_write
from polynet.io.outputs import check_output


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = subparsers.add_parser(
        "bench",
        help=summary("bench"),
        description="Measure inference and training images/s, peak memory, MACs and achieved "
        "GFLOP/s of every candidate, interleaved in one process with the same threads and "
        "inputs. Compare the ratios; absolute times depend on the machine's load.",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a result")
    p.add_argument("--image-size", type=int, help="square input side (default 331)")
    p.add_argument("--batch-size", type=int, help="images per step (default 4)")
    p.add_argument("--threads", type=int, help="torch threads (default 2)")
    p.add_argument("--reps", type=int, help="timed interleaved rounds (default 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    p.add_argument(
        "--candidates",
        help=f"comma-separated subset of {','.join(REGISTRY)}, or {LIKE_FOR_LIKE} (every "
        "candidate a target compares); default: the default candidates of --precision",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help="the precisions measured: auto (default; fp32, and bf16 where the device computes "
        "it natively; named candidates at their own), all, or a comma list of fp32,bf16,int8. "
        "int8 rows run in ONNX Runtime on the CPU and take minutes to build at full size",
    )
    p.add_argument("--no-train", action="store_true", help="skip the training steps")
    p.add_argument("--no-infer", action="store_true", help="skip the inference steps")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)  # replaced: --precision
    p.add_argument(
        "--compile",
        action="store_true",
        help="add the torch.compile'd polynet of each precision measured; its first step "
        "(the compilation) is reported on its own, not in the images/s",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="write the report as JSON")
    p.add_argument("--markdown", type=Path, metavar="OUT", help="write the markdown table")
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing --json / --markdown files"
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Build the benchmark settings from the command line."""
    overrides = {
        key: value
        for key in ("image_size", "batch_size", "threads", "reps", "warmup", "device")
        if (value := getattr(args, key)) is not None
    }
    if args.amp:
        raise UserError(
            "--amp is replaced by --precision: bf16 rows (polynet-bf16, port-cl-bf16, ...) run "
            "under bf16 autocast; use --precision bf16 or auto"
        )
    if args.candidates:
        overrides["candidates"] = tuple(c.strip() for c in args.candidates.split(",") if c.strip())
    overrides.update(
        train=not args.no_train,
        infer=not args.no_infer,
        memory=not args.no_memory,
        precision=args.precision,
        compile=args.compile,
    )
    return BenchConfig.quick_config(**overrides) if args.quick else BenchConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print (and optionally write) the table."""
    cfg = config_from_args(args)
    cfg.check()
    for path, flag in ((args.json, "--json"), (args.markdown, "--markdown")):
        if path:  # before the benchmark: a result file is replaced only with --overwrite
            check_output(path, overwrite=args.overwrite, what=flag)
    report = run_benchmark(cfg, log=lambda line: print(f"bench: {line}", file=sys.stderr))
    table = to_markdown(report)
    print(table, end="")
    if args.json:
        data = json.dumps(report, indent=2).encode()
        atomic_write(args.json, lambda f: f.write(data))
    if args.markdown:
        atomic_write(args.markdown, lambda f: f.write(table.encode()))
    return 0
