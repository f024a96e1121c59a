"""The paper's observations, each checked against a study's numbers by the rule of ``stats``.

An accuracy claim is a set of paired differences (config A minus config B, seed by seed, or a
per-seed statistic such as the mean gain of a stage's six modules); it *holds* or *does not
hold* only where their 95 % intervals exclude zero (:func:`polynet.ablation.stats.verdict`).
Claims about costs (parameter counts, time per iteration) compare measurements that no seed
changes and keep plain holds / does not hold.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from polynet.ablation.aggregate import Point
from polynet.ablation.stats import (
    FAILS,
    HOLDS,
    NOT_MEASURED,
    UNRESOLVED,
    Interval,
    Series,
    all_of,
    describe,
    difference,
    paired,
    verdict,
)

FAMILIES = ("resnet", "ir", "polynet")
# How far in time per iteration the nearest point of the IR curve may be from a point outside
# the curve's range and still stand in for an equal budget.
NEAREST_TOLERANCE = 0.2


@dataclass
class Finding:
    """One observation of the paper checked against the study's numbers.

    Attributes:
        claim: The paper's observation.
        verdict: One of :data:`polynet.ablation.stats.VERDICTS`.
        evidence: The numbers behind the verdict.
        tests: The paired differences it rests on: (what is compared, its interval).

    """

    claim: str
    verdict: str
    evidence: str
    tests: list[tuple[str, Interval | None]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return dict(
            claim=self.claim,
            verdict=self.verdict,
            evidence=self.evidence,
            tests=[dict(compared=n, **(iv.to_dict() if iv else {})) for n, iv in self.tests],
        )


def _claim(
    claim: str,
    tests: Sequence[tuple[str, Interval | None]],
    prefix: str = "",
    claim_positive: bool = True,
) -> Finding:
    """A finding that holds when every one of ``tests`` is resolved in the claimed direction."""
    result = all_of(verdict(iv, claim_positive) for _, iv in tests)
    evidence = "; ".join(f"{name} {describe(iv)}" for name, iv in tests)
    return Finding(claim, result, prefix + evidence + _resolution(tests, result), list(tests))


def _resolution(tests: Sequence[tuple[str, Interval | None]], result: str) -> str:
    """How many seeds the intervals rest on and, if unresolved, what they could have resolved."""
    ivs = [iv for _, iv in tests if iv is not None]
    if not ivs:
        return ""
    seeds = min(iv.n for iv in ivs)
    text = f" (paired over {seeds} seed{'s' if seeds > 1 else ''}"
    detectable = [iv.detectable for iv in ivs if iv.detectable is not None]
    if result == UNRESOLVED and detectable:
        low, high = min(detectable), max(detectable)
        span = f"{low:.2f}" if math.isclose(low, high, rel_tol=0.05) else f"{low:.2f}-{high:.2f}"
        text += f"; minimum detectable difference {span}"
    return text + ")"


def _mean_of(series: Sequence[Series]) -> Series:
    """Per seed, the mean over configs (seeds all of them have)."""
    seeds = set.intersection(*(set(s) for s in series)) if series else set()
    return {s: statistics.fmean(x[s] for x in series) for s in sorted(seeds)}


def _minus(a: Series, b: Series) -> Series:
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def _fmt(p: Point, metric: str) -> str:
    return f"{p.label} {p.mean(metric):.2f}"


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    rx = np.argsort(np.argsort(xs))
    ry = np.argsort(np.argsort(ys))
    if len(xs) < 3 or np.std(rx) == 0 or np.std(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _per_seed_spearman(points: Sequence[Point], metric: str) -> Interval | None:
    """Rank correlation of time per iteration and accuracy, computed within each seed."""
    seeds = sorted(set.intersection(*(set(p.series(metric)) for p in points)))
    values = [
        _spearman([p.ms for p in points], [p.series(metric)[s] for p in points]) for s in seeds
    ]
    kept = [(s, v) for s, v in zip(seeds, values, strict=True) if not math.isnan(v)]
    if not kept:
        return None
    return paired([{s: v for s, v in kept}], lambda v: v[0])


def stages_findings(points: Sequence[Point], metric: str) -> list[Finding]:
    """Sec. 3.2's observations (Fig. 6)."""
    base = next((p for p in points if p.baseline), None)
    variants = [p for p in points if not p.baseline]
    if base is None or not variants:
        return [Finding("Sec. 3.2 findings", NOT_MEASURED, "needs the baseline and variants")]
    s = {p.config: p.series(metric) for p in points}
    findings = [
        _claim(
            "Replacing a stage's Inception residual units by any PolyInception improves on the "
            "baseline.",
            [(f"{p.group} {p.label}", difference(s[p.config], s[base.config])) for p in variants],
            f"each minus {_fmt(base, metric)}: ",
        )
    ]
    stage_mean = {
        g: _mean_of([s[p.config] for p in variants if p.group == g])
        for g in "ABC"
        if any(p.group == g for p in variants)
    }
    if len(stage_mean) == 3:
        gains = ", ".join(
            f"{g} {statistics.fmean(_minus(m, s[base.config]).values()):+.2f}"
            for g, m in stage_mean.items()
            if _minus(m, s[base.config])
        )
        findings.append(
            _claim(
                "Enhancing stage B gives the largest gain.",
                [(f"B minus {g}", difference(stage_mean["B"], stage_mean[g])) for g in ("A", "C")],
                f"mean gain over the six modules: {gains}; ",
            )
        )
    by_label = {p.label: p for p in variants if p.group == "B"}
    if "mpoly-3" in by_label and "poly-3" in by_label:
        poly3 = s[by_label["poly-3"].config]
        tests = [("mpoly-3 minus poly-3", difference(s[by_label["mpoly-3"].config], poly3))]
        tests += [
            (f"poly-3 minus {label}", difference(poly3, s[p.config]))
            for label, p in by_label.items()
            if label not in ("mpoly-3", "poly-3")
        ]
        ranking = sorted(by_label.values(), key=lambda p: -p.mean(metric))
        findings.append(
            _claim(
                "In stage B, mpoly-3 is the best module and poly-3 the runner-up.",
                tests,
                "stage B ranking: " + ", ".join(_fmt(p, metric) for p in ranking) + "; ",
            )
        )
        findings.append(_parameter_ratio(by_label["poly-3"], by_label["mpoly-3"], base))
    for stage in "AC":
        mine = [p for p in variants if p.group == stage]
        kway = [s[p.config] for p in mine if "way" in p.label]
        poly = [s[p.config] for p in mine if "poly" in p.label]
        if kway and poly:
            findings.append(
                _claim(
                    f"In stage {stage}, k-way modules do slightly better than poly and mpoly.",
                    [
                        (
                            "mean of 2-way/3-way minus mean of poly/mpoly",
                            difference(_mean_of(kway), _mean_of(poly)),
                        )
                    ],
                )
            )
    timed = [p for p in points if p.seconds_per_iter is not None]
    if len(timed) >= 3:
        findings.append(
            _claim(
                "More computation generally buys accuracy.",
                [
                    (
                        f"Spearman rank correlation of time per iteration and accuracy over "
                        f"{len(timed)} configs, per seed,",
                        _per_seed_spearman(timed, metric),
                    )
                ],
            )
        )
    return findings


