"""The ``polynet`` command: one thin subcommand per workflow, each in its own module here.

Every subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed arguments and returning an exit status. Only the
module of the command being run is imported, so ``polynet --help`` answers at once; each
module imports torch and the library inside its ``run`` functions for the same reason.

Errors a user can fix are one line (``polynet: error: ...``, see :mod:`polynet.errors`); any
other exception is a bug and keeps its traceback. ``--debug`` shows the traceback of both.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Command -> (module that registers it, the one line ``polynet --help`` shows for it).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "list": ("polynet.cli.info", "list the registered models"),
    "info": ("polynet.cli.info", "parameters and MACs of a model, per stage and per module type"),
    "train": (
        "polynet.cli.train",
        "train a model (the paper's recipe, presets, YAML configs, resume, torchrun)",
    ),
    "bench": (
        "polynet.cli.bench",
        "benchmark polynet_very_deep against the released port and timm's IR-v2",
    ),
    "grow": (
        "polynet.cli.grow",
        "grow a trained checkpoint into a deeper PolyNet (initialization by insertion)",
    ),
    "convert": (
        "polynet.cli.convert",
        "convert weights (e.g. the released polynet-f71d82a5.pth) to .safetensors",
    ),
    "predict": (
        "polynet.cli.predict",
        "classify images with trained weights (top-5 with class names)",
    ),
    "export": ("polynet.cli.export", "export a model to ONNX, TorchScript or torch.export"),
    "eval": (
        "polynet.cli.eval",
        "top-1/top-5 accuracy, per-class accuracy and a confusion matrix of a model",
    ),
    "ablate": (
        "polynet.cli.ablate",
        "run an ablation study of the paper (stages, mixing, depth, scaling)",
    ),
}


# polynet.inference.fuse's PRECISIONS (and "auto") and RUNTIMES, spelled out: the CLI answers
# --help without
# importing torch; tests/test_cli.py checks that they agree.
PRECISION_CHOICES = ("auto", "fp32", "bf16", "int8")
RUNTIME_CHOICES = ("torch", "onnxruntime")


def add_precision_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--precision {auto,fp32,bf16,int8}`` (shared by ``predict`` and ``eval``)."""
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="what the model computes in: auto (default) is bf16 where the device has native "
        "bf16 (AVX512-BF16/AMX CPUs, bf16 GPUs), else fp32; bf16 weights and activations; int8 "
        "static quantization (CPU, ONNX Runtime, calibrated on real images)",
    )


def add_runtime_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--runtime {torch,onnxruntime}`` (shared by ``predict`` and ``eval``)."""
    parser.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default="torch",
        help="what runs the model: torch (default), or onnxruntime: the folded fp32 model "
        "exported to ONNX and run by ONNX Runtime on the CPU (faster than torch in fp32 on the "
        "very deep model, docs/benchmarks.md); int8 runs in ONNX Runtime either way",
    )


def summary(command: str) -> str:
    """The one-line help of a command (its module passes it to ``add_parser``)."""
    return SUBCOMMANDS[command][1]


def _chosen_command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the full parser of the command in ``argv`` (all when None)."""
    parser = argparse.ArgumentParser(
        prog="polynet",
        description="PolyNet: PolyInception networks, training, evaluation and studies.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen_command(argv) if argv is not None else None
    wanted = {SUBCOMMANDS[chosen][0]} if chosen in SUBCOMMANDS else set()
    if argv is None:
        wanted = {module for module, _ in SUBCOMMANDS.values()}
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name in subparsers.choices:
            continue
        if module in wanted:
            importlib.import_module(module).register(subparsers)
        else:  # listed in --help; its options are parsed only when it is the command
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polynet`` command line; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("polynet: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from polynet.errors import is_user_error

        if args.debug or not is_user_error(err):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"polynet: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
