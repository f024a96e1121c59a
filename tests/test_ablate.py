"""Ablation studies: study definitions, a tiny study end to end, the cache, resume, findings.

The statistics and verdict rule are tested in test_ablate_stats.py, sharding and --report in
test_ablate_shards.py.
"""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

import polynet
import polynet.ablation.runner as runner
import polynet.ablation.timing as timing
from polynet.ablation import (
    RESNET_LAYERS,
    StudyOptions,
    build_study,
    create_study_model,
    report_study,
    run_study,
)
from polynet.ablation.aggregate import aggregate
from polynet.ablation.findings import depth_findings, mixing_findings, stages_findings
from polynet.ablation.report import write_outputs
from polynet.ablation.stats import FAILS, HOLDS, ONE_SEED, UNRESOLVED
from polynet.cli import main
from polynet.errors import UserError
from polynet.model.zoo import MODELS
from polynet.training.batches import epoch_permutation

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
    # The report states data, scale, recipe, seeds, compute and wall time.
    for line in ("- Data: fashion-mnist (10 classes)", "- Scale: small", "- Recipe (every config)",
                 "steps 2, batch_size 8", "- Seeds: 0", "- Compute:", "- Wall time:",
                 "none missing"):  # fmt: skip
        assert line in report, line
    # One seed: the comparison with the baseline has no interval and is not decided.
    listed = [line for line in report.splitlines() if line.startswith("1. **")]
    assert listed and all(f"— *{ONE_SEED}*" in line for line in listed)
    saved = json.loads((out / "results" / "b_poly3_s0.json").read_text())
    assert saved["steps"] == 2 and saved["model_kwargs"]["spec"].startswith("A: ir x3 | B: poly-3")
    # What the report's compute lines rest on is recorded per pair.
    assert saved["finished_at"] >= saved["started_at"] and saved["world_size"] == 1
    assert saved["device"] == "cpu" and saved["settings"]["batch_size"] == 8
    assert saved["train_curve"] and saved["train_curve"][-1]["step"] == 2

    monkeypatch.setattr(runner, "train", _fail)
    monkeypatch.setattr(timing, "measure_iteration_times", _fail)
    again = run_study("stages", out, tiny_options())
    assert again.trained == [] and again.cached == ["ir_3_6_3_s0", "b_poly3_s0"]
    assert [r["top1"] for r in again.rows] == [float(r["top1"]) for r in rows]

    # A different recipe is refused instead of mixed into the same tables.
    changed = tiny_options()
    changed.train_overrides["steps"] = 3
    with pytest.raises(ValueError, match=r"different recipe \(differs in steps \(saved 2, now 3\)"):
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


