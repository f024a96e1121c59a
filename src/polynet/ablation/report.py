"""Tables, plots and the markdown report of a study: the paper's findings checked one by one.

The accuracy compared is top-5 where top-5 means something (more than 20 classes, as on
ImageNet) and top-1 otherwise (on Fashion-MNIST's 10 classes top-5 is close to 100 % for every
config). A difference counts as clear when it exceeds twice its standard error: the binomial
error of the evaluation set and, with several seeds, the spread over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polynet.ablation.studies import Study
from polynet.checkpoint import atomic_write

TABLE_COLUMNS = (
    "config",
    "label",
    "family",
    "group",
    "units",
    "params",
    "macs",
    "seconds_per_iter",
    "seeds",
    "top1",
    "top1_std",
    "top5",
    "top5_std",
    "stderr",
    "eval_images",
)


@dataclass
class Point:
    """One config's aggregate over seeds."""

    config: str
    label: str
    family: str
    group: str
    units: int
    baseline: bool
    params: int
    macs: int
    seconds_per_iter: float | None
    seeds: int
    top1: float
    top1_std: float | None
    top5: float | None
    top5_std: float | None
    eval_images: int
    stage_params: dict[str, int] | None = None

    def accuracy(self, metric: str) -> float:
        """Mean accuracy (%) for ``"top1"`` or ``"top5"``."""
        value = getattr(self, metric)
        return float("nan") if value is None else float(value)

    def stderr(self, metric: str) -> float:
        """Return the standard error (points) of the mean accuracy (evaluation set, seeds)."""
        p = self.accuracy(metric) / 100
        binomial = 100 * math.sqrt(max(p * (1 - p), 1e-12) / max(self.eval_images, 1))
        spread = getattr(self, f"{metric}_std")
        seed_error = spread / math.sqrt(self.seeds) if spread is not None else 0.0
        # The seed spread already contains the evaluation noise; keep the larger estimate.
        return max(binomial / math.sqrt(self.seeds), seed_error)


def _std(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def aggregate(study: Study, rows: Sequence[dict[str, Any]]) -> list[Point]:
    """Mean and spread over seeds per config, in study order (configs without rows skipped)."""
    points = []
    for config in study.configs:
        mine = [r for r in rows if r["config"] == config.name]
        if not mine:
            continue
        top1 = [r["top1"] for r in mine]
        top5 = [r["top5"] for r in mine if r.get("top5") is not None]
        first = mine[0]
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
                seeds=len(mine),
                top1=statistics.fmean(top1),
                top1_std=_std(top1),
                top5=statistics.fmean(top5) if top5 else None,
                top5_std=_std(top5),
                eval_images=min(r["eval_images"] for r in mine),
                stage_params=first.get("stage_params"),
            )
        )
    return points


def choose_metric(num_classes: int) -> str:
    """``"top5"`` for many classes, ``"top1"`` when top-5 is saturated (20 classes or fewer)."""
    return "top5" if num_classes > 20 else "top1"


