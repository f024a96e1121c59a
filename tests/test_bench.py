"""The benchmark runs end to end in quick mode (a smoke test: no timing is asserted)."""

import json

import pytest

from polynet.bench import BenchConfig, measure_memory, run_benchmark, to_markdown
from polynet.cli import main

OURS = ("polynet", "polynet-fused", "polynet-naive", "polynet-ckpt")


@pytest.fixture(scope="module")
def report():
    cfg = BenchConfig.quick_config(candidates=OURS, memory=False, threads=1)
    return run_benchmark(cfg)


def test_quick_report_has_every_candidate_and_mode(report):
    rows = {(r["candidate"], r["mode"]): r for r in report["results"]}
    expected = {(n, "infer") for n in OURS if n != "polynet-ckpt"}
    expected |= {("polynet", "train"), ("polynet-ckpt", "train")}
    assert set(rows) == expected
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["gmacs_per_image"] > 0
        assert 0 < row["fraction_of_matmul_peak"]
    assert report["matmul_peak_gflops"] > 0


def test_macs_show_the_cascaded_saving_and_fusion_keeps_the_work(report):
    rows = {(r["candidate"], r["mode"]): r for r in report["results"]}
    cascaded = rows["polynet", "infer"]["gmacs_per_image"]
    # Naive evaluation recomputes F(x) and F^2(x) of every poly-3: strictly more work.
    assert rows["polynet-naive", "infer"]["gmacs_per_image"] > 1.1 * cascaded
    assert rows["polynet-fused", "infer"]["gmacs_per_image"] == pytest.approx(cascaded, rel=0.02)
    # Checkpointing recomputes the forward inside the backward.
    ckpt, plain = rows["polynet-ckpt", "train"], rows["polynet", "train"]
    assert ckpt["gmacs_per_image"] > plain["gmacs_per_image"]


def test_markdown_lists_every_row(report):
    table = to_markdown(report)
    assert table.count("| polynet") == len(report["results"])
    assert "matmul peak" in table


def test_memory_is_measured_in_a_fresh_process():
    cfg = BenchConfig.quick_config(threads=1)
    row = measure_memory(cfg, "polynet", "infer")
    assert row["peak_mib"] >= row["before_mib"] > 0


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["bench", "--quick", "--candidates", "polynet", "--no-train", "--no-memory"]
    assert main([*argv, "--threads", "1", "--json", str(out), "--markdown", str(md)]) == 0
    data = json.loads(out.read_text())
    assert [r["candidate"] for r in data["results"]] == ["polynet"]
    assert "| polynet | infer |" in md.read_text()
    assert "| polynet | infer |" in capsys.readouterr().out


def test_cli_rejects_unknown_candidates(capsys):
    assert main(["bench", "--quick", "--candidates", "resnet50", "--no-memory"]) == 2
    assert "unknown candidates ['resnet50']" in capsys.readouterr().err


def test_cli_measures_training_alone_and_refuses_to_measure_nothing(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--candidates", "polynet", "--no-memory", "--threads", "1"]
    assert main([*argv, "--no-infer", "--json", str(out)]) == 0
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["train"]
    capsys.readouterr()
    assert main([*argv, "--no-infer", "--no-train"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
