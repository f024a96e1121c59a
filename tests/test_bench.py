"""The benchmark runs end to end in quick mode (a smoke test: no timing is asserted)."""

import json
import time

import pytest
import torch
from torch import nn

from polynet.bench import (
    BenchConfig,
    build_candidates,
    infer,
    measure_memory,
    run_benchmark,
    select,
    targets,
    to_markdown,
)
from polynet.bench import build as bench_build
from polynet.bench.measure import round_robin
from polynet.cli import main
from polynet.errors import UserError
from polynet.model.blocks import ConvNormAct, ConvSpec

OURS = ("polynet", "polynet-fused", "polynet-naive", "polynet-ckpt", "polynet-bf16")


@pytest.fixture(scope="module")
def report():
    cfg = BenchConfig.quick_config(candidates=OURS, memory=False, threads=1)
    return run_benchmark(cfg)


def test_quick_report_has_every_candidate_and_mode(report):
    rows = {(r["candidate"], r["mode"]): r for r in report["results"]}
    expected = {(n, "infer") for n in OURS if n != "polynet-ckpt"}
    expected |= {("polynet", "train"), ("polynet-ckpt", "train"), ("polynet-bf16", "train")}
    assert set(rows) == expected
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["gmacs_per_image"] > 0
        assert 0 < row["fraction_of_matmul_peak"]
    assert report["matmul_peak_gflops"]["fp32"] > 0


def test_each_row_is_divided_by_the_matmul_peak_of_its_precision(report):
    peaks = report["matmul_peak_gflops"]
    assert set(peaks) == {"fp32", "bf16"}
    assert report["precision"]["measured"] == ["fp32", "bf16"]
    for row in report["results"]:
        assert row["precision"] == ("bf16" if row["candidate"] == "polynet-bf16" else "fp32")
        fraction = row["gflops_per_s"] / peaks[row["precision"]]
        assert row["fraction_of_matmul_peak"] == pytest.approx(fraction)


def test_macs_show_the_cascaded_saving_and_fusion_keeps_the_work(report):
    rows = {(r["candidate"], r["mode"]): r for r in report["results"]}
    cascaded = rows["polynet", "infer"]["gmacs_per_image"]
    # Naive evaluation recomputes F(x) and F^2(x) of every poly-3: strictly more work.
    assert rows["polynet-naive", "infer"]["gmacs_per_image"] > 1.1 * cascaded
    assert rows["polynet-fused", "infer"]["gmacs_per_image"] == pytest.approx(cascaded, rel=0.02)
    # Checkpointing recomputes the forward inside the backward.
    ckpt, plain = rows["polynet-ckpt", "train"], rows["polynet", "train"]
    assert ckpt["gmacs_per_image"] > plain["gmacs_per_image"]
    assert rows["polynet-bf16", "train"]["gmacs_per_image"] == plain["gmacs_per_image"]


def test_markdown_lists_every_row(report):
    table = to_markdown(report)
    assert table.count("| polynet") == len(report["results"])
    assert "| polynet-bf16 | train | bf16 |" in table
    assert table.startswith("Precision: fp32, bf16 (")
    assert "matmul peaks" in table


# --- the new candidates against their fp32 references ----------------------------------------


def test_bf16_and_onnx_runtime_candidates_match_their_fp32_references():
    names = ("polynet", "polynet-ort", "polynet-fused-bf16", "port", "port-ort", "port-cl-bf16")
    cfg = BenchConfig.quick_config(candidates=names, threads=1)
    models = build_candidates(cfg)
    x = torch.randn(2, 3, 75, 75, generator=torch.Generator().manual_seed(0))
    out = {name: infer(cfg, name, model.eval(), x).float() for name, model in models.items()}
    out["polynet-bf16"] = infer(cfg, "polynet-bf16", models["polynet"], x).float()
    for name, reference in (("polynet-ort", "polynet"), ("port-ort", "port")):
        assert (out[name] - out[reference]).abs().max() < 1e-3, name
    for name, reference in (
        ("polynet-bf16", "polynet"),
        ("polynet-fused-bf16", "polynet"),
        ("port-cl-bf16", "port"),
    ):
        scale = out[reference].abs().max()
        assert (out[name] - out[reference]).abs().max() < 0.05 * scale, name