def _write_text(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def write_tables(points: Sequence[Point], rows: Sequence[dict[str, Any]], out: Path, metric: str):
    """Write ``results.csv`` (one row per config) and ``results.json`` (aggregates and runs)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for p in points:
        record = {k: v for k, v in vars(p).items() if k in TABLE_COLUMNS}
        record["stderr"] = round(p.stderr(metric), 3)
        writer.writerow(record)
    _write_text(out / "results.csv", buffer.getvalue())
    runs = [{k: v for k, v in r.items() if k not in ("recipe",)} for r in rows]
    payload = dict(metric=metric, configs=[vars(p) for p in points], runs=runs)
    _write_text(out / "results.json", json.dumps(payload, indent=1))


# ------------------------------------------------------------------------------------------
# Plots


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


def _ms(point: Point) -> float:
    return float("nan") if point.seconds_per_iter is None else 1000 * point.seconds_per_iter


def _errorbar(ax: Any, xs: list[float], points: Sequence[Point], metric: str, **style: Any):
    ys = [p.accuracy(metric) for p in points]
    errors = [p.stderr(metric) for p in points]
    ax.errorbar(xs, ys, yerr=errors, capsize=3, **style)


def plot_stages(points: Sequence[Point], path: Path, metric: str) -> None:
    """Fig. 6: accuracy against time per iteration (top) and parameters (bottom), per stage."""
    plt = _pyplot()
    baseline = next((p for p in points if p.baseline), None)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), sharey=True)
    for column, stage in enumerate("ABC"):
        mine = [p for p in points if p.group == stage]
        for row, (axis_name, x_of) in enumerate(
            (("time per iteration (ms)", _ms), ("parameters (M)", lambda p: p.params / 1e6))
        ):
            ax = axes[row][column]
            for p in mine:
                _errorbar(ax, [x_of(p)], [p], metric, fmt="o", label=p.label)
                ax.annotate(
                    p.label,
                    (x_of(p), p.accuracy(metric)),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
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
    fig.suptitle("PolyInception in one stage of IR 3-6-3 (cf. paper Fig. 6)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    _save(fig, path)


def plot_mixing(points: Sequence[Point], path: Path, metric: str) -> None:
    """Fig. 8: error of the baseline, the uniform configs and the mixed config."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = np.arange(len(points))
    errors = [100 - p.accuracy(metric) for p in points]
    colors = [
        "gray" if p.baseline else ("tab:red" if p.group == "mixed" else "tab:blue") for p in points
    ]
    ax.bar(xs, errors, yerr=[p.stderr(metric) for p in points], color=colors, capsize=4)
    for x, p, e in zip(xs, points, errors, strict=True):
        ax.annotate(
            f"{e:.2f}\n{_ms(p):.0f} ms",
            (x, e + p.stderr(metric)),  # above the error bar
            ha="center",
            fontsize=7,
            xytext=(0, 4),
            textcoords="offset points",
        )
    ax.set_xticks(xs, [p.label for p in points])
    low = min(errors) - 3 * max(p.stderr(metric) for p in points)
    high = max(e + p.stderr(metric) for e, p in zip(errors, points, strict=True))
    ax.set_ylim(max(0.0, low), high * 1.05 + 0.5)
    ax.set_ylabel(f"{metric} error (%)")
    ax.set_title("Stage B of IR 6-12-6: uniform and mixed PolyInception (cf. paper Fig. 8)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_depth(points: Sequence[Point], path: Path, metric: str) -> None:
    """Fig. 2: accuracy against the number of residual units."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _errorbar(ax, [p.units for p in points], points, metric, fmt="o-")
    for p in points:
        ax.annotate(
            p.label,
            (p.units, p.accuracy(metric)),
            fontsize=7,
            xytext=(3, -10),
            textcoords="offset points",
        )
    ax.set_xlabel("residual units")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title("Pre-activation ResNets of growing depth (cf. paper Fig. 2)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


FAMILY_STYLE = {
    "resnet": ("s-", "ResNet"),
    "ir": ("o-", "Inception-ResNet"),
    "polynet": ("^-", "PolyNet"),
}


def plot_scaling(points: Sequence[Point], path: Path, metric: str) -> None:
    """Fig. 11: accuracy of the three families against time per iteration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, (style, name) in FAMILY_STYLE.items():
        mine = sorted((p for p in points if p.family == family), key=_ms)
        if mine:
            _errorbar(ax, [_ms(p) for p in mine], mine, metric, fmt=style, label=name)
            for p in mine:
                ax.annotate(
                    p.label,
                    (_ms(p), p.accuracy(metric)),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xlabel("time per iteration (ms)")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title("ResNet, IR and PolyNet of growing size (cf. paper Fig. 11)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


PLOTS = {
    "stages": ("fig6_stages.png", plot_stages),
    "mixing": ("fig8_mixing.png", plot_mixing),
    "depth": ("fig2_depth.png", plot_depth),
    "scaling": ("fig11_scaling.png", plot_scaling),
}


# ------------------------------------------------------------------------------------------
# Findings


@dataclass
class Finding:
    """One observation of the paper checked against the study's numbers.

    Attributes:
        claim: The paper's observation.
        verdict: ``"holds"``, ``"holds within noise"``, ``"does not hold"``, ``"partly"`` or
            ``"not measured"``.
        evidence: The numbers behind the verdict.

    """

    claim: str
    verdict: str
    evidence: str


def _diff_verdict(diff: float, error: float, claim_positive: bool = True) -> str:
    """Verdict for a difference that the paper says is positive."""
    signed = diff if claim_positive else -diff
    if signed > 2 * error:
        return "holds"
    if signed > 0:
        return "holds within noise"
    if signed < -2 * error:
        return "does not hold"
    return "does not hold (within noise)"


def _pair_error(a: Point, b: Point, metric: str) -> float:
    return math.hypot(a.stderr(metric), b.stderr(metric))


def _fmt(p: Point, metric: str) -> str:
    return f"{p.label} {p.accuracy(metric):.2f}"


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    rx = np.argsort(np.argsort(xs))
    ry = np.argsort(np.argsort(ys))
    if len(xs) < 3 or np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def stages_findings(points: Sequence[Point], metric: str) -> list[Finding]:
    """Sec. 3.2's observations (Fig. 6)."""
    base = next((p for p in points if p.baseline), None)
    variants = [p for p in points if not p.baseline]
    if base is None or not variants:
        return [Finding("Sec. 3.2 findings", "not measured", "needs the baseline and variants")]
    acc = {p.config: p.accuracy(metric) for p in points}
    findings = []
    above = [p for p in variants if acc[p.config] > acc[base.config]]
    clear = [
        p for p in variants if acc[p.config] - acc[base.config] > 2 * _pair_error(p, base, metric)
    ]
    below = [p for p in variants if p not in above]
    verdict = (
        ("holds" if len(clear) == len(variants) else "holds within noise")
        if len(above) == len(variants)
        else ("partly" if above else "does not hold")
    )
    findings.append(
        Finding(
            "Replacing a stage's Inception residual units by any PolyInception improves on the "
            "baseline.",
            verdict,
            f"{len(above)}/{len(variants)} configs above the baseline {_fmt(base, metric)} "
            f"({len(clear)} by more than two standard errors); below or equal: "
            + (", ".join(f"{p.group} {_fmt(p, metric)}" for p in below) or "none"),
        )
    )
    gains = {}
    for stage in "ABC":
        mine = [acc[p.config] - acc[base.config] for p in variants if p.group == stage]
        if mine:
            gains[stage] = statistics.fmean(mine)
    if len(gains) == 3:
        best = max(gains, key=gains.get)  # type: ignore[arg-type]
        findings.append(
            Finding(
                "Enhancing stage B gives the largest gain.",
                "holds" if best == "B" else "does not hold",
                "mean gain over the six modules: "
                + ", ".join(f"{s} {g:+.2f}" for s, g in gains.items()),
            )
        )
    stage_b = sorted((p for p in variants if p.group == "B"), key=lambda p: -acc[p.config])
    if stage_b:
        ranking = [p.label for p in stage_b]
        first_ok, second_ok = ranking[0] == "mpoly-3", len(ranking) > 1 and ranking[1] == "poly-3"
        verdict = (
            "holds"
            if first_ok and second_ok
            else (
                "partly" if first_ok or second_ok or "mpoly-3" in ranking[:2] else "does not hold"
            )
        )
        findings.append(
            Finding(
                "In stage B, mpoly-3 is the best module and poly-3 the runner-up.",
                verdict,
                "stage B ranking: "
                + ", ".join(_fmt(p, metric) for p in stage_b)
                + f" (standard error about {stage_b[0].stderr(metric):.2f})",
            )
        )
        by_label = {p.label: p for p in stage_b}
        if "poly-3" in by_label and "mpoly-3" in by_label:
            poly3, mpoly3 = by_label["poly-3"], by_label["mpoly-3"]
            if poly3.stage_params and mpoly3.stage_params:
                ratio = poly3.stage_params["stage_b"] / mpoly3.stage_params["stage_b"]
                text = (
                    f"stage B parameters: poly-3 {poly3.stage_params['stage_b']:,}, "
                    f"mpoly-3 {mpoly3.stage_params['stage_b']:,} (ratio {ratio:.2f})"
                )
            else:
                ratio = (poly3.params - base.params + 1) / (mpoly3.params - base.params + 1)
                text = f"parameters: poly-3 {poly3.params:,}, mpoly-3 {mpoly3.params:,}"
            findings.append(
                Finding(
                    "poly-3's parameter size is about 1/3 of mpoly-3's.",
                    "holds" if 0.25 <= ratio <= 0.42 else "does not hold",
                    text,
                )
            )
    for stage in "AC":
        mine = [p for p in variants if p.group == stage]
        kway = [acc[p.config] for p in mine if "way" in p.label]
        poly = [acc[p.config] for p in mine if "poly" in p.label]
        if kway and poly:
            diff = statistics.fmean(kway) - statistics.fmean(poly)
            error = max(p.stderr(metric) for p in mine) * math.sqrt(1 / len(kway) + 1 / len(poly))
            findings.append(
                Finding(
                    f"In stage {stage}, k-way modules do slightly better than poly and mpoly.",
                    _diff_verdict(diff, error),
                    f"mean of 2-way/3-way {statistics.fmean(kway):.2f} vs mean of "
                    f"poly/mpoly {statistics.fmean(poly):.2f} ({diff:+.2f}, standard error "
                    f"{error:.2f})",
                )
            )
    timed = [p for p in points if p.seconds_per_iter is not None]
    if len(timed) >= 3:
        rho = _spearman([_ms(p) for p in timed], [acc[p.config] for p in timed])
        findings.append(
            Finding(
                "More computation generally buys accuracy.",
                "holds" if rho > 0.3 else ("holds within noise" if rho > 0 else "does not hold"),
                f"Spearman rank correlation of time per iteration and accuracy over "
                f"{len(timed)} configs: {rho:.2f}",
            )
        )
    return findings


def mixing_findings(points: Sequence[Point], metric: str) -> list[Finding]:
    """Sec. 3.3's observations (Fig. 8)."""
    base = next((p for p in points if p.baseline), None)
    uniform = [p for p in points if p.group == "uniform"]
    mixed = next((p for p in points if p.group == "mixed"), None)
    findings = []
    if base is not None and (uniform or mixed):
        others = [*uniform, *([mixed] if mixed else [])]
        above = [p for p in others if p.accuracy(metric) > base.accuracy(metric)]
        findings.append(
            Finding(
                "PolyInception modules in stage B improve on IR 6-12-6.",
                "holds" if len(above) == len(others) else ("partly" if above else "does not hold"),
                f"baseline {_fmt(base, metric)}; "
                + ", ".join(
                    f"{p.label} {p.accuracy(metric) - base.accuracy(metric):+.2f}" for p in others
                ),
            )
        )
    if uniform:
        ranked = sorted(uniform, key=lambda p: -p.accuracy(metric))
        findings.append(
            Finding(
                "Among uniform configs, poly-3 does slightly better than mpoly-3 and 3-way.",
                "holds" if ranked[0].label == "poly-3" else "does not hold",
                "uniform ranking: " + ", ".join(_fmt(p, metric) for p in ranked),
            )
        )
    if uniform and mixed is not None:
        best = max(uniform, key=lambda p: p.accuracy(metric))
        diff = mixed.accuracy(metric) - best.accuracy(metric)
        findings.append(
            Finding(
                "The mixed config (3-way -> mpoly-3 -> poly-3) x4 beats every uniform config.",
                _diff_verdict(diff, _pair_error(mixed, best, metric)),
                f"mixed {mixed.accuracy(metric):.2f} vs best uniform {_fmt(best, metric)} "
                f"({diff:+.2f}, standard error {_pair_error(mixed, best, metric):.2f})",
            )
        )
        times = [_ms(p) for p in uniform]
        if not any(math.isnan(t) for t in [*times, _ms(mixed)]):
            inside = min(times) <= _ms(mixed) <= max(times)
            findings.append(
                Finding(
                    "The mixed config costs about as much as the uniform ones.",
                    "holds"
                    if inside or abs(_ms(mixed) / statistics.fmean(times) - 1) < 0.15
                    else "does not hold",
                    f"time per iteration: mixed {_ms(mixed):.0f} ms, uniform "
                    + ", ".join(f"{p.label} {_ms(p):.0f} ms" for p in uniform),
                )
            )
    return findings


def depth_findings(points: Sequence[Point], metric: str) -> list[Finding]:
    """Fig. 2's observation: the return of depth diminishes."""
    ordered = sorted(points, key=lambda p: p.units)
    if len(ordered) < 3:
        return [Finding("Depth has diminishing returns.", "not measured", "needs 3 depths")]
    first, middle, last = ordered[0], ordered[len(ordered) // 2], ordered[-1]

    def slope(a: Point, b: Point) -> tuple[float, float]:
        """Accuracy gained per added unit from ``a`` to ``b``, and its standard error."""
        span = b.units - a.units
        return (b.accuracy(metric) - a.accuracy(metric)) / span, _pair_error(a, b, metric) / span

    (early, early_error), (late, late_error) = slope(first, middle), slope(middle, last)
    return [
        Finding(
            "Adding residual units helps less and less (diminishing return beyond ~100 units).",
            _diff_verdict(early - late, math.hypot(early_error, late_error)),
            "accuracy: "
            + ", ".join(f"{p.label} ({p.units} units) {p.accuracy(metric):.2f}" for p in ordered)
            + f"; gain per added unit {early:+.3f} from {first.label} to {middle.label} vs "
            f"{late:+.3f} from {middle.label} to {last.label}",
        )
    ]


def _interp(curve: Sequence[Point], ms: float, metric: str) -> float | None:
    """Read the curve's accuracy at ``ms`` (linear in log time); None outside its range."""
    curve = sorted(curve, key=_ms)
    xs = [math.log(_ms(p)) for p in curve]
    if len(curve) < 2 or not xs[0] <= math.log(ms) <= xs[-1]:
        return None
    return float(np.interp(math.log(ms), xs, [p.accuracy(metric) for p in curve]))


def scaling_findings(points: Sequence[Point], metric: str) -> list[Finding]:
    """Sec. 5's observations (Fig. 11), comparing families at equal time per iteration."""
    family = {f: [p for p in points if p.family == f] for f in FAMILY_STYLE}
    if any(math.isnan(_ms(p)) for p in points):
        return [Finding("Sec. 5 findings", "not measured", "time per iteration missing")]
    findings = []

    def compare(points_a: Sequence[Point], curve: Sequence[Point]) -> list[tuple[Point, float]]:
        """Accuracy of each point minus the curve's at the same time (or its nearest point)."""
        out = []
        for p in points_a:
            ref = _interp(curve, _ms(p), metric)
            if ref is None and curve:
                # Outside the curve's time range: the curve's closest point stands in.
                nearest = min(curve, key=lambda q: abs(math.log(_ms(q) / _ms(p))))
                ref = nearest.accuracy(metric)
                near[p.config] = f" (outside the IR range; nearest {nearest.label})"
            if ref is not None:
                out.append((p, p.accuracy(metric) - ref))
        return out

    near: dict[str, str] = {}
    poly_vs_ir = compare(sorted(family["polynet"], key=_ms), family["ir"])
    if poly_vs_ir:
        small, large = poly_vs_ir[0], poly_vs_ir[-1]
        findings.append(
            Finding(
                "At a small budget, a deeper IR is as good or better than structural diversity.",
                "holds" if small[1] <= 0 else "does not hold",
                f"{small[0].label} vs the IR curve at {_ms(small[0]):.0f} ms: {small[1]:+.2f}"
                + near.get(small[0].config, ""),
            )
        )
        findings.append(
            Finding(
                "At a large budget, PolyNet beats an IR of the same time per iteration.",
                _diff_verdict(large[1], large[0].stderr(metric) * math.sqrt(2)),
                ", ".join(
                    f"{p.label} at {_ms(p):.0f} ms: {d:+.2f} vs IR{near.get(p.config, '')}"
                    for p, d in poly_vs_ir
                ),
            )
        )
    else:
        findings.append(
            Finding("PolyNet vs IR at equal time", "not measured", "no overlap of time ranges")
        )
    resnet_vs_ir = compare(sorted(family["resnet"], key=_ms), family["ir"])
    if resnet_vs_ir:
        worse = [d for _, d in resnet_vs_ir if d < 0]
        findings.append(
            Finding(
                "Inception-based networks beat ResNets at the same time per iteration.",
                "holds"
                if len(worse) == len(resnet_vs_ir)
                else ("partly" if worse else "does not hold"),
                ", ".join(
                    f"{p.label} at {_ms(p):.0f} ms: {d:+.2f} vs IR{near.get(p.config, '')}"
                    for p, d in resnet_vs_ir
                ),
            )
        )
    else:
        findings.append(
            Finding(
                "Inception-based networks beat ResNets at the same time per iteration.",
                "not measured",
                "the ResNet and IR time ranges do not overlap",
            )
        )
    return findings


FINDINGS = {
    "stages": stages_findings,
    "mixing": mixing_findings,
    "depth": depth_findings,
    "scaling": scaling_findings,
}


def to_markdown(
    study: Study,
    points: Sequence[Point],
    findings: Sequence[Finding],
    metric: str,
    context: dict[str, Any],
    figure: str | None,
) -> str:
    """Render the report: setup, findings with verdicts and numbers, the table, the plot."""
    seeds = max((p.seeds for p in points), default=0)
    images = min((p.eval_images for p in points), default=0)
    lines = [
        f"# Ablation study `{study.name}`: {study.title}",
        "",
        f"Mirrors the paper's {study.figure}. Scale: {context.get('scale')}; data: "
        f"{context.get('data')}; {len(points)} configs, {seeds} seed(s) each, evaluated "
        f"single-crop on {images:,} validation images. Accuracy compared: {metric} "
        f"({'top-5 is saturated with 10 classes' if metric == 'top1' else 'as in the paper'}).",
        "",
    ]
    recipe = context.get("recipe")
    if recipe:
        lines += [f"Recipe (every config): {recipe}", ""]
    typical = statistics.fmean(p.stderr(metric) for p in points) if points else 0.0
    lines += [
        "## Findings",
        "",
        f"Noise: the standard error of one config's {metric} is about {typical:.2f} points "
        f"({'binomial error of the evaluation set' if seeds == 1 else f'over {seeds} seeds'}); "
        "a difference counts as clear only beyond two standard errors of the difference. "
        + (
            "With a single seed, seed-to-seed variation of training is not measured and is "
            "usually larger than the evaluation error, so treat small gaps as unresolved."
            if seeds == 1
            else ""
        ),
        "",
    ]
    for i, f in enumerate(findings, 1):
        lines.append(f"{i}. **{f.claim}** — *{f.verdict}*. {f.evidence}.")
    lines += [
        "",
        "## Results",
        "",
        "| config | group | params | MMACs | ms/iter | top-1 (%) | top-5 (%) | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        spread = f" ± {p.top1_std:.2f}" if p.top1_std is not None else ""
        top5 = f"{p.top5:.2f}" if p.top5 is not None else "-"
        lines.append(
            f"| {p.label}{' (baseline)' if p.baseline else ''} | {p.group or p.family} | "
            f"{p.params:,} | {p.macs / 1e6:.1f} | {_ms(p):.0f} | {p.top1:.2f}{spread} | "
            f"{top5} | {p.seeds} |"
        )
    if figure:
        lines += ["", f"![{study.figure}]({figure})"]
    lines += [
        "",
        "Time per iteration is one training step (forward, backward, optimizer) on one fixed "
        "batch, measured round-robin over all configs in one process so that drift of the "
        "machine's speed cancels; MACs are for one image at the model's input size.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(
    study: Study, rows: Sequence[dict[str, Any]], out: Path, context: dict[str, Any]
) -> list[Path]:
    """Write the tables, the plot and ``report.md`` of a study; return the files written."""
    metric = choose_metric(len(context.get("classes", [])) or 10)
    points = aggregate(study, rows)
    if not points:
        return []
    write_tables(points, rows, out, metric)
    written = [out / "results.csv", out / "results.json"]
    figure = None
    if study.name in PLOTS:
        figure, plot = PLOTS[study.name]
        plot(points, out / figure, metric)
        written.append(out / figure)
    findings = FINDINGS[study.name](points, metric) if study.name in FINDINGS else []
    _write_text(out / "report.md", to_markdown(study, points, findings, metric, context, figure))
    written.append(out / "report.md")
    return written
