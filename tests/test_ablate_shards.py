"""Studies split over jobs (--shard K/N) sharing one folder, merged by --report."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from polynet.ablation import Shard, build_study
from polynet.cli import main
from polynet.errors import UserError
from polynet.io.checkpoint import load_checkpoint

CONFIGS = ["ir_3_6_3", "b_poly3"]
TINY = [
    "--steps", "2", "--batch-size", "8", "--train-subset", "16", "--eval-limit", "16",
    "--timing-rounds", "1", "--timing-iters", "1", "--threads", "1",
]  # fmt: skip


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_partition_every_pair_once_whatever_the_selection(count):
    study = build_study("stages")
    pairs = [(c.name, s) for s in range(3) for c in study.configs]
    owners = {p: [k for k in range(1, count + 1) if Shard(k, count).owns(study, *p)] for p in pairs}
    assert all(len(o) == 1 for o in owners.values())
    sizes = [sum(o == [k] for o in owners.values()) for k in range(1, count + 1)]
    assert max(sizes) - min(sizes) <= 1
    # Neighbours in the study (seed-major) go to different jobs: a mix of configs each.
    if count > 1:
        assert owners["ir_3_6_3", 0] != owners["a_2way", 0]
    assert Shard.parse(" 2 / 4 ") == Shard(2, 4) and str(Shard(2, 4)) == "2/4"


@pytest.mark.parametrize("spec", ["3/2", "0/2", "x", "1/0", "2", "-1/2", "1/2/3"])
def test_bad_shard_spec_is_one_line_naming_the_fix(tmp_path, capsys, spec):
    with pytest.raises(UserError, match=r"--shard takes K/N"):
        Shard.parse(spec)
    assert main(["ablate", "stages", "--out", str(tmp_path), f"--shard={spec}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shard 1/4" in err[0] and repr(spec) in err[0]
    assert not (tmp_path / "results").exists()


def test_report_refuses_training_flags_and_an_empty_folder(tmp_path, capsys):
    assert main(["ablate", "stages", "--out", str(tmp_path), "--report", "--shard", "1/2"]) == 2
    assert "drop --shard" in capsys.readouterr().err
    assert main(["ablate", "stages", "--out", str(tmp_path), "--report"]) == 2
    assert "no results of study 'stages'" in capsys.readouterr().err


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "polynet", "ablate", "stages", *args]


def test_two_processes_split_a_study_over_one_folder_then_report_merges(tmp_path, capsys):
    out, runs = tmp_path / "shared", tmp_path / "runs"
    common = ["--out", str(out), "--runs", str(runs), "--seeds", "2", "--configs", *CONFIGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = [
        subprocess.Popen(
            _cli(*common, *TINY, "--shard", f"{k}/2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in (1, 2)
    ]
    logs = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stderr[-2000:]
        logs.append(stdout + stderr)
    trained = [set(re.findall(r"training (\S+_s\d) \(", log)) for log in logs]
    everything = {f"{c}_s{s}" for c in CONFIGS for s in (0, 1)}
    assert trained[0] | trained[1] == everything and not trained[0] & trained[1]
    assert all(len(t) == 2 for t in trained)
    assert "timing 2 configs" in logs[0] and "timing 2 configs" not in logs[1]  # job 1 times
    assert {p.stem for p in (out / "results").glob("*.json")} == everything
    assert not (out / "runs").exists()  # checkpoints went to --runs
    # Two seeds of one config are independent runs (different initialisation).
    first, second = (load_checkpoint(runs / f"ir_3_6_3_s{s}" / "last.pt") for s in (0, 1))
    key = next(k for k, v in first["model"].items() if v.is_floating_point() and v.dim() == 4)
    assert not torch.equal(first["model"][key], second["model"][key])

    assert main(["ablate", "stages", "--out", str(out), "--report"]) == 0
    assert "0 trained, 4 cached; report" in capsys.readouterr().out
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["config"], r["seeds"], r["missing_seeds"]) for r in table] == [
        (c, "2", "") for c in CONFIGS
    ]
    merged = json.loads((out / "results.json").read_text())
    assert sorted(f"{r['config']}_s{r['seed']}" for r in merged["runs"]) == sorted(everything)
    assert merged["missing"] == [] and all(r["seconds_per_iter"] for r in merged["runs"])
    report = (out / "report.md").read_text()
    assert "4 config/seed runs; none missing" in report and "(paired over 2 seeds" in report

    # A failing --on-result command is reported; the study (here its report) goes on.
    assert main(["ablate", "stages", "--out", str(out), "--report", "--on-result", "exit 3"]) == 0
    assert "--on-result exited with 3 after report; going on" in capsys.readouterr().err

    # --retime: a quiet pass after jobs that timed beside each other; the recipe the study
    # ran (batch 8, one thread), not the scale's default, and the report takes the new times.
    before = json.loads((out / "timing.json").read_text())
    retime = ["--report", "--retime", "--timing-rounds", "1", "--timing-iters", "1"]
    assert main(["ablate", "stages", "--out", str(out), *retime]) == 0
    assert "timing 2 configs" in capsys.readouterr().err
    after = json.loads((out / "timing.json").read_text())
    assert after["setup"]["batch_size"] == 8 and after["setup"]["threads"] == 1
    assert after["configs"]["ir_3_6_3"]["samples"] != before["configs"]["ir_3_6_3"]["samples"]
    retimed = {r["config"]: r["seconds_per_iter"] for r in json.loads(
        (out / "results.json").read_text())["runs"]}  # fmt: skip
    assert retimed["ir_3_6_3"] == after["configs"]["ir_3_6_3"]["seconds_per_iter"]
    assert main(["ablate", "stages", "--out", str(out), "--retime"]) == 2
    assert "add --report" in capsys.readouterr().err

    # A pair without a result is reported as missing, not dropped from view.
    (out / "results" / "b_poly3_s1.json").unlink()
    assert main(["ablate", "stages", "--out", str(out), "--report"]) == 0
    assert "1 missing" in capsys.readouterr().out
    assert "missing (no result yet): b_poly3_s1" in (out / "report.md").read_text()
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["missing_seeds"] for r in table] == ["", "1"]
    assert json.loads((out / "results.json").read_text())["missing"] == ["b_poly3_s1"]


def test_on_result_commands_of_jobs_sharing_a_folder_run_one_at_a_time(tmp_path):
    # Two jobs' `git commit`s at once collide on git's index lock: the folder lock serialises.
    from concurrent.futures import ThreadPoolExecutor

    from polynet.ablation.results import folder_lock
    from polynet.cli.ablate import _on_result

    log = tmp_path / "log"
    hook = _on_result(f'echo "in $POLYNET_PAIR" >> {log}; sleep 0.3; echo out >> {log}', tmp_path)

    def land(pair: str) -> None:
        with folder_lock(tmp_path):  # as run_study holds it around saving and the hook
            hook(pair)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(land, ["a_s0", "b_s0"]))
    lines = log.read_text().split()
    orders = (["in", a, "out", "in", b, "out"] for a, b in (("a_s0", "b_s0"), ("b_s0", "a_s0")))
    assert lines in list(orders), lines
    assert list(tmp_path.iterdir()) == [log]  # the lock leaves nothing in the folder
