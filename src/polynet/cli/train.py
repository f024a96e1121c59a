"""``polynet train``: train a model with the paper's recipe (or a preset) from YAML and flags.

Every :class:`~polynet.training.config.TrainConfig` field is a flag (``batch_size`` is
``--batch-size``); flags win over ``--config`` files, which win over ``--preset``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

import yaml

from polynet.cli import summary
from polynet.training.config import PRESETS, TrainConfig, layer_values

# Help for each flag: the first sentence of the field's description in TrainConfig's docstring.
_HELP = {
    line.strip().split(":", 1)[0]: line.strip().split(":", 1)[1].strip()
    for line in (TrainConfig.__doc__ or "").splitlines()
    if ":" in line and line.startswith("        ") and not line.startswith("         ")
}


def _mapping(text: str) -> dict[str, Any]:
    try:
        value = yaml.safe_load(text)  # plain data only: python tags are refused
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a mapping such as '{{width_mult: 0.0625}}', got {text!r}"
        )
    return value


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, annotation: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and len(options) == 1:
        annotation = options[0]
    kind = typing.get_origin(annotation) or annotation
    help_text = _HELP.get(f.name, "").replace("%", "%%")  # argparse formats help with %
    if kind is bool:
        group.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    elif kind is tuple and Ellipsis in typing.get_args(annotation):
        group.add_argument(flag, nargs="*", type=float, default=None, metavar="X", help=help_text)
    elif kind is tuple:
        group.add_argument(
            flag, nargs=2, type=float, default=None, metavar=("MIN", "MAX"), help=help_text
        )
    elif kind is dict:
        group.add_argument(flag, type=_mapping, default=None, metavar="YAML", help=help_text)
    else:
        group.add_argument(flag, type=kind, default=None, help=help_text)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser(
        "train",
        help=summary("train"),
        description=(
            "Train a PolyNet on Fashion-MNIST or an ImageNet-layout folder. Settings come from "
            "--preset, then --config YAML, then flags. Launch with torchrun for several "
            "processes. Prints the final top-1 on the validation (Fashion-MNIST: test) split."
        ),
    )
    p.add_argument("--config", metavar="YAML", help="configuration file (unknown keys are errors)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named starting configuration")
    group = p.add_argument_group("settings (override the preset and the config file)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        _add_field(group, f, hints[f.name])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and print the outcome."""
    from polynet.distributed import is_main_process
    from polynet.training.loop import train

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    # Only what was given explicitly: a bare --resume continues the saved run as it was.
    explicit = layer_values(args.preset, args.config, **overrides)
    result = train(explicit)
    cfg = result.config
    if not is_main_process():  # torchrun: the main process reports
        return 0
    if result.final_top1 is not None:
        split = "test" if "mnist" in cfg.data.lower() else "validation"
        print(
            f"top-1 {result.final_top1:.2f}% on {result.val_images:,} {split} images after "
            f"{result.epochs:.3g} epochs ({result.steps:,} steps, {result.seconds / 60:.1f} min, "
            f"{result.images_per_second:.0f} images/s); weights: {result.out / 'last.pt'}"
        )
    else:
        print(f"trained {result.steps:,} steps; weights: {result.out / 'last.pt'}")
    return 0