def _parameter_ratio(poly3: Point, mpoly3: Point, base: Point) -> Finding:
    """Stage B's parameters of poly-3 against mpoly-3: a count, no seed involved."""
    if poly3.stage_params and mpoly3.stage_params:
        a, b = poly3.stage_params["stage_b"], mpoly3.stage_params["stage_b"]
        ratio = a / b
        text = f"stage B parameters: poly-3 {a:,}, mpoly-3 {b:,} (ratio {ratio:.2f})"
    else:
        ratio = (poly3.params - base.params + 1) / (mpoly3.params - base.params + 1)
        text = f"parameters: poly-3 {poly3.params:,}, mpoly-3 {mpoly3.params:,}"
    return Finding(
        "poly-3's parameter size is about 1/3 of mpoly-3's.",
        HOLDS if 0.25 <= ratio <= 0.42 else FAILS,
        text + " (a count: no seed involved)",
    )


def mixing_findings(points: Sequence[Point], metric: str) -> list[Finding]:
    """Sec. 3.3's observations (Fig. 8)."""
    base = next((p for p in points if p.baseline), None)
    uniform = [p for p in points if p.group == "uniform"]
    mixed = next((p for p in points if p.group == "mixed"), None)
    s = {p.config: p.series(metric) for p in points}
    findings = []
    others = [*uniform, *([mixed] if mixed else [])]
    if base is not None and others:
        findings.append(
            _claim(
                "PolyInception modules in stage B improve on IR 6-12-6.",
                [(p.label, difference(s[p.config], s[base.config])) for p in others],
                f"each minus {_fmt(base, metric)}: ",
            )
        )
    by_label = {p.label: p for p in uniform}
    if "poly-3" in by_label and len(by_label) > 1:
        ranking = sorted(uniform, key=lambda p: -p.mean(metric))
        findings.append(
            _claim(
                "Among uniform configs, poly-3 does slightly better than mpoly-3 and 3-way.",
                [
                    (
                        f"poly-3 minus {p.label}",
                        difference(s[by_label["poly-3"].config], s[p.config]),
                    )
                    for p in uniform
                    if p.label != "poly-3"
                ],
                "uniform ranking: " + ", ".join(_fmt(p, metric) for p in ranking) + "; ",
            )
        )
    if uniform and mixed is not None:
        findings.append(
            _claim(
                "The mixed config (3-way -> mpoly-3 -> poly-3) x4 beats every uniform config.",
                [
                    (f"mixed minus {p.label}", difference(s[mixed.config], s[p.config]))
                    for p in uniform
                ],
            )
        )
        times = [p.ms for p in uniform]
        if not any(math.isnan(t) for t in [*times, mixed.ms]):
            inside = min(times) <= mixed.ms <= max(times)
            close = abs(mixed.ms / statistics.fmean(times) - 1) < 0.15
            findings.append(
                Finding(
                    "The mixed config costs about as much as the uniform ones.",
                    HOLDS if inside or close else FAILS,
                    f"time per iteration: mixed {mixed.ms:.0f} ms, uniform "
                    + ", ".join(f"{p.label} {p.ms:.0f} ms" for p in uniform)
                    + " (measured once, interleaved: no seed involved)",
                )
            )
    return findings


