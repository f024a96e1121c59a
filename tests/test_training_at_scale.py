"""Training that holds at scale: one process group, one step, one evaluation path, one loop,
the settings a caller gave, and run folders that belong to one process.

The GPU path is tested without a GPU where it can be (what the process group is asked for, which
module every collective goes through); the CUDA test runs where CUDA is.
"""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import polynet
from _shared import TINY, cli_flags, needs_fashion
from polynet import distributed
from polynet.cli import main
from polynet.errors import UserError
from polynet.training import loop
from polynet.training.config import TrainConfig
from test_distributed import RUN as TINY_RUN

SRC = Path(polynet.__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# test_distributed's tiny run, validated on 40 images with test-time flips, in fp32 everywhere.
RUN = dict(TINY_RUN, val_subset=40, final_eval=True, eval_flip=True, amp="none")

# ---------------------------------------------------------------------------------------------
# One process group


def test_the_group_made_for_cuda_has_a_backend_for_cpu_tensors(monkeypatch):
    # What init_process_group receives on a CUDA job, checked without a GPU: NCCL alone has no
    # CPU backend, and host-side counts and gathered objects are CPU tensors.
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(seen))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: None)
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    group = distributed.join(torch.device("cuda"))
    backends = dict(part.split(":") for part in seen["backend"].split(","))
    assert backends == {"cpu": "gloo", "cuda": "nccl"}
    assert group.device == torch.device("cuda", 1) and group.rank == 1 and group.enabled
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


def test_a_process_without_torchrun_is_alone_and_its_collectives_return_their_input():
    group = distributed.join(torch.device("cpu"))
    assert not group.enabled and group.is_main and group.world_size == 1
    assert group.sum_numbers(1.5, 2.0) == [1.5, 2.0]
    assert group.from_main("plan") == "plan" and group.gather(3) == [3]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_one_module_touches_torch_distributed_or_reads_the_rank():
    for path in SRC.rglob("*.py"):
        if path.name == "distributed.py" and path.parent == SRC:
            continue
        text = path.read_text()
        assert "torch.distributed" not in _imports(path), path
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC"):
            assert f'"{name}' not in text and f"'{name}" not in text, (path, name)


# A launcher that records, in every process, which module called each collective of
# torch.distributed, then runs the polynet command line.
RECORDER = """
import json, os, sys
import torch.distributed as dist

calls = []
for name in ("all_reduce", "all_gather_object", "broadcast_object_list", "barrier", "broadcast",
             "all_gather", "reduce", "gather_object", "scatter_object_list"):
    real = getattr(dist, name)

    def wrapper(*args, _real=real, _name=name, **kwargs):
        calls.append([_name, sys._getframe(1).f_globals.get("__name__", "?")])
        return _real(*args, **kwargs)

    setattr(dist, name, wrapper)
from polynet.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open(os.environ["RECORD"] + os.environ["RANK"], "w") as f:
        json.dump(calls, f)
sys.exit(code)
"""


def _torchrun(tmp_path: Path, argv: list[str], record: str) -> subprocess.CompletedProcess:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    env = dict(os.environ, OMP_NUM_THREADS="1", RECORD=str(tmp_path / record))
    command = [*TORCHRUN, "--nproc_per_node", "2", str(script), *argv]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _callers(tmp_path: Path, record: str) -> set[str]:
    calls = [c for rank in (0, 1) for c in json.loads((tmp_path / f"{record}{rank}").read_text())]
    return {module for _, module in calls}


@needs_fashion
def test_two_gloo_processes_train_and_eval_alike_through_the_one_group(tmp_path):
    out = tmp_path / "ddp"
    done = _torchrun(tmp_path, ["train", *cli_flags(dict(RUN, out=str(out)))], "train")
    result = json.loads((out / "result.json").read_text())
    _torchrun(
        tmp_path,
        [
            "eval", "--checkpoint", str(out / "last.pt"), "--data", "fashion-mnist",
            "--limit", "40", "--flip", "--precision", "fp32", "--batch-size", "32",
            "--workers", "0", "--no-progress", "--json", str(tmp_path / "eval.json"),
        ],
        "eval",
    )  # fmt: skip
    report = json.loads((tmp_path / "eval.json").read_text())
    # The top-1 training prints (validation through the engine) is what eval reports.
    assert report["runtime"]["processes"] == 2 and report["metrics"]["images"] == 40
    assert report["metrics"]["top1_accuracy"] == result["final_top1"]
    assert f"top-1 {result['final_top1']:.2f}% on 40 test images" in done.stdout
    # Every collective that polynet makes goes through polynet.distributed.
    for record in ("train", "eval"):
        callers = _callers(tmp_path, record)
        ours = {c for c in callers if c.startswith("polynet")}
        assert ours == {"polynet.distributed"}, (record, callers)


