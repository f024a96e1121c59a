"""Initialization by insertion on Fashion-MNIST: a grown network against the same one from scratch.

1. Train a small IR source (``A: ir | B: ir x2 | C: ir``) for ``--source-steps`` steps.
2. Grow it with :func:`polynet.model.grow.grow` into a twice-as-deep PolyNet whose units are 2-way
   and
   mpoly-2 modules (new units interleaved, new blocks at zero output, so it starts as the source).
3. Train the grown network and the same architecture from random init for ``--steps`` steps
   each, with the same batches and optimizer, evaluating test accuracy every ``--eval-every``.

Writes the curves as JSON and PNG and prints the steps each run needs to reach
``--target-acc``. CPU-sized: a training subset, one pass over few thousand images, no
augmentation, constant learning rate. Example (the run in docs/growing.md)::

    python benchmarks/grow_fashion_mnist.py --out-png docs/growing-curves.png \
        --out-json benchmarks/results/grow_fashion_mnist.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import polynet
from polynet.data import FashionMNIST
from polynet.model.grow import grow
from polynet.model.registry import FASHION_MNIST_MEAN, FASHION_MNIST_STD

SOURCE_SPEC = "A: ir | B: ir x2 | C: ir"
TARGET_SPEC = "A: 2-way x2 | B: (mpoly-2, 2-way) x2 | C: 2-way x2"


def load(split: str, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = FashionMNIST(split)
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]
    images = data.images[index].float().div(255).sub(FASHION_MNIST_MEAN[0])
    return images.div(FASHION_MNIST_STD[0]).unsqueeze(1), data.targets[index]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        (model(x).argmax(1) == y).sum().item()
        for x, y in zip(images.split(500), labels.split(500), strict=True)
    )
    return correct / len(labels)


def train(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    steps: int,
    name: str,
) -> list[tuple[int, float]]:
    """Train with SGD on batches drawn in a fixed order; returns (step, test accuracy) pairs."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    scheduler = None
    if args.lr_decay == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    order = torch.Generator().manual_seed(args.seed + 1)  # same batches for every run
    images, labels = data
    curve = [(0, accuracy(model, *test))]
    start = time.time()
    for step in range(1, steps + 1):
        model.train()
        batch = torch.randint(len(labels), (args.batch_size,), generator=order)
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step % args.eval_every == 0 or step == steps:
            curve.append((step, accuracy(model, *test)))
            print(
                f"{name:<8} step {step:>4}  loss {loss.item():.3f}  test acc {curve[-1][1]:.4f}  "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )
    return curve


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target), None)


def plot(results: dict, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=80)
    for key, label in (("scratch", "from scratch"), ("grown", "grown (zero-init)")):
        steps, accs = zip(*results[key], strict=True)
        ax.plot(steps, [100 * a for a in accs], marker="o", markersize=3, label=label)
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("training steps of the deep network")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: initialization by insertion", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300, help="steps of each deep-network run")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--lr-decay",
        choices=("none", "cosine"),
        default="none",
        help="learning-rate decay over each run (cosine: to 0 at its last step)",
    )
    p.add_argument("--width-mult", type=float, default=0.0625)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--target-acc", type=float, default=0.80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-json", type=Path)
    p.add_argument("--out-png", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load("train", args.train_subset, args.seed)
    test = load("test", args.test_subset, args.seed)
    small = dict(
        stem="small", width_mult=args.width_mult, in_chans=1, num_classes=10, drop_rate=0.0
    )

    torch.manual_seed(args.seed)
    source = polynet.create_model("polynet", spec=SOURCE_SPEC, **small)
    source_curve = train(source, data, test, args, args.source_steps, "source")

    grown, growth = grow(source, TARGET_SPEC, zero_init=True)
    print(growth)
    assert abs(accuracy(grown, *test) - source_curve[-1][1]) < 1e-9, "zero-init must be exact"
    grown_curve = train(grown, data, test, args, args.steps, "grown")

    torch.manual_seed(args.seed + 2)
    scratch = polynet.create_model("polynet", spec=TARGET_SPEC, **small)
    scratch_curve = train(scratch, data, test, args, args.steps, "scratch")

    results = dict(
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        source_spec=SOURCE_SPEC,
        target_spec=TARGET_SPEC,
        source_params=sum(p.numel() for p in source.parameters()),
        target_params=sum(p.numel() for p in grown.parameters()),
        source=source_curve,
        grown=grown_curve,
        scratch=scratch_curve,
        steps_to_target={
            f"{level:.2f}": dict(
                grown=steps_to(grown_curve, level), scratch=steps_to(scratch_curve, level)
            )
            for level in sorted({0.70, 0.75, 0.80, 0.85, args.target_acc})
        },
    )
    for level, steps in results["steps_to_target"].items():
        print(f"steps to {level} test accuracy: {steps}")
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(results, indent=1))
    if args.out_png:
        plot(results, args.out_png, args.target_acc)


if __name__ == "__main__":
    main()