def test_a_study_resumes_from_its_committed_results_folder(tmp_path, monkeypatch):
    # ``--out`` is the committed folder, ``--runs`` local scratch. A first machine lands one
    # pair and is cut off; a fresh machine has only the committed folder.
    committed, scratch = tmp_path / "docs" / "stages", tmp_path / "machine1"

    def cut_off(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study("stages", committed, tiny_options(), runs=scratch, after_config=cut_off)
    assert sorted(p.name for p in (committed / "results").iterdir()) == ["ir_3_6_3_s0.json"]
    assert {p.name for p in committed.iterdir()} == {"results", "study.json", "timing.json"}
    shutil.rmtree(scratch)

    monkeypatch.setattr(timing, "measure_iteration_times", _fail)  # timing.json is committed
    run = run_study("stages", committed, tiny_options(), runs=tmp_path / "machine2")
    assert run.cached == ["ir_3_6_3_s0"] and run.trained == ["b_poly3_s0"] and run.reported
    assert not any(p.name == "runs" for p in committed.iterdir())

    # Everything committed: nothing is trained again; another recipe is refused, not mixed.
    monkeypatch.setattr(runner, "train", _fail)
    again = run_study("stages", committed, tiny_options(), runs=tmp_path / "machine3")
    assert again.trained == [] and again.missing == []
    changed = tiny_options()
    changed.train_overrides["batch_size"] = 4
    with pytest.raises(UserError, match="differs in batch_size"):
        run_study("stages", committed, changed, runs=tmp_path / "machine3")

    # --report refuses a folder whose results mix recipes.
    row = json.loads((committed / "results" / "b_poly3_s0.json").read_text())
    row["seed"], row["recipe"]["steps"] = 1, 3
    (committed / "results" / "b_poly3_s1.json").write_text(json.dumps(row))
    with pytest.raises(UserError, match="different recipes.*differ in steps"):
        report_study("stages", committed)


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


# Seed-to-seed noise shared by every config of a seed (the common data order) and a little
# of each config's own.
SEED_NOISE = {0: -1.5, 1: 0.4, 2: 1.1}


def _rows(study, accuracy, seeds=(0, 1, 2), seconds=None):
    """One row per config and seed: ``accuracy[config]`` plus the seed's shared noise."""
    return [
        _row(
            study,
            c.name,
            accuracy[c.name] + SEED_NOISE[s] + 0.05 * ((i + s) % 3 - 1),
            seconds=(seconds or {}).get(c.name, 0.1),
            seed=s,
        )
        for s in seeds
        for i, c in enumerate(study.configs)
    ]


def test_findings_follow_the_numbers():
    study = build_study("stages")
    accuracy, seconds = {"ir_3_6_3": 80.0}, {"ir_3_6_3": 0.1}
    for config in study.configs[1:]:
        gain = {"A": 2.0, "B": 4.0, "C": 2.0}[config.group]
        gain += {"mpoly-3": 1.0, "poly-3": 0.5}.get(config.label, 0.0)
        accuracy[config.name], seconds[config.name] = 80.0 + gain, 0.1 + gain / 10
    findings = stages_findings(aggregate(study, _rows(study, accuracy, seconds=seconds)), "top1")
    verdicts = {f.claim.split(" ")[0] + str(i): f.verdict for i, f in enumerate(findings)}
    assert verdicts["Replacing0"] == HOLDS
    assert verdicts["Enhancing1"] == HOLDS
    assert verdicts["In2"] == HOLDS  # mpoly-3 first, poly-3 second in stage B
    assert findings[-1].verdict == HOLDS  # accuracy rises with time per iteration
    # The intervals behind a verdict are kept: 18 paired differences against the baseline.
    assert len(findings[0].tests) == 18 and all(iv.low > 0 for _, iv in findings[0].tests)
    # In stage A the poly modules' mean is 0.375 points above k-way's, beyond the noise.
    stage_a = next(f for f in findings if f.claim.startswith("In stage A"))
    assert stage_a.verdict == FAILS and "-0.38 [" in stage_a.evidence

    # The same numbers from one seed decide nothing about accuracy; counts still decide.
    one = stages_findings(aggregate(study, _rows(study, accuracy, (0,), seconds)), "top1")
    assert {f.verdict for f in one if "parameter" not in f.claim} == {ONE_SEED}
    assert next(f for f in one if "parameter" in f.claim).verdict in (HOLDS, FAILS)

    mixing = build_study("mixing")
    accuracy = {c.name: 80.0 + i for i, c in enumerate(mixing.configs)}
    claims = {
        f.claim: f.verdict
        for f in mixing_findings(aggregate(mixing, _rows(mixing, accuracy)), "top1")
    }
    assert claims["PolyInception modules in stage B improve on IR 6-12-6."] == HOLDS
    # 3-way, not poly-3, is the best uniform config in these numbers, beyond the noise.
    uniform = "Among uniform configs, poly-3 does slightly better than mpoly-3 and 3-way."
    assert claims[uniform] == FAILS

    depth = build_study("depth")
    # +4 points over the first 17 added units, +1 over the last 133: a diminishing return.
    accuracy = dict(
        zip((c.name for c in depth.configs), [80.0, 82.0, 84.0, 84.3, 84.6, 85.0], strict=True)
    )
    (finding,) = depth_findings(aggregate(depth, _rows(depth, accuracy)), "top1")
    assert finding.verdict == HOLDS and "ResNet-500 (166 units) 85.0" in finding.evidence


def test_pairing_by_seed_resolves_what_unpaired_means_cannot():
    # Seed noise of +-1.5 points shared by both configs; the configs differ by 0.5 points.
    mixing = build_study("mixing")
    accuracy = {c.name: 80.0 for c in mixing.configs} | {"mixed": 80.5}
    points = {p.config: p for p in aggregate(mixing, _rows(mixing, accuracy))}
    mixed, best = points["mixed"].interval("top1"), points["3way"].interval("top1")
    assert mixed.low < best.high  # the two configs' own intervals overlap
    finding = next(
        f
        for f in mixing_findings(list(points.values()), "top1")
        if "mixed config (3-way" in f.claim
    )
    assert finding.verdict == HOLDS  # the paired differences do not

    # Noise of the mixed config's own (+-1 point, not shared by the seed): unresolved, and
    # the report says what difference it could have detected.
    rows = _rows(mixing, accuracy)
    for row, own in zip((r for r in rows if r["config"] == "mixed"), (1.0, -1.0, 0.5), strict=True):
        row["top1"] += own
    finding = next(
        f
        for f in mixing_findings(aggregate(mixing, rows), "top1")
        if "mixed config (3-way" in f.claim
    )
    assert finding.verdict == UNRESOLVED
    assert "paired over 3 seeds; minimum detectable difference" in finding.evidence


def test_seed_s_is_shared_across_configs_and_independent_across_seeds(tmp_path):
    options = tiny_options(seeds=2)
    study = build_study("stages").select(CONFIGS)
    identities = {
        (c.name, s): runner.run_identity(runner.recipe_for(c, options, s, tmp_path / "r"))
        for c in study.configs
        for s in (0, 1)
    }
    # Seed s of two configs: everything but the network is the same, the seed included (same
    # data order, augmentation and subset); two seeds of one config differ only in the seed.
    a, b = identities["ir_3_6_3", 0], identities["b_poly3", 0]
    assert {k for k in a if a[k] != b[k]} == {"model_kwargs"}
    c = identities["ir_3_6_3", 1]
    assert {k for k in a if a[k] != c[k]} == {"seed"}
    # The training loop draws its data order from the seed alone.
    assert torch.equal(epoch_permutation(100, 0, 0), epoch_permutation(100, 0, 0))
    assert not torch.equal(epoch_permutation(100, 0, 0), epoch_permutation(100, 1, 0))


def test_cli_lists_a_study_and_rejects_bad_values(tmp_path, capsys):
    assert main(["ablate", "mixing", "--out", str(tmp_path), "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("mixed")
    assert main(["ablate", "stages", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    assert polynet.ablation.runner.SMALL_RECIPE["epochs"] > 0


@pytest.mark.parametrize("name", ["mixing", "depth", "scaling"])
def test_outputs_of_every_study_from_synthetic_results(tmp_path, name):
    study = build_study(name)
    # In scaling, each family's times fall inside the IR curve's (equal budgets exist).
    seconds = dict(resnet_152=0.12, resnet_269=0.2, resnet_500=0.3, ir_3_6_3=0.1, ir_5_10_5=0.15,
                   ir_6_12_6=0.2, ir_20_56_20=0.5, polynet_3_6_3_2way=0.14,
                   polynet_6_12_6_mixed=0.25, polynet_very_deep=0.45)  # fmt: skip
    rows = [
        _row(study, c.name, 80.0 + i, seconds=seconds.get(c.name, 0.05 * (i + 1)), seed=seed)
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
