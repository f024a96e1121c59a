"""``polynet list`` and ``polynet info MODEL``: the registry and the cost of a model."""

from __future__ import annotations

import argparse
import json

from polynet.cli import summary
from polynet.model.registry import MODELS, list_names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``list`` and ``info`` subcommands."""
    p = subparsers.add_parser("list", help=summary("list"))
    p.add_argument("pattern", nargs="?", default="*", help="glob pattern, e.g. 'polynet_3_6_3_b*'")
    p.set_defaults(func=run_list)

    p = subparsers.add_parser("info", help=summary("info"))
    p.add_argument("model", help="a registered model name (see 'polynet list')")
    p.add_argument("--spec", help="network spec for the generic 'polynet' model")
    p.add_argument("--input-size", type=int, help="square input side (default: the model's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_info)


def run_list(args: argparse.Namespace) -> int:
    """Print one line per registered model."""
    for name in list_names(args.pattern):  # the registry table: no torch to import
        print(f"{name:<28} {MODELS[name].description}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print the model's spec, parameters and MACs."""
    import torch  # only here: `polynet list` answers without it

    from polynet.model.cost import model_cost
    from polynet.model.zoo import create_model

    kwargs = {}
    if args.spec:
        kwargs["spec"] = args.spec
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    with torch.device("meta"):  # shapes and counts only: no memory, no arithmetic
        model = create_model(args.model, **kwargs)
    chans = model.pretrained_cfg["input_size"][0] if model.in_chans == 3 else model.in_chans
    size = args.input_size or model.pretrained_cfg["input_size"][-1]
    report = model_cost(model, (chans, size, size))
    if args.json:
        print(json.dumps({"model": args.model, "spec": str(model.spec), **report.to_dict()}))
    else:
        print(f"{args.model}: {model.spec}")
        print(report.format())
    return 0
