"""``polynet grow``: initialise a deeper PolyNet from a trained checkpoint (paper, Fig. 9)."""

from __future__ import annotations

import argparse

from polynet.cli import summary
from polynet.io.checkpoint import ModelRecord, save_checkpoint
from polynet.io.loading import load_model
from polynet.io.outputs import check_output
from polynet.model.grow import grow
from polynet.model.modules import SHARINGS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``grow`` subcommand."""
    p = subparsers.add_parser(
        "grow",
        help=summary("grow"),
        description=(
            "Copy a trained network's stem, reductions, head and residual blocks F into a "
            "deeper or richer PolyNet: replaced units keep F and get new blocks G, H, ...; new "
            "units are interleaved between the old ones. Prints what was copied and inserted."
        ),
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="CHECKPOINT",
        help="trained polynet checkpoint (e.g. from 'polynet train')",
    )
    p.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="MODEL_OR_SPEC",
        help="registered model name or network spec, e.g. 'polynet_6_12_6_mixed' "
        "or 'A: mpoly-2 x2 | B: ir x4 | C: 2-way x2'",
    )
    p.add_argument(
        "--out", required=True, metavar="CHECKPOINT", help="where to write the grown checkpoint"
    )
    p.add_argument(
        "--zero-init",
        action="store_true",
        help="start new blocks at zero output so the grown model computes the source's function",
    )
    p.add_argument(
        "--sharing",
        choices=SHARINGS,
        help="parameter sharing of repeated letters in the grown model (default: "
        "the target model's, else the source's); 'released' lets poly-k start exact",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Grow ``--from`` into ``--to``, print the growth map and save ``--out``."""
    check_output(args.out, inputs=[args.source], overwrite=args.overwrite, what="--out")
    source, weights = load_model(args.source)
    overrides = {"sharing": args.sharing} if args.sharing else {}
    model, growth = grow(source, args.target, zero_init=args.zero_init, **overrides)
    print(growth)
    record = ModelRecord(
        growth.model_name,
        model.state_dict(),
        model.config.to_dict(),
        class_names=weights.class_names,
    )
    save_checkpoint(args.out, record.payload(grown_from=str(args.source), growth_map=str(growth)))
    print(f"saved {args.out} ({growth.model_name}: {model.spec})")
    return 0