def depth_findings(points: Sequence[Point], metric: str) -> list[Finding]:
    """Fig. 2's observation: the return of depth diminishes."""
    ordered = sorted(points, key=lambda p: p.units)
    claim = "Adding residual units helps less and less (diminishing return beyond ~100 units)."
    if len(ordered) < 3:
        return [Finding(claim, NOT_MEASURED, "needs 3 depths")]
    first, middle, last = ordered[0], ordered[len(ordered) // 2], ordered[-1]
    early_span, late_span = middle.units - first.units, last.units - middle.units

    def slowdown(v: list[float]) -> float:
        """Gain per added unit early minus late, within one seed."""
        return (v[1] - v[0]) / early_span - (v[2] - v[1]) / late_span

    series = [first.series(metric), middle.series(metric), last.series(metric)]
    return [
        _claim(
            claim,
            [
                (
                    f"gain per added unit from {first.label} to {middle.label} minus from "
                    f"{middle.label} to {last.label}",
                    paired(series, slowdown),
                )
            ],
            "accuracy: "
            + ", ".join(f"{p.label} ({p.units} units) {p.mean(metric):.2f}" for p in ordered)
            + "; ",
        )
    ]


def _curve_at(curve: Sequence[Point], ms: float, metric: str) -> tuple[Series, str]:
    """Per seed, the curve's accuracy at ``ms`` (linear in log time), and how it was read.

    Just outside the curve's time range (within :data:`NEAREST_TOLERANCE`) its nearest
    point stands in, as the text returned says; further out nothing is read (an empty series:
    no equal budget to compare at).
    """
    curve = sorted(curve, key=lambda p: p.ms)
    xs = [math.log(p.ms) for p in curve]
    seeds = sorted(set.intersection(*(set(p.series(metric)) for p in curve)))
    if len(curve) >= 2 and xs[0] <= math.log(ms) <= xs[-1]:
        return {
            s: float(np.interp(math.log(ms), xs, [p.series(metric)[s] for p in curve]))
            for s in seeds
        }, ""
    nearest = min(curve, key=lambda q: abs(math.log(q.ms / ms)))
    if abs(nearest.ms / ms - 1) > NEAREST_TOLERANCE:
        return {}, f" (outside its time range, {curve[0].ms:.0f}-{curve[-1].ms:.0f} ms)"
    return dict(nearest.series(metric)), f" (its nearest point, {nearest.label})"


def scaling_findings(points: Sequence[Point], metric: str) -> list[Finding]:
    """Sec. 5's observations (Fig. 11), comparing families at equal time per iteration."""
    if any(math.isnan(p.ms) for p in points):
        return [Finding("Sec. 5 findings", NOT_MEASURED, "time per iteration missing")]
    family = {f: sorted((p for p in points if p.family == f), key=lambda p: p.ms) for f in FAMILIES}

    def against_ir(
        mine: Sequence[Point], ir_first: bool = False
    ) -> list[tuple[str, Interval | None]]:
        """Per point, its accuracy minus IR's at the same time (or IR's minus its), by seed."""
        tests = []
        for p in mine:
            ir, how = _curve_at(family["ir"], p.ms, metric)
            name = f"{p.label} at {p.ms:.0f} ms"
            if ir_first:
                tests.append((f"IR{how} minus {name}", difference(ir, p.series(metric))))
            else:
                tests.append((f"{name} minus IR{how}", difference(p.series(metric), ir)))
        return tests

    findings = []
    if family["polynet"] and family["ir"]:
        tests = against_ir(family["polynet"])
        findings.append(
            _claim(
                "At a small budget, a deeper IR is as good or better than structural diversity.",
                tests[:1],
                claim_positive=False,
            )
        )
        findings.append(
            _claim(
                "At a large budget, PolyNet beats an IR of the same time per iteration.",
                tests[-1:],
                "every budget: "
                + "; ".join(f"{name} {describe(iv)}" for name, iv in tests[:-1])
                + ("; " if len(tests) > 1 else ""),
            )
        )
    else:
        findings.append(Finding("PolyNet vs IR at equal time", NOT_MEASURED, "needs both families"))
    if family["resnet"] and family["ir"]:
        findings.append(
            _claim(
                "Inception-based networks beat ResNets at the same time per iteration.",
                against_ir(family["resnet"], ir_first=True),
            )
        )
    return findings


FINDINGS: dict[str, Callable[[Sequence[Point], str], list[Finding]]] = {
    "stages": stages_findings,
    "mixing": mixing_findings,
    "depth": depth_findings,
    "scaling": scaling_findings,
}
