"""The paper's figures of each study, with 95 % error bars, on the paper's cost axes.

Accuracy is plotted against time per training iteration and parameters (the paper's axes)
and against MACs per image. Error bars are the 95 % Student's t interval over seeds; with one
seed, the evaluation set's binomial 95 % interval (a lower bound of the real noise).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polynet.ablation.aggregate import Point
from polynet.io.checkpoint import atomic_write

COST_AXES: tuple[tuple[str, Callable[[Point], float]], ...] = (
    ("time per iteration (ms)", lambda p: p.ms),
    ("parameters (M)", lambda p: p.params / 1e6),
    ("MACs per image (M)", lambda p: p.macs / 1e6),
)
FAMILY_STYLE = {
    "resnet": ("s-", "ResNet"),
    "ir": ("o-", "Inception-ResNet"),
    "polynet": ("^-", "PolyNet"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))


def error_bar_note(points: Sequence[Point]) -> str:
    """What the error bars are, for captions and the report."""
    counts = {p.seeds >= 2 for p in points}
    if counts == {True}:
        return "error bars: 95 % interval over seeds (Student's t)"
    if counts == {False}:
        return "error bars: binomial 95 % interval of the evaluation set (one seed)"
    return (
        "error bars: 95 % interval over seeds (Student's t), or for a config with one seed "
        "the binomial 95 % interval of its evaluation set"
    )


def _caption(fig: Any, points: Sequence[Point], title: str) -> None:
    fig.suptitle(f"{title}\n{error_bar_note(points)}", fontsize=10)


def _errorbar(ax: Any, xs: list[float], points: Sequence[Point], metric: str, **style: Any):
    ys = [p.mean(metric) for p in points]
    ax.errorbar(xs, ys, yerr=[p.error_bar(metric) for p in points], capsize=3, **style)


def _annotate(ax: Any, p: Point, x: float, metric: str, offset=(3, 3)) -> None:
    ax.annotate(p.label, (x, p.mean(metric)), fontsize=7, xytext=offset, textcoords="offset points")


def plot_stages(points: Sequence[Point], path: Path, metric: str) -> None:
    """Fig. 6: accuracy against each cost (rows), one column per stage replaced."""
    plt = _pyplot()
    baseline = next((p for p in points if p.baseline), None)
    fig, axes = plt.subplots(len(COST_AXES), 3, figsize=(13, 10.5), sharey=True)
    for column, stage in enumerate("ABC"):
        mine = [p for p in points if p.group == stage]
        for row, (axis_name, x_of) in enumerate(COST_AXES):
            ax = axes[row][column]
            for p in mine:
                _errorbar(ax, [x_of(p)], [p], metric, fmt="o", label=p.label)
                _annotate(ax, p, x_of(p), metric)
            if baseline is not None:
                _errorbar(
                    ax,
                    [x_of(baseline)],
                    [baseline],
                    metric,
                    fmt="k*",
                    markersize=11,
                    label=baseline.label,
                )
            ax.set_xlabel(axis_name)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"stage {stage} replaced")
            if column == 0:
                ax.set_ylabel(f"{metric} accuracy (%)")
    handles, labels = axes[0][1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=8)
    _caption(fig, points, "PolyInception in one stage of IR 3-6-3 (cf. paper Fig. 6)")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    _save(fig, path)


def plot_mixing(points: Sequence[Point], path: Path, metric: str) -> None:
    """Fig. 8: error of the baseline, the uniform configs and the mixed config."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    xs = np.arange(len(points))
    errors = [100 - p.mean(metric) for p in points]
    bars = [p.error_bar(metric) for p in points]
    colors = [
        "gray" if p.baseline else ("tab:red" if p.group == "mixed" else "tab:blue") for p in points
    ]
    ax.bar(xs, errors, yerr=bars, color=colors, capsize=4)
    for x, p, e, b in zip(xs, points, errors, bars, strict=True):
        ax.annotate(
            f"{e:.2f}\n{p.ms:.0f} ms\n{p.params / 1e6:.2f} M",
            (x, e + b),  # above the error bar
            ha="center",
            fontsize=7,
            xytext=(0, 4),
            textcoords="offset points",
        )
    ax.set_xticks(xs, [p.label for p in points])
    low = min(errors) - 3 * max(bars)
    high = max(e + b for e, b in zip(errors, bars, strict=True))
    ax.set_ylim(max(0.0, low), high * 1.08 + 0.5)
    ax.set_ylabel(f"{metric} error (%)")
    ax.grid(axis="y", alpha=0.3)
    _caption(fig, points, "Stage B of IR 6-12-6: uniform and mixed PolyInception (cf. Fig. 8)")
    fig.tight_layout()
    _save(fig, path)


def plot_depth(points: Sequence[Point], path: Path, metric: str) -> None:
    """Fig. 2: accuracy against the number of residual units."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _errorbar(ax, [p.units for p in points], points, metric, fmt="o-")
    for p in points:
        _annotate(ax, p, p.units, metric, offset=(3, -10))
    ax.set_xlabel("residual units")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.grid(alpha=0.3)
    _caption(fig, points, "Pre-activation ResNets of growing depth (cf. paper Fig. 2)")
    fig.tight_layout()
    _save(fig, path)


def plot_scaling(points: Sequence[Point], path: Path, metric: str) -> None:
    """Fig. 11: accuracy of the three families against each cost (one panel per cost)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(COST_AXES), figsize=(16, 4.8), sharey=True)
    for ax, (axis_name, x_of) in zip(axes, COST_AXES, strict=True):
        for family, (style, name) in FAMILY_STYLE.items():
            mine = sorted((p for p in points if p.family == family), key=x_of)
            if mine:
                _errorbar(ax, [x_of(p) for p in mine], mine, metric, fmt=style, label=name)
                for p in mine:
                    _annotate(ax, p, x_of(p), metric)
        ax.set_xlabel(axis_name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} accuracy (%)")
    axes[0].legend()
    _caption(fig, points, "ResNet, IR and PolyNet of growing size (cf. paper Fig. 11)")
    fig.tight_layout()
    _save(fig, path)


PLOTS: dict[str, tuple[str, Callable[[Sequence[Point], Path, str], None]]] = {
    "stages": ("fig6_stages.png", plot_stages),
    "mixing": ("fig8_mixing.png", plot_mixing),
    "depth": ("fig2_depth.png", plot_depth),
    "scaling": ("fig11_scaling.png", plot_scaling),
}
