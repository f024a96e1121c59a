"""Ablation studies: study definitions, a tiny study end to end, the cache, resume, findings."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import polynet
import polynet.ablation.runner as runner
from polynet.ablation import (
    RESNET_LAYERS,
    StudyOptions,
    build_study,
    create_study_model,
    run_study,
)
from polynet.ablation.report import (
    aggregate,
    depth_findings,
    mixing_findings,
    stages_findings,
    write_outputs,
)
from polynet.cli import main
from polynet.zoo import MODELS

CONFIGS = ["ir_3_6_3", "b_poly3"]


def tiny_options(**kwargs) -> StudyOptions:
    """Two configs, two steps of eight images, sixteen test images, one timing round."""
    return StudyOptions(
        configs=CONFIGS,
        train_overrides=dict(steps=2, batch_size=8, train_subset=16, threads=1, warmup=0),
        eval_limit=16,
        eval_batch_size=16,
        timing_rounds=1,
        timing_iters=1,
        **kwargs,
    )


def _fail(*args, **kwargs):
    raise AssertionError("a cached config was trained or timed again")


def test_studies_use_registry_specs_on_the_small_variant():
    stages = build_study("stages")
    assert len(stages.configs) == 19 and stages.configs[0].baseline
    for config in stages.configs[1:]:
        registry = f"polynet_3_6_3_{config.name}"
        assert config.model == "polynet_small"
        assert config.model_kwargs["spec"] == MODELS[registry].spec
    full = build_study("stages", "full")
    assert [c.model for c in full.configs[1:]] == [
        f"polynet_3_6_3_{c.name}" for c in stages.configs[1:]
    ]
    mixing = build_study("mixing")
    assert [c.name for c in mixing.configs] == ["ir_6_12_6", "poly3", "mpoly3", "3way", "mixed"]
    depth = build_study("depth")
    assert [c.units for c in depth.configs] == [sum(v) for v in RESNET_LAYERS.values()]
    assert {c.family for c in build_study("scaling").configs} == {"resnet", "ir", "polynet"}
    with pytest.raises(ValueError, match="unknown config"):
        stages.select(["b_poly9"])
    with pytest.raises(ValueError, match="unknown study"):
        build_study("width")


def test_preact_resnet_small_stem_and_path_drop():
    config = build_study("depth").configs[0]
    model = create_study_model(config.model, **config.model_kwargs, num_classes=10)
    assert model.in_chans == 1 and tuple(model.pretrained_cfg["input_size"]) == (1, 28, 28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert len(model.units) == sum(RESNET_LAYERS[50])
    model.set_path_drop(0.3)
    assert model.path_drop_rate == 0.3
    assert model.units[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert isinstance(model.units[0].drop_path, torch.nn.Identity)


def test_two_config_study_end_to_end_then_rerun_uses_cache(tmp_path, monkeypatch):
    out = tmp_path / "stages"
    run = run_study("stages", out, tiny_options())
    assert run.trained == ["ir_3_6_3_s0", "b_poly3_s0"] and run.cached == []
    for name in ("results.csv", "results.json", "report.md", "fig6_stages.png", "timing.json"):
        assert (out / name).is_file(), name
    assert (out / "fig6_stages.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["config"] for r in rows] == CONFIGS
    base, poly3 = rows
    # poly-3 reuses one block three times: the same weights plus a BatchNorm per extra power
    # (3 % at this narrow width), and more computation.
    assert int(base["params"]) < int(poly3["params"]) < 1.05 * int(base["params"])
    assert int(poly3["macs"]) > int(base["macs"]) > 0
    for row in rows:
        assert 0 <= float(row["top1"]) <= float(row["top5"]) <= 100
        assert int(row["eval_images"]) == 16 and float(row["seconds_per_iter"]) > 0
    report = (out / "report.md").read_text()
    assert "## Findings" in report and "IR 3-6-3 (baseline)" in report
    saved = json.loads((out / "results" / "b_poly3_s0.json").read_text())
    assert saved["steps"] == 2 and saved["model_kwargs"]["spec"].startswith("A: ir x3 | B: poly-3")

    monkeypatch.setattr(runner, "train", _fail)
    monkeypatch.setattr(runner, "measure_iteration_times", _fail)
    again = run_study("stages", out, tiny_options())
    assert again.trained == [] and again.cached == ["ir_3_6_3_s0", "b_poly3_s0"]
    assert [r["top1"] for r in again.rows] == [float(r["top1"]) for r in rows]

    # A different recipe is refused instead of mixed into the same tables.
    changed = tiny_options()
    changed.train_overrides["steps"] = 3
    with pytest.raises(ValueError, match="different recipe.*steps"):
        run_study("stages", out, changed)


def test_interrupted_study_resumes_at_the_next_config(tmp_path, monkeypatch):
    out = tmp_path / "stages"

    def crash(row):
        raise KeyboardInterrupt  # killed right after the first config was saved

    with pytest.raises(KeyboardInterrupt):
        run_study("stages", out, tiny_options(), after_config=crash)
    assert sorted(p.name for p in (out / "results").iterdir()) == ["ir_3_6_3_s0.json"]

    trained_specs = []
    real_train = runner.train

    def recording_train(cfg, **kwargs):
        trained_specs.append(cfg.model_kwargs["spec"])
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(runner, "train", recording_train)
    run = run_study("stages", out, tiny_options())
    assert run.cached == ["ir_3_6_3_s0"] and run.trained == ["b_poly3_s0"]
    assert trained_specs == [MODELS["polynet_3_6_3_b_poly3"].spec]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2


def _row(study, name, top1, seconds=0.1, params=1000, seed=0):
    return dict(
        config=name,
        seed=seed,
        params=params,
        macs=params * 10,
        top1=top1,
        top5=99.0,
        eval_images=10_000,
        seconds_per_iter=seconds,
    )


def test_findings_follow_the_numbers():
    study = build_study("stages")
    rows = [_row(study, "ir_3_6_3", 80.0)]
    for config in study.configs[1:]:
        gain = {"A": 2.0, "B": 4.0, "C": 2.0}[config.group]
        gain += {"mpoly-3": 1.0, "poly-3": 0.5}.get(config.label, 0.0)
        rows.append(_row(study, config.name, 80.0 + gain, seconds=0.1 + gain / 10))
    findings = stages_findings(aggregate(study, rows), "top1")
    verdicts = {f.claim.split(" ")[0] + str(i): f.verdict for i, f in enumerate(findings)}
    assert verdicts["Replacing0"] == "holds"
    assert verdicts["Enhancing1"] == "holds"
    assert verdicts["In2"] == "holds"  # mpoly-3 first, poly-3 second in stage B
    assert findings[-1].verdict == "holds"  # accuracy rises with time per iteration

    mixing = build_study("mixing")
    rows = [_row(mixing, c.name, 80.0 + i) for i, c in enumerate(mixing.configs)]
    claims = {f.claim: f.verdict for f in mixing_findings(aggregate(mixing, rows), "top1")}
    assert claims["PolyInception modules in stage B improve on IR 6-12-6."] == "holds"
    # 3-way, not poly-3, is the best uniform config in these numbers.
    uniform = "Among uniform configs, poly-3 does slightly better than mpoly-3 and 3-way."
    assert claims[uniform] == "does not hold"

    depth = build_study("depth")
    # +4 points over the first 17 added units, +1 over the last 133: a diminishing return.
    accuracies = [80.0, 82.0, 84.0, 84.3, 84.6, 85.0]
    rows = [_row(depth, c.name, a) for c, a in zip(depth.configs, accuracies, strict=True)]
    (finding,) = depth_findings(aggregate(depth, rows), "top1")
    assert finding.verdict == "holds" and "ResNet-500 (166 units) 85.00" in finding.evidence


def test_cli_lists_a_study_and_rejects_bad_values(tmp_path, capsys):
    assert main(["ablate", "mixing", "--out", str(tmp_path), "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("mixed")
    assert main(["ablate", "stages", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    assert polynet.ablation.runner.SMALL_RECIPE["steps"] > 0


@pytest.mark.parametrize("name", ["mixing", "depth", "scaling"])
def test_outputs_of_every_study_from_synthetic_results(tmp_path, name):
    study = build_study(name)
    rows = [
        _row(study, c.name, 80.0 + i, seconds=0.05 * (i + 1), seed=seed)
        for i, c in enumerate(study.configs)
        for seed in (0, 1)
    ]
    written = write_outputs(study, rows, tmp_path, dict(scale="small", classes=list("0123456789")))
    assert {p.name for p in written} >= {"results.csv", "results.json", "report.md"}
    figure = next(p for p in written if p.suffix == ".png")
    assert figure.read_bytes()[:4] == b"\x89PNG"
    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(table) == len(study.configs) and {r["seeds"] for r in table} == {"2"}
    report = (tmp_path / "report.md").read_text()
    assert "## Findings" in report and "not measured" not in report.split("## Results")[0]