class _StandIn(nn.Sequential):
    """A small conv net of PolyNet's layers: quantizing the real models takes a minute each."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(
            ConvNormAct(3, ConvSpec(16, 3, stride=2)),
            ConvNormAct(16, ConvSpec(32, 3, stride=2)),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 1000),
        )


@pytest.fixture
def stand_ins(monkeypatch):
    """Both sources (our model and the port) replaced by one small stand-in."""
    model = _StandIn()
    monkeypatch.setattr(bench_build._Sources, "ours", property(lambda s: model))
    monkeypatch.setattr(bench_build._Sources, "port", property(lambda s: model))
    return model


def test_int8_candidates_agree_with_fp32_on_the_top_1(stand_ins):
    cfg = BenchConfig.quick_config(candidates=("polynet-int8", "port-ort-int8"), threads=1)
    models = build_candidates(cfg)
    x = torch.randn(8, 3, 75, 75, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = stand_ins.eval()(x)
    for name, model in models.items():
        logits = infer(cfg, name, model, x)
        assert torch.equal(logits.argmax(1), expected.argmax(1)), name
        assert (logits - expected).abs().max() < 0.1 * expected.abs().max(), name


def test_like_for_like_run_states_every_target(stand_ins):
    cfg = BenchConfig.quick_config(candidates=("like-for-like",), memory=False, threads=1)
    log = []
    report = run_benchmark(cfg, log=log.append)
    assert log[0].startswith("precision fp32, bf16, int8 (auto: the precisions of the named")
    measured = {r["candidate"] for r in report["results"]}
    assert {"port-ort", "polynet-ort", "port-ort-int8", "polynet-int8", "port-cl-bf16"} <= measured
    assert set(report["matmul_peak_gflops"]) == {"fp32", "bf16", "int8"}
    expected = [t for t in targets(report["precision"]["default"]) if "compiled" not in t.label]
    assert [t["label"] for t in report["targets"]] == [t.label for t in expected]
    rows = {(r["candidate"], r["mode"]): r for r in report["results"]}
    for target in report["targets"]:
        ours, ref = rows[target["ours"], target["mode"]], rows[target["reference"], target["mode"]]
        assert target["ratio"] == pytest.approx(ours["images_per_s"] / ref["images_per_s"])
        assert target["met"] == (target["ratio"] >= target["target"])
    table = to_markdown(report)
    assert "- inference int8: polynet-int8/port-cl-bf16 = " in table
    assert "(target 2.0x: " in table and "peak memory not measured" in table
    assert "| polynet-int8 | infer | int8 |" in table


def test_a_compiled_candidates_first_step_is_timed_apart(report):
    calls = []

    def step():  # the first call stands for the compilation
        calls.append(None)
        time.sleep(0.05 if len(calls) == 1 else 0)

    steps = {"polynet-compiled": step, "polynet": lambda: None}
    cfg = BenchConfig.quick_config()
    times, first = round_robin(steps, cfg, torch.device("cpu"), first={"polynet-compiled"})
    assert set(first) == {"polynet-compiled"} and first["polynet-compiled"] >= 0.05
    assert len(times["polynet-compiled"]) == cfg.reps and times["polynet-compiled"][0] < 0.05
    compiled = {**report, "results": [{**report["results"][0], "compile_s": 61.5}]}
    assert "- polynet infer: first step 61.5 s (compiling), not in the images/s" in to_markdown(
        compiled
    )


# --- choosing what to measure -------------------------------------------------------------------


def test_precision_chooses_the_default_candidates():
    assert select(None, "fp32").precisions == ("fp32",)
    int8 = select(None, "int8")
    assert int8.names == ("polynet-int8", "port-ort-int8")
    every = select(None, "all", compile=True)
    assert {"polynet-ort", "port-ort", "polynet-compiled-bf16"} <= set(every.names)
    named = select(("port-cl-bf16", "polynet-int8"))
    assert named.precisions == ("bf16", "int8") and named.names == ("port-cl-bf16", "polynet-int8")
    with pytest.raises(UserError, match="runs in ONNX Runtime on the CPU"):
        select(("polynet-int8",), "auto", "cuda")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--candidates", "resnet50"], "unknown candidates ['resnet50']"),
        (["--precision", "int4"], "unknown precision 'int4'"),
        (["--precision", "fp32", "--candidates", "port-cl-bf16"], "add bf16 to --precision"),
        (["--amp"], "--amp is replaced by --precision"),
        (["--candidates", "polynet-fused", "--no-infer"], "have no training rows"),
    ],
)
def test_cli_rejects_bad_choices_in_one_line(flags, message, capsys):
    assert main(["bench", "--quick", "--no-memory", *flags]) == 2
    assert message in capsys.readouterr().err


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
    assert data["precision"]["measured"] == ["fp32"] and data["precision"]["requested"] == "auto"
    assert "| polynet | infer | fp32 |" in md.read_text()
    captured = capsys.readouterr()
    assert "| polynet | infer | fp32 |" in captured.out
    assert captured.err.splitlines()[0].startswith("bench: precision fp32 (auto")


def test_cli_measures_training_alone_and_refuses_to_measure_nothing(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--candidates", "polynet", "--no-memory", "--threads", "1"]
    assert main([*argv, "--no-infer", "--json", str(out)]) == 0
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["train"]
    capsys.readouterr()
    assert main([*argv, "--no-infer", "--no-train"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
