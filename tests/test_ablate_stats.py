"""The statistics of the ablation reports: Student's t, intervals, paired verdicts."""

from __future__ import annotations

import math

import pytest

from polynet.ablation import build_study
from polynet.ablation.aggregate import aggregate
from polynet.ablation.findings import scaling_findings
from polynet.ablation.stats import (
    FAILS,
    HOLDS,
    NOT_MEASURED,
    ONE_SEED,
    UNRESOLVED,
    all_of,
    difference,
    interval,
    t_cdf,
    t_quantile,
    verdict,
)

# Two-sided 95 % and one-sided 80 % quantiles of Student's t, from printed tables.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 30: 2.042}
T_80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 9: 0.883, 30: 0.854}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantiles_match_the_printed_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=6e-4)
    if df in T_80:
        assert t_quantile(0.80, df) == pytest.approx(T_80[df], abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-t_quantile(0.975, df))
    assert t_cdf(0.0, df) == 0.5 and t_cdf(1e9, df) == pytest.approx(1.0)


def test_t_quantile_tends_to_the_normal_one():
    assert t_quantile(0.975, 2000) == pytest.approx(1.96, abs=2e-3)
    with pytest.raises(ValueError, match="positive integer"):
        t_cdf(1.0, 0)


def test_interval_and_minimum_detectable_difference():
    iv = interval([1.0, 2.0, 3.0], seeds=[0, 1, 2])
    assert iv.mean == 2.0 and iv.sd == 1.0 and iv.n == 3
    assert iv.half_width == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    # (t_0.975 + t_0.80) with 2 degrees of freedom, times sd / sqrt(n).
    assert iv.detectable == pytest.approx((4.3027 + 1.0607) / math.sqrt(3), rel=1e-4)
    one = interval([5.0])
    assert one.half_width is None and one.detectable is None and one.low is None


def test_verdicts_need_the_interval_to_exclude_zero():
    assert verdict(interval([0.5, 0.6, 0.7])) == HOLDS
    assert verdict(interval([0.5, 0.6, 0.7]), claim_positive=False) == FAILS
    assert verdict(interval([-0.5, -0.6, -0.7])) == FAILS
    assert verdict(interval([-0.5, 0.6, 0.7])) == UNRESOLVED  # mean > 0, interval spans 0
    assert verdict(interval([3.0])) == ONE_SEED
    assert verdict(None) == NOT_MEASURED
    assert all_of([HOLDS, HOLDS]) == HOLDS
    assert all_of([HOLDS, UNRESOLVED]) == UNRESOLVED
    assert all_of([UNRESOLVED, FAILS, HOLDS]) == FAILS
    assert all_of([ONE_SEED, HOLDS]) == ONE_SEED
    assert all_of([NOT_MEASURED, HOLDS]) == NOT_MEASURED


def test_differences_pair_by_seed_over_the_common_seeds():
    a = {0: 80.0, 1: 85.0, 2: 78.0, 3: 90.0}
    b = {0: 79.0, 1: 84.0, 2: 77.0}  # seed 3 missing: compared over seeds 0-2 only
    diff = difference(a, b)
    assert diff.seeds == (0, 1, 2) and diff.mean == pytest.approx(1.0)
    assert diff.half_width == pytest.approx(0.0) and verdict(diff) == HOLDS
    assert difference(a, {7: 1.0}) is None


def _scaling_rows(ir_ms, poly_ms):
    study = build_study("scaling")
    times = dict(zip(["ir_3_6_3", "ir_5_10_5", "ir_6_12_6", "ir_20_56_20"], ir_ms, strict=True))
    times.update(
        zip(
            ["polynet_3_6_3_2way", "polynet_6_12_6_mixed", "polynet_very_deep"],
            poly_ms,
            strict=True,
        )
    )
    times.update(resnet_152=ir_ms[0], resnet_269=ir_ms[1], resnet_500=ir_ms[2])
    rows = [
        dict(config=c.name, seed=s, params=1, macs=1, top1=80.0 + i + 0.1 * s, top5=99.0,
             eval_images=100, seconds_per_iter=times[c.name] / 1000)
        for s in range(3)
        for i, c in enumerate(study.configs)
    ]  # fmt: skip
    return study, rows


def test_scaling_compares_at_equal_time_only():
    study, rows = _scaling_rows([100, 200, 300, 900], [150, 400, 1000])
    findings = scaling_findings(aggregate(study, rows), "top1")
    large = next(f for f in findings if f.claim.startswith("At a large budget"))
    # 1000 ms is 11 % beyond IR's slowest point: that point stands in, and says so.
    assert "nearest point, IR 20-56-20" in large.evidence and large.verdict != NOT_MEASURED
    study, rows = _scaling_rows([100, 200, 300, 400], [150, 250, 1000])
    findings = scaling_findings(aggregate(study, rows), "top1")
    large = next(f for f in findings if f.claim.startswith("At a large budget"))
    assert large.verdict == NOT_MEASURED and "outside its time range, 100-400 ms" in large.evidence
