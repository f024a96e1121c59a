"""One point per config: its costs and its accuracy per seed, with the mean and 95 % interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from polynet.ablation.results import seed_of
from polynet.ablation.stats import CONFIDENCE, Interval, Series, interval
from polynet.ablation.studies import Study

METRICS = ("top1", "top5")


@dataclass
class Point:
    """One config of a study: its costs and its accuracy for every seed that has a result.

    Attributes:
        config: The config's name.
        label: Its short label.
        family: ``"ir"``, ``"polynet"`` or ``"resnet"``.
        group: Its panel (stage ``"A"``, ``"B"``, ``"C"``, ``"uniform"``, ...).
        units: Residual units / PolyInception modules.
        baseline: Whether it is the study's baseline.
        params: Parameters.
        macs: Multiply-accumulates for one image at the model's input size.
        seconds_per_iter: Time per training iteration (None: not timed).
        eval_images: Validation images each seed was evaluated on (the fewest).
        accuracy: Per metric (``"top1"``, ``"top5"``), the accuracy (%) of each seed.
        missing_seeds: Seeds expected but without a result.
        stage_params: Parameters per part (PolyNets; None for ResNets).

    """

    config: str
    label: str
    family: str
    group: str
    units: int
    baseline: bool
    params: int
    macs: int
    seconds_per_iter: float | None
    eval_images: int
    accuracy: dict[str, dict[int, float]]
    missing_seeds: list[int] = field(default_factory=list)
    stage_params: dict[str, int] | None = None

    @property
    def seeds(self) -> int:
        """Seeds with a result."""
        return len(self.accuracy["top1"])

    def series(self, metric: str) -> Series:
        """Accuracy (%) of each seed."""
        return self.accuracy.get(metric, {})

    def interval(self, metric: str) -> Interval | None:
        """Mean over seeds and its 95 % Student's t interval (None: no value)."""
        values = self.series(metric)
        if not values:
            return None
        seeds = sorted(values)
        return interval([values[s] for s in seeds], seeds)

    def mean(self, metric: str) -> float:
        """Mean accuracy (%) over seeds (NaN when not measured)."""
        iv = self.interval(metric)
        return float("nan") if iv is None else iv.mean

    def error_bar(self, metric: str) -> float:
        """Half-width of the plotted 95 % interval.

        Over seeds (Student's t) with two or more; with one seed only the evaluation set's
        binomial interval (which leaves out seed-to-seed variation of training).
        """
        iv = self.interval(metric)
        if iv is None:
            return float("nan")
        if iv.half_width is not None:
            return iv.half_width
        p = iv.mean / 100
        z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
        return 100 * z * math.sqrt(max(p * (1 - p), 1e-12) / max(self.eval_images, 1))

    @property
    def ms(self) -> float:
        """Milliseconds per training iteration (NaN when not timed)."""
        return float("nan") if self.seconds_per_iter is None else 1000 * self.seconds_per_iter

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: costs, per-seed accuracies, means and intervals."""
        out = {k: v for k, v in vars(self).items() if k != "accuracy"}
        out["seeds"] = self.seeds
        for metric in METRICS:
            iv = self.interval(metric)
            out[metric] = iv.to_dict() if iv is not None else None
            out[f"{metric}_by_seed"] = {str(s): v for s, v in sorted(self.series(metric).items())}
        return out


def aggregate(
    study: Study, rows: Sequence[dict[str, Any]], missing: Sequence[str] = ()
) -> list[Point]:
    """One :class:`Point` per config with at least one result, in study order.

    Args:
        study: The study (labels, groups, which config is the baseline).
        rows: Result rows (one per config and seed).
        missing: ``<config>_s<seed>`` of the expected pairs without a result.

    """
    points = []
    for config in study.configs:
        mine = sorted((r for r in rows if r["config"] == config.name), key=lambda r: r["seed"])
        if not mine:
            continue
        first = mine[0]
        accuracy = {
            metric: {r["seed"]: float(r[metric]) for r in mine if r.get(metric) is not None}
            for metric in METRICS
        }
        points.append(
            Point(
                config=config.name,
                label=config.label,
                family=config.family,
                group=config.group,
                units=config.units,
                baseline=config.baseline,
                params=first["params"],
                macs=first["macs"],
                seconds_per_iter=first.get("seconds_per_iter"),
                eval_images=min(r["eval_images"] for r in mine),
                accuracy=accuracy,
                missing_seeds=sorted(
                    seed_of(k) for k in missing if k.rpartition("_s")[0] == config.name
                ),
                stage_params=first.get("stage_params"),
            )
        )
    return points
