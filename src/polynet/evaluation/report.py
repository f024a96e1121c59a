"""Evaluation reports: a JSON-able dict, its markdown rendering and a confusion-matrix PNG."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from polynet.evaluation.engine import EvalResult
from polynet.io.checkpoint import atomic_write

REPORT_VERSION = 1


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_report(
    result: EvalResult,
    *,
    model: dict[str, Any],
    weights: dict[str, Any],
    data: dict[str, Any],
    device: str = "",
) -> dict[str, Any]:
    """Everything needed to read and reproduce an evaluation, as plain JSON types.

    Args:
        result: What :func:`~polynet.evaluation.evaluate` returned.
        model: At least ``name``; e.g. ``parameters`` and ``kwargs``.
        weights: At least ``path``; e.g. ``sha256``, ``format``, ``epoch``.
        data: At least ``source`` and ``split``.
        device: Where the model ran.

    """
    metrics = result.metrics
    per_class = metrics.per_class_accuracy()
    return {
        "report_version": REPORT_VERSION,
        "model": model,
        "weights": weights,
        "data": dict(
            data,
            classes=result.classes,
            images_evaluated=metrics.count,
            images_unreadable=len(result.unreadable),
            unreadable=[{"path": p, "reason": r} for p, r in result.unreadable],
        ),
        "protocol": result.protocol,
        "metrics": dict(
            metrics.summary(),
            **_extra_metrics(result),
            per_class_accuracy={
                name: (None if acc is None else 100.0 * acc)
                for name, acc in zip(result.classes, per_class, strict=True)
            },
        ),
        "confusion_matrix": metrics.confusion.tolist(),
        "runtime": dict(
            seconds=round(result.seconds, 3),
            images_per_second=round(result.images_per_second, 2),
            processes=result.world_size,
            device=device,
        ),
    }


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a report as indented JSON, atomically."""
    text = json.dumps(report, indent=2, allow_nan=False, default=_jsonable)
    atomic_write(path, lambda f: f.write((text + "\n").encode()))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def _protocol_line(protocol: dict[str, Any]) -> str:
    size = "x".join(str(s) for s in protocol["input_size"][1:])
    if protocol["name"] == "single-crop":
        return (
            f"single-crop, {protocol['crop_mode']} resize, crop_pct {protocol['crop_pct']:.4g}, "
            f"{size} input, {protocol['interpolation']}"
        )
    scales = ", ".join(str(s) for s in protocol["scales"])
    return (
        f"multi-crop, {protocol['crops_per_scale']} crops x {len(protocol['scales'])} scales "
        f"({scales}) at {size}, top {protocol['top_fraction']:.0%} "
        f"({protocol['pooled_crops_per_scale']} crops) of {protocol['score']} pooled per "
        f"class, mean over scales"
    )


def to_markdown(report: dict[str, Any]) -> str:
    """Render a report as a short markdown document."""
    m, data, weights = report["metrics"], report["data"], report["weights"]
    lines = [
        f"# Evaluation of {report['model']['name']}",
        "",
        f"- Weights: `{weights.get('path', '')}`"
        + (f" (sha256 `{weights['sha256'][:16]}...`)" if weights.get("sha256") else ""),
        f"- Data: {data['source']}, split `{data['split']}`: {data['images_evaluated']} images "
        f"evaluated, {data['images_unreadable']} unreadable (excluded)",
        f"- Protocol: {_protocol_line(report['protocol'])}",
        f"- Runtime: {report['runtime']['seconds']:.1f} s, "
        f"{report['runtime']['images_per_second']:.1f} images/s on "
        f"{report['runtime']['processes']} process(es) {report['runtime']['device']}"
        + (f", {report['runtime']['precision']}" if report["runtime"].get("precision") else "")
        + (f" in {report['runtime']['engine']}" if report["runtime"].get("engine") else ""),
        "",
        "| metric | top-1 | top-5 |",
        "|---|---|---|",
        f"| accuracy (%) | {m['top1_accuracy']:.2f} | {m['top5_accuracy']:.2f} |",
        f"| error (%) | {m['top1_error']:.2f} | {m['top5_error']:.2f} |",
        "",
        "| class | top-1 accuracy (%) |",
        "|---|---|",
    ]
    for name, acc in m["per_class_accuracy"].items():
        lines.append(f"| {name} | {'n/a' if acc is None else f'{acc:.2f}'} |")
    if data["unreadable"]:
        lines += ["", "## Unreadable images", ""]
        lines += [f"- `{item['path']}`: {item['reason']}" for item in data["unreadable"]]
    return "\n".join(lines) + "\n"


def save_confusion_matrix(
    confusion: torch.Tensor | list[list[int]],
    classes: list[str],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Save a row-normalised confusion matrix as a PNG (true classes down, predictions across).

    Cells show the share of each true class; with more than 30 classes the labels and cell
    values are left out so the figure stays readable.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in workers and on servers
    import matplotlib.pyplot as plt

    counts = torch.as_tensor(confusion, dtype=torch.float64)
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    side = min(max(4.0, 0.5 * n + 2.0), 24.0)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    color = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(
                        j,
                        i,
                        f"{shares[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=color,
                    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def _extra_metrics(result: EvalResult) -> dict[str, float]:
    """The mean loss where it was counted (single-crop), and the top-1 without flips."""
    extra: dict[str, float] = {}
    if result.protocol.get("name") == "single-crop" and result.metrics.count:
        extra["loss"] = result.metrics.mean_loss
    if result.unflipped is not None:
        extra["top1_accuracy_unflipped"] = result.unflipped.summary()["top1_accuracy"]
    return extra
