import json
import os
import subprocess
import sys

import pytest
import torch

import polynet
from _shared import cli_flags
from polynet.data import build_dataset, eval_transform
from polynet.io.checkpoint import load_checkpoint
from polynet.io.loading import load_model

pytestmark = pytest.mark.skipif(
    not (polynet.data.fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist missing",
)

RUN = dict(
    model="polynet_small",
    model_kwargs=dict(width_mult=0.03125, spec="A: 2-way | B: poly-2 | C: 2-way"),
    data="fashion-mnist",
    train_subset=64,
    batch_size=16,
    epochs=1,
    lr=0.05,
    optimizer="sgd",
    weight_decay=0.0,
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    hflip=0.0,
    val_subset=33,
    final_eval=False,
    workers=0,
    progress=False,
)


def test_two_process_gloo_run_has_the_global_batch_and_one_checkpoint(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "polynet", "train", *cli_flags(dict(RUN, out=str(out))),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes on" in done.stderr
    assert "64 images, 4 steps of 16" in done.stderr  # global batch 16 = 2 x 8

    # Rank 0 alone writes: one checkpoint set, one metrics file.
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["step"] for row in rows] == [4]
    assert rows[0]["val_images"] == 33  # 17 + 16 images, each exactly once

    # The sharded evaluation counted every image once: it equals one process evaluating the
    # same weights (saved after the evaluation) on the same 33 images.
    ddp = load_checkpoint(out / "last.pt")
    assert len(ddp["rng"]) == 2  # every process's RNG state is saved
    model, _ = load_model(out / "last.pt")
    test = build_dataset("fashion-mnist", "test", eval_transform(model.pretrained_cfg))
    images = torch.stack([test[i][0] for i in range(33)])
    labels = torch.tensor([test[i][1] for i in range(33)])
    with torch.no_grad():
        top1 = 100 * (model(images).argmax(1) == labels).float().mean().item()
    assert rows[0]["val_top1"] == pytest.approx(top1)


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "polynet", "train", *cli_flags(dict(RUN, out=str(tmp_path / "x"), sync_bn=True)),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "sync_bn needs CUDA" in done.stderr