@needs_fashion
def test_one_process_train_prints_the_top1_that_eval_reports(tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["train", *cli_flags(dict(RUN, out=str(out)))]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert f"top-1 {result['final_top1']:.2f}%" in printed
    argv = ["eval", "--checkpoint", str(out / "last.pt"), "--data", "fashion-mnist"]
    argv += ["--limit", "40", "--flip", "--precision", "fp32", "--batch-size", "64"]
    assert main([*argv, "--workers", "0", "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["metrics"]["top1_accuracy"] == result["final_top1"]
    assert report["metrics"]["loss"] == pytest.approx(result["final_loss"], rel=1e-6)
    log = (out / "train.log").read_text()
    unflipped = report["metrics"]["top1_accuracy_unflipped"]
    assert f"({unflipped:.2f}% without)" in log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_fashion
def test_cuda_one_process_nccl_group_steps_validates_and_plans(tmp_path):
    out = tmp_path / "cuda"
    values = dict(RUN, out=str(out), device="cuda", amp="bf16", time_budget=60.0, epochs=None)
    values.pop("epochs")
    command = [*TORCHRUN, "--nproc_per_node", "1", "-m", "polynet", "train", *cli_flags(values)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 process on cuda:0" in done.stderr and "time budget 60 s" in done.stderr
    assert json.loads((out / "result.json").read_text())["final_top1"] is not None


# ---------------------------------------------------------------------------------------------
# One loop: a re-plan never drops or repeats a sample


@needs_fashion
def test_a_replan_that_lengthens_the_run_mid_epoch_drops_and_repeats_no_sample(
    tmp_path, monkeypatch
):
    from polynet.training import batches, planning

    # 30 steps an epoch; plans at steps 25, 50, 75: 70 steps, then 55 (the second epoch would
    # end at step 55), then 90 (it goes on through its whole permutation after all).
    lengths = iter([70, 30, 40, 15, 15])
    monkeypatch.setattr(planning.BudgetPlan, "_steps_fitting", lambda self, speed: next(lengths))
    seen: dict[int, list[int]] = {}
    real = batches.TensorTrainBatches.__call__

    def recorded(self, indices, epoch, step):
        seen.setdefault(epoch, []).extend(indices.tolist())
        return real(self, indices, epoch, step)

    monkeypatch.setattr(batches.TensorTrainBatches, "__call__", recorded)
    values = dict(RUN, out=str(tmp_path / "r"), train_subset=480, checkpoint_every=25)
    values.update(time_budget=1000.0, eval_every=0, final_eval=False, eval_flip=False)
    result = loop.train(values)
    assert result.steps == 90
    # Epoch 0 also fed the probe; epoch 1 is the one the old plan would have cut at step 55.
    assert len(seen[1]) == len(set(seen[1])) == 480  # every training image, once
    assert sorted(seen[1]) == sorted(seen[2])
    plans = json.loads((tmp_path / "r" / "plan.json").read_text())["plans"]
    assert [p["steps"] for p in plans] == [70, 55, 90, 90]


# ---------------------------------------------------------------------------------------------
# The API knows what was given


@needs_fashion
def test_a_preset_run_continues_from_a_trainconfig_that_names_only_out_and_resume(tmp_path):
    out = str(tmp_path / "preset")
    first = dict(preset="fashion-mnist", model_kwargs=TINY, steps=4, train_subset=64)
    first.update(batch_size=16, val_subset=16, out=out, progress=False, threads=1, workers=0)
    interrupted = dict(first)
    with pytest.raises(KeyboardInterrupt):
        original = loop.Trainer.train_step
        calls = {"n": 0}

        def stop(self, images, labels):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return original(self, images, labels)

        loop.Trainer.train_step = stop
        try:
            loop.train(interrupted | dict(checkpoint_every=2))
        finally:
            loop.Trainer.train_step = original
    result = loop.train(TrainConfig(out=out, resume=True))
    assert result.steps == 4 and result.config.crop_scale == (0.85, 1.0)


@needs_fashion
@pytest.mark.parametrize("form", ["TrainConfig", "mapping", "cli"])
def test_an_explicit_value_equal_to_the_default_counts_as_given(tmp_path, capsys, form):
    out = str(tmp_path / "run")
    loop.train(dict(RUN, out=out, steps=1, crop_scale=(0.85, 1.0), final_eval=False))
    # (0.08, 1.0) is TrainConfig's default; the run was started with (0.85, 1.0).
    if form == "cli":
        assert main(["train", "--out", out, "--resume", "--crop-scale", "0.08", "1.0"]) == 2
        message = capsys.readouterr().err
    else:
        given = (
            TrainConfig(out=out, resume=True, crop_scale=(0.08, 1.0))
            if form == "TrainConfig"
            else {"out": out, "resume": True, "crop_scale": [0.08, 1.0]}
        )
        with pytest.raises(UserError) as err:
            loop.train(given)
        message = str(err.value)
    assert "started with crop_scale=[0.85, 1.0], not [0.08, 1.0]" in message


def test_a_config_knows_the_settings_it_was_given():
    from polynet.training.config import build_config

    assert TrainConfig(out="x", resume=True).given == {"out", "resume"}
    assert TrainConfig(crop_scale=(0.08, 1.0)).given == {"crop_scale"}
    built = build_config(preset="fashion-mnist", epochs=2)
    assert {"crop_scale", "epochs", "model"} <= built.given and "seed" not in built.given


# ---------------------------------------------------------------------------------------------
# A run folder belongs to the process training in it


@needs_fashion
def test_a_folder_in_use_is_refused_at_once_and_taken_over_when_its_holder_died(tmp_path, capsys):
    out = tmp_path / "busy"
    values = dict(RUN, out=str(out), epochs=400, eval_every=0, final_eval=False)
    holder = subprocess.Popen(
        [sys.executable, "-m", "polynet", "train", *cli_flags(values)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").is_file():  # started, and saved a checkpoint
            assert holder.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        config_before = (out / "config.yaml").read_text()
        for extra in ([], ["--overwrite"]):
            started = time.time()
            code = main(["train", *cli_flags(dict(values, epochs=1)), *extra])
            err = capsys.readouterr().err
            assert code == 2 and time.time() - started < 10
            assert f"is in use by pid {holder.pid} on" in err and err.count("\n") == 1
            assert (out / "config.yaml").read_text() == config_before  # untouched
        assert holder.poll() is None  # still training
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
    # The holder died: its folder, moved elsewhere, is taken over by a resume.
    moved = tmp_path / "moved"
    out.rename(moved)
    original = loop.Trainer.train_step

    def stop(self, images, labels):
        raise KeyboardInterrupt  # the resumed run has claimed the folder and loaded its weights

    loop.Trainer.train_step = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.train(dict(out=str(moved), resume=True, progress=False, threads=1))
    finally:
        loop.Trainer.train_step = original
    assert "resumed " in (moved / "train.log").read_text()
    assert not (moved / ".lock").exists()  # released when the resumed run ended


def test_step_totals_add_on_the_device_and_name_the_first_non_finite_step():
    from polynet.training.step import StepOutput, StepTotals

    totals = StepTotals(torch.device("cpu"))
    for step, loss in enumerate([0.5, float("nan"), float("inf"), 1.0], start=1):
        totals.add(StepOutput(torch.tensor(loss), torch.tensor(2), 4), step)
    loss_sum, correct, images, bad = totals.read(distributed.SINGLE)
    assert (loss_sum, correct, images) == (6.0, 8.0, 16.0)  # finite losses x images
    assert bad[0] == 2 and bad[1] != bad[1]  # the first non-finite step, its loss (nan)
    totals.add(StepOutput(torch.tensor(0.25), torch.tensor(1), 4), 5)
    loss_sum, correct, images, bad = totals.read(distributed.SINGLE)
    assert (loss_sum, correct, images, bad) == (1.0, 1.0, 4.0, None)  # reset after a read
