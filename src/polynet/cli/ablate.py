"""``polynet ablate``: the paper's ablation studies (Sec. 3.2, 3.3, 5) with cached results."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polynet.ablation import STUDIES, Shard, StudyOptions, build_study, report_study, run_study
from polynet.ablation.results import folder_lock
from polynet.ablation.studies import SMALL_WIDTH
from polynet.cli import summary
from polynet.distributed import is_main_process
from polynet.errors import UserError

# What --publish copies: small text and PNG files, never the runs' checkpoints.
PUBLISHED = ("report.md", "results.csv", "results.json", "timing.json", "study.json", "fig*.png")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ablate`` subcommand."""
    p = subparsers.add_parser(
        "ablate",
        help=summary("ablate"),
        description=(
            "Train and evaluate every config of a study with one recipe, time one training "
            "iteration of each (configs interleaved), and write results.csv/json, the paper's "
            "figure and report.md into --out. Results are cached per config and seed in "
            "OUT/results (small JSON files): a killed study resumes, a finished pair is not "
            "rerun unless --rerun, N jobs split a study with --shard K/N over one --out, and "
            "--report merges what is there. Fashion-MNIST runs the small 28 px variant; an "
            "ImageNet-layout folder runs the full-width models (also on GPUs and under "
            "torchrun)."
        ),
    )
    p.add_argument("study", choices=STUDIES, help="which study")
    p.add_argument(
        "--out",
        required=True,
        help="study folder: results/ (the cache), timing, tables, figure, report; small files "
        "that can be committed to git",
    )
    p.add_argument(
        "--runs",
        metavar="DIR",
        help="training runs (checkpoints) of every config and seed (default: OUT/runs); keep "
        "them out of a committed --out",
    )
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="'fashion-mnist' (default) or an ImageNet-layout folder with train/ and val/",
    )
    p.add_argument(
        "--scale",
        choices=("small", "full"),
        help="small: 28 px variant at --width-mult; full: registered full-width models "
        "(default: small for Fashion-MNIST, full for folders)",
    )
    p.add_argument(
        "--width-mult",
        type=float,
        help=f"width multiplier (default: {SMALL_WIDTH} for the small variant, the registered "
        "widths at full scale)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        help="seeds per config, 0 .. N-1 (default: 1; with --report, those the runs recorded)",
    )
    p.add_argument("--rerun", action="store_true", help="train and time every config again")
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="train only job K's share of N jobs that split the (config, seed) pairs over one "
        "--out (job 1 also times); then --report",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: merge the results in OUT/results into tables, figure and report "
        "(missing pairs listed)",
    )
    p.add_argument(
        "--retime",
        action="store_true",
        help="with --report: first time every config again in one interleaved pass on this "
        "machine (run it when nothing else runs: a pass timed beside training jobs is slowed)",
    )
    p.add_argument("--configs", nargs="+", metavar="NAME", help="run only these configs")
    p.add_argument("--list", action="store_true", help="list the study's configs and exit")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps per config")
    length.add_argument("--epochs", type=float, help="training epochs per config")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--train-subset", type=int, help="train on this many images")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N validation images")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="device (default: auto)")
    p.add_argument(
        "--amp",
        help="autocast precision, as polynet train's --amp (default: the training default)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (small recipe: 2)")
    p.add_argument("--workers", type=int, help="data-loader workers for image folders")
    p.add_argument(
        "--timing-rounds",
        type=int,
        default=StudyOptions.timing_rounds,
        help="interleaved timing rounds (default: %(default)s)",
    )
    p.add_argument(
        "--timing-iters",
        type=int,
        default=StudyOptions.timing_iters,
        help="iterations per config and timing round (default: %(default)s)",
    )
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument(
        "--on-result",
        metavar="CMD",
        help="shell command run after each result file lands (POLYNET_PAIR=<config>_s<seed>, "
        "POLYNET_RESULT=its file) and after the report (POLYNET_PAIR=report), e.g. a git commit "
        "of --out; a failing command is reported and the study goes on",
    )
    p.add_argument(
        "--publish",
        metavar="DIR",
        help="also copy the report, tables, timing and figure (no checkpoints) to DIR",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the study, or one job's share of it, or report it; say where."""
    for name in ("seeds", "timing_rounds", "timing_iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.width_mult is not None and args.width_mult <= 0:
        raise UserError(f"--width-mult must be positive, got {args.width_mult}")
    if args.report and (args.rerun or args.shard):
        flag = "--rerun" if args.rerun else "--shard"
        raise UserError(f"--report trains nothing; drop {flag} (or --report to train)")
    if args.retime and not args.report:
        raise UserError("--retime times the configs of a report; add --report")
    shard = Shard.parse(args.shard) if args.shard else None
    overrides = {
        key: getattr(args, key)
        for key in ("steps", "epochs", "batch_size", "lr", "train_subset", "device", "amp",
                    "threads", "workers")
        if getattr(args, key) is not None
    }  # fmt: skip
    options = StudyOptions(
        data=args.data,
        scale=args.scale,
        width_mult=args.width_mult,
        seeds=args.seeds or 1,
        rerun=args.rerun,
        configs=args.configs,
        train_overrides=overrides,
        eval_limit=args.eval_limit,
        timing_rounds=args.timing_rounds,
        timing_iters=args.timing_iters,
        progress=args.progress,
    )
    if args.list:
        study = build_study(args.study, options.resolved_scale(), args.width_mult)
        for c in study.configs:
            kwargs = ", ".join(
                f"{k}={v}" for k, v in c.model_kwargs.items() if k != "pretrained_cfg"
            )
            print(f"{c.name:<22} {c.label:<22} {c.model} {kwargs}")
        return 0
    hook = _on_result(args.on_result, Path(args.out)) if args.on_result else None
    if args.report:
        result = report_study(args.study, args.out, options, seeds=args.seeds, retime=args.retime)
    else:
        after = (lambda row: hook(f"{row['config']}_s{row['seed']}")) if hook else None
        result = run_study(
            args.study, args.out, options, runs=args.runs, shard=shard, after_config=after
        )
    if not is_main_process():
        return 0
    if hook and result.reported:
        with folder_lock(result.out):
            hook("report")
    if args.publish and result.reported:
        target = Path(args.publish)
        target.mkdir(parents=True, exist_ok=True)
        for name in PUBLISHED:
            for path in sorted(result.out.glob(name)):
                shutil.copy2(path, target / path.name)
        print(f"copied the report, tables and figure to {target}")
    missing = f", {len(result.missing)} missing" if result.missing else ""
    done = f"{len(result.trained)} trained, {len(result.cached)} cached{missing}"
    if result.reported:
        print(f"{args.study}: {done}; report {result.out / 'report.md'}", file=sys.stdout)
    else:
        print(
            f"{args.study} shard {shard}: {done}; when every job is done: polynet ablate "
            f"{args.study} --out {args.out} --report",
            file=sys.stdout,
        )
    return 0


def _on_result(command: str, out: Path) -> Callable[[str], Any]:
    """Run ``command`` in a shell for one landed pair (or ``"report"``); warn if it fails.

    The study goes on when it fails: a result file on disk is worth more than one commit.
    The caller holds :func:`~polynet.ablation.results.folder_lock` on ``out`` around it, so
    jobs sharing the folder run their commands one at a time.
    """

    def run_hook(pair: str) -> None:
        result = out / "results" / f"{pair}.json" if pair != "report" else out / "report.md"
        env = dict(os.environ, POLYNET_PAIR=pair, POLYNET_RESULT=str(result))
        done = subprocess.run(command, shell=True, env=env, check=False)
        if done.returncode:
            print(
                f"polynet ablate: --on-result exited with {done.returncode} after {pair}; going on",
                file=sys.stderr,
            )

    return run_hook
