"""Crash safety: training killed by SIGKILL and resumed ends bitwise equal to an undisturbed run.

The killed runs are forked from the test process (no interpreter start-up per attempt) and
killed by the parent at moments drawn from a seeded generator, plus two moments forced by
fault hooks installed in the child only: half-way through writing a checkpoint's temporary file
and between the two renames that publish a checkpoint. The distributed case runs under
``torchrun --max-restarts 1`` and kills worker 1 on the first attempt only.
"""

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import polynet
from _shared import TINY, cli_flags
from polynet.cli import main
from polynet.io.checkpoint import load_checkpoint
from polynet.training import loop

pytestmark = pytest.mark.skipif(
    not (polynet.data.fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist missing",
)


# 96 images in batches of 16 for 3 epochs: 18 steps, a checkpoint every 2 steps; stochastic
# paths switch on in epoch 2 so that restored RNG states matter.
RUN = dict(
    model="polynet_small",
    model_kwargs=TINY,
    data="fashion-mnist",
    train_subset=96,
    batch_size=16,
    epochs=3,
    lr=0.05,
    lr_schedule="cosine",
    weight_decay=0.0,
    crop_scale=(0.8, 1.0),
    path_drop_epoch=1,
    path_drop=0.3,
    checkpoint_every=2,
    eval_every=0,
    final_eval=False,
    deterministic=True,
    threads=1,
    workers=0,
    progress=False,
)
TOTAL_STEPS = 18


def assert_same_training_state(expected, actual):
    """Model, optimizer and step counters bitwise equal."""
    assert actual["train_state"]["global_step"] == expected["train_state"]["global_step"]
    assert expected["model"].keys() == actual["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, actual["model"][key]), key
    for key, value in expected["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, actual["optimizer"]["state"][key][name]), (key, name)
    assert expected["scheduler"] == actual["scheduler"]


# ---------------------------------------------------------------------------------------------
# Fault hooks, installed in the forked child only


def _pause(signal_file: Path) -> None:
    signal_file.touch()
    time.sleep(600)  # the parent kills us here


def _install_hook(mode: str, signals: Path) -> None:
    if mode == "mid-write":
        real_save = torch.save

        def half_written(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _pause(signals / "paused")

        torch.save = half_written
    elif mode == "between-renames":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            if Path(dst).name == "last.prev.pt":
                _pause(signals / "paused")

        os.replace = replace
    real_step = loop.Trainer.train_step

    def counted_step(self, images, labels):
        out = real_step(self, images, labels)
        with open(signals / "steps", "a") as f:
            f.write(f"{time.monotonic()}\n")
        return out

    loop.Trainer.train_step = counted_step


def _fork_training(values: dict, mode: str, signals: Path) -> int:
    for name in ("paused", "steps"):
        (signals / name).unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # child: train, never return into pytest
        status = 1
        try:
            _install_hook(mode, signals)
            loop.train(values)
            status = 0
        finally:
            os._exit(status)
    return pid


def _step_times(signals: Path) -> list[float]:
    try:
        return [float(t) for t in (signals / "steps").read_text().split()]
    except FileNotFoundError:
        return []


def _kill_when(pid: int, ready, delay: float = 0.0, timeout: float = 240.0) -> bool:
    """SIGKILL ``pid`` ``delay`` s after ``ready()``; False if it exited first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, "training failed in the child"
            return False
        if ready():
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the training child made no progress")


def test_sigkill_at_random_moments_then_resume_is_bitwise_equal(tmp_path):
    out, signals = tmp_path / "killed", tmp_path / "signals"
    signals.mkdir()
    rng = random.Random(9)
    step_seconds = 0.05  # updated from the child's step times
    # Moments: after a random number of steps plus a random part of a step (so inside a forward,
    # backward, optimizer step or checkpoint write), and two forced ones inside a save.
    plan = ["random", "mid-write", "random", "between-renames", "random", "random"]
    kills, seen_mid_write_tmp, seen_between = 0, False, False
    for attempt, mode in enumerate([*plan, "finish"]):
        values = dict(RUN, out=str(out), resume=attempt > 0)
        pid = _fork_training(values, mode if mode != "random" else "", signals)
        if mode == "finish":
            assert not _kill_when(pid, lambda: False)
            break
        if mode == "random":
            # At most 3 steps per attempt, so the run cannot end before the planned kills.
            after, fraction = rng.randint(1, 2), rng.random()
            killed = _kill_when(
                pid, lambda a=after: len(_step_times(signals)) >= a, fraction * step_seconds
            )
            times = _step_times(signals)
            if len(times) >= 2:
                step_seconds = times[-1] - times[-2]
        else:
            killed = _kill_when(pid, (signals / "paused").exists, 0.0)
            names = {p.name for p in out.iterdir()}
            if mode == "mid-write":
                # A half-written temporary file is on disk; no published checkpoint changed.
                seen_mid_write_tmp = any(n.endswith(".tmp") for n in names)
            else:
                seen_between = "last.prev.pt" in names and "last.pt" not in names
        kills += killed
    assert kills >= 5 and seen_mid_write_tmp and seen_between

    polynet_log = (out / "train.log").read_text()
    assert polynet_log.count("resumed") >= 3
    loop.train(dict(RUN, out=str(tmp_path / "whole")))
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["train_state"]["global_step"] == TOTAL_STEPS
    assert_same_training_state(whole, resumed)
    assert resumed["train_state"]["path_drop_on"]
    # Killed writes leave no stray temporary files once a run has resumed and finished.
    assert not list(out.glob(".*.tmp"))

    # A truncated newest checkpoint is detected, reported and the previous one used: resuming
    # the finished run from last.prev.pt (step 16) recomputes the same final weights.
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    result = loop.train(dict(RUN, out=str(out), resume=True))
    assert result.steps == TOTAL_STEPS
    log = (out / "train.log").read_text()
    assert f"cannot read checkpoint {last}" in log and "trying the previous checkpoint" in log
    assert f"resumed {out} at epoch 3, step 16" in log
    assert_same_training_state(whole, load_checkpoint(last))


def test_resume_refuses_when_no_checkpoint_is_usable(tmp_path, capsys):
    values = dict(RUN, out=str(tmp_path / "run"), epochs=1, checkpoint_every=0)
    loop.train(values)
    for name in ("last.pt", "last.prev.pt"):
        path = tmp_path / "run" / name
        if path.exists():
            path.write_bytes(b"")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.pt")}
    argv = ["train", "--config", str(_yaml(tmp_path, values)), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("polynet: error: no usable checkpoint")
    # The advice keeps the run: it never points at --overwrite, which would delete it.
    assert "--overwrite" not in err[-1] and "another --out" in err[-1]
    # Nothing was overwritten: the broken files stay for the user to inspect.
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.pt")} == before


def _yaml(tmp_path, values):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                    for k, v in values.items()}))  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------
# Distributed: one of two workers dies, torchrun restarts both from the last checkpoint

KILLER = """
import os, signal, sys, time
from polynet.training import loop

step = int(os.environ.get("POLYNET_TEST_KILL_STEP", "0"))
if step and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
    real_step = loop.Trainer.train_step

    def dying_step(self, images, labels):
        if self.state.global_step + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, images, labels)

    loop.Trainer.train_step = dying_step
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "1" and os.environ["RANK"] == "1":
    time.sleep(2)  # rank 0 of the new attempt reaches the store first: stale keys would hang it
from polynet.cli import main
sys.exit(main())
"""

DDP_RUN = dict(RUN, train_subset=64, epochs=2, path_drop_epoch=None, path_drop=0.0)


def _torchrun(tmp_path, out, kill_step):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    flags = cli_flags(dict(DDP_RUN, out=str(out)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--max-restarts", "1", "--monitor-interval", "0.1", str(script), "train", *flags,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", POLYNET_TEST_KILL_STEP=str(kill_step))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path):
    # 8 steps; checkpoints at steps 2, 4 (epoch end), 6 and 8. Worker 1 dies before step 4.
    # The command has no --resume: a restarted worker continues the run by itself.
    log = _torchrun(tmp_path, tmp_path / "killed", kill_step=4)
    assert "Signals.SIGKILL" in log or "exitcode: -9" in log
    assert "resumed" in log and "step 2" in log
    _torchrun(tmp_path, tmp_path / "whole", kill_step=0)
    killed = load_checkpoint(tmp_path / "killed" / "last.pt")
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    assert killed["train_state"]["global_step"] == 8
    assert_same_training_state(whole, killed)


def test_a_restarted_worker_continues_the_run_even_with_overwrite(tmp_path, monkeypatch):
    values = dict(RUN, out=str(tmp_path / "run"), epochs=1, checkpoint_every=0)
    loop.train(values)
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun sets on a restart
    assert loop.train(dict(values, overwrite=True)).steps == 6
    assert "resumed" in (tmp_path / "run" / "train.log").read_text().splitlines()[-1]
    assert last.read_bytes() == before  # not deleted and retrained
