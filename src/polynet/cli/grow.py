"""``polynet grow``: initialise a deeper PolyNet from a trained checkpoint (paper, Fig. 9)."""

from __future__ import annotations

import argparse
from typing import Any

from polynet.checkpoint import load_model, save_checkpoint
from polynet.grow import grow
from polynet.modules import SHARINGS
from polynet.zoo import MODELS

# Source constructor arguments that cannot be read back from a built model, or only
# approximately (width_mult is inferred from the stage width), so they are taken from the
# source checkpoint.
_CARRIED_KWARGS = ("width_mult", "norm_layer", "act_layer")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``grow`` subcommand."""
    p = subparsers.add_parser(
        "grow",
        help="grow a trained checkpoint into a deeper PolyNet (initialization by insertion)",
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
    p.set_defaults(func=run)


def _source_kwargs(payload: dict[str, Any]) -> dict[str, Any]:
    """Collect the source's constructor arguments: registered ones, then the checkpoint's."""
    name = payload["model_name"]
    return {**MODELS[name].kwargs, **payload.get("model_kwargs", {})}


def run(args: argparse.Namespace) -> int:
    """Grow ``--from`` into ``--to``, print the growth map and save ``--out``."""
    source, payload = load_model(args.source)
    carried = _source_kwargs(payload)
    overrides = {k: carried[k] for k in _CARRIED_KWARGS if k in carried}
    if args.sharing:
        overrides["sharing"] = args.sharing
    model, growth = grow(source, args.target, zero_init=args.zero_init, **overrides)
    print(growth)
    save_checkpoint(
        args.out,
        {
            "model_name": growth.model_name,
            "model_kwargs": growth.model_kwargs,
            "model": model.state_dict(),
            "grown_from": str(args.source),
            "growth_map": str(growth),
        },
    )
    print(f"saved {args.out} ({growth.model_name}: {model.spec})")
    return 0
