import json
import math
import re

import pytest
import torch
import yaml
from PIL import Image

import polynet
from _shared import TINY, needs_fashion
from polynet.cli import main
from polynet.io.checkpoint import load_checkpoint
from polynet.training import loop
from polynet.training.config import PRESETS, TrainConfig, build_config
from polynet.training.recipe import build_optimizer, build_scheduler

torch.set_num_threads(1)


QUICK = dict(
    model="polynet_small",
    model_kwargs=TINY,
    progress=False,
    final_eval=False,
    workers=0,
    lr=0.05,
    lr_schedule="cosine",
    weight_decay=0.0,
    crop_scale=(0.8, 1.0),
    # Fixed, not chosen from the load average: bitwise comparisons between runs need the same
    # thread count (oneDNN's reductions depend on it).
    threads=1,
)


def fashion_run(tmp_path, name="run", **overrides):
    values = dict(
        QUICK, data="fashion-mnist", train_subset=96, batch_size=16, epochs=2, val_subset=32
    )
    values.update(out=str(tmp_path / name), **overrides)
    return values


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes told apart by stripe direction, 12 RGB images each, 32 px."""
    root = tmp_path_factory.mktemp("stripes")
    for split, count in (("train", 12), ("val", 4)):
        for name, axis in (("horizontal", 0), ("vertical", 1)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                g = torch.Generator().manual_seed(hash((split, name, i)) % 2**31)
                stripes = (torch.arange(32) // 4 % 2).float() * 200 + 20
                img = stripes.view(32, 1) if axis == 0 else stripes.view(1, 32)
                img = (img.expand(32, 32) + torch.rand(32, 32, generator=g) * 30).clamp(0, 255)
                rgb = img.byte().unsqueeze(-1).expand(32, 32, 3).numpy()
                Image.fromarray(rgb).save(root / split / name / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# Recipe


def test_rmsproptf_matches_the_tensorflow_formula_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    model = torch.nn.Module()
    model.w = w
    cfg = TrainConfig(lr=0.5, weight_decay=0.0, momentum=0.9, rms_decay=0.9, rms_eps=1.0)
    optimizer = build_optimizer(model, cfg)
    ms, mom, expected = torch.ones(2), torch.zeros(2), w.detach().clone()
    for g in (torch.tensor([0.5, 2.0]), torch.tensor([-1.0, 3.0])):
        w.grad = g.clone()
        optimizer.step()
        # TensorFlow: ms starts at 1; eps inside the root; lr folded into the momentum buffer.
        ms = 0.9 * ms + 0.1 * g**2
        mom = 0.9 * mom + 0.5 * g / torch.sqrt(ms + 1.0)
        expected = expected - mom
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)
    # First step by hand: ms = 0.9 + 0.1 * 0.25 = 0.925, update = 0.5 * 0.5 / sqrt(1.925).
    assert math.isclose(1.0 - 0.25 / math.sqrt(1.925), 1.0 - 0.25 / math.sqrt(1.925))


def test_paper_preset_schedule_and_linear_lr_scaling():
    cfg = build_config("paper-imagenet", data="unused")
    assert cfg.learning_rate == pytest.approx(0.45)
    assert build_config("paper-imagenet", batch_size=512).learning_rate == pytest.approx(0.9)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler, total = build_scheduler(optimizer, cfg, steps_per_epoch=5005)
    assert total == 560_000
    factor = scheduler.lr_lambdas[0]
    assert [factor(s) for s in (0, 159_999, 160_000, 319_999, 320_000, 480_000, 559_999)] == (
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.001, 0.001])
    )
    # The same shape in epochs: decay every 2 of 7 epochs.
    epochs = TrainConfig(epochs=7, lr_decay_every=2, lr=1.0)
    scheduler, total = build_scheduler(build_optimizer(model, epochs), epochs, steps_per_epoch=10)
    assert total == 70
    assert [scheduler.lr_lambdas[0](s) for s in (19, 20, 40, 69)] == pytest.approx(
        [1, 0.1, 0.01, 0.001]
    )
    # A warm-up shorter than one step (0.1 epochs of a 2-step run) never exceeds the rate.
    short = TrainConfig(steps=2, warmup=0.067, lr_schedule="cosine", lr=1.0)
    scheduler, _ = build_scheduler(build_optimizer(model, short), short, steps_per_epoch=10)
    assert scheduler.lr_lambdas[0](0) == 1.0


# ---------------------------------------------------------------------------------------------
# Configuration errors


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": -0.1}, "lr must be positive"),
        ({"path_drop": 1.5}, "path_drop must be a probability"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"batch_size": "big"}, "'batch_size' must be an integer"),
        ({"crop_scale": [0.5]}, "'crop_scale' must be a list of 2"),
        ({"hflip": True}, "'hflip' must be a number"),
        ({"optimizer": "lbfgs"}, "'optimizer' must be one of"),
        ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
        ({"epoch": 3}, "did you mean 'epochs'"),
        ({"resume": True, "overwrite": True}, "exclude each other"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, values, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError, match=message):
        build_config(config_file=path)


def test_yaml_is_loaded_safely_and_flags_win(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("lr: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        build_config(config_file=evil)
    assert not (tmp_path / "pwned").exists()
    good = tmp_path / "good.yaml"
    good.write_text("preset: fashion-mnist\nepochs: 3\nlr: 0.1\n")
    cfg = build_config(config_file=good, lr=0.2)
    assert (cfg.epochs, cfg.lr, cfg.crop_scale) == (
        3,
        0.2,
        tuple(PRESETS["fashion-mnist"]["crop_scale"]),
    )
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("imagenet-fast")


def test_shipped_configs_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files
    for path in files:
        build_config(config_file=path)


# ---------------------------------------------------------------------------------------------
# Training runs


def test_loss_decreases_on_a_generated_image_folder(tmp_path, folder):
    result = loop.train(
        dict(QUICK, data=str(folder), out=str(tmp_path / "run"), batch_size=8, epochs=4, lr=0.1),
        eval_every=4,
        final_eval=True,
    )
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] * 0.9
    assert result.val_images == 8 and result.final_top1 is not None
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["model_name"] == "polynet_small" and payload["class_names"] == [
        "horizontal",
        "vertical",
    ]
    model, _ = polynet.io.loading.load_model(tmp_path / "run" / "last.pt")
    assert model.num_classes == 2


@needs_fashion
def test_loss_decreases_on_a_fashion_mnist_subset_and_writes_logs(tmp_path):
    result = loop.train(
        fashion_run(tmp_path, train_subset=256, batch_size=32, epochs=3, lr=0.1),
        eval_every=1,
        val_subset=64,
    )
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    out = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.csv", "metrics.json", "curve.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["step"] for row in rows] == [8, 16, 24] and all("val_top1" in r for r in rows)


@needs_fashion
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_resume_mid_epoch_equals_the_uninterrupted_run_bitwise(tmp_path, monkeypatch, amp):
    # Stochastic paths switch on in epoch 2, so the restored RNG state matters too.
    # BatchNorm recalibration before each evaluation must not disturb the RNG streams either.
    # Under bf16 autocast too (on a CPU with or without native bf16).
    run = dict(
        amp=amp,
        deterministic=True,
        checkpoint_every=2,
        path_drop_epoch=1,
        path_drop=0.3,
        epochs=3,
        bn_recalibrate=32,
    )
    loop.train(fashion_run(tmp_path, "full", **run))
    full = load_checkpoint(tmp_path / "full" / "last.pt")

    original = loop.Trainer.train_step
    calls = {"n": 0}

    def interrupted(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 9:  # mid epoch 2 (6 steps per epoch), one step after a checkpoint
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(fashion_run(tmp_path, "split", **run))
    saved = load_checkpoint(tmp_path / "split" / "last.pt")["train_state"]
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 2)
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    loop.train(fashion_run(tmp_path, "split", resume=True, **run))
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")

    assert resumed["train_state"]["global_step"] == full["train_state"]["global_step"] == 18
    assert yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())["amp"] == amp
    # Autocast keeps fp32 master weights and optimizer state.
    assert all(v.dtype in (torch.float32, torch.int64) for v in full["model"].values())
    moments = [t for s in full["optimizer"]["state"].values() for t in s.values()]
    assert all(t.dtype == torch.float32 for t in moments if t.is_floating_point())
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    full_state, resumed_state = full["optimizer"]["state"], resumed["optimizer"]["state"]
    assert full_state.keys() == resumed_state.keys()
    for key, value in full_state.items():
        assert all(torch.equal(value[k], resumed_state[key][k]) for k in value)

    def timeless(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert timeless(full["train_state"]["history"]) == timeless(resumed["train_state"]["history"])
    assert resumed["train_state"]["path_drop_on"] and resumed["train_state"]["path_drop_epoch"] == 1


@needs_fashion
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from polynet.training import step

    real = step.F.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, labels, **kw):
        calls["n"] += 1
        loss = real(logits, labels, **kw)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(step.F, "cross_entropy", poisoned)
    with pytest.raises(loop.TrainingDiverged, match="loss became nan at step 5"):
        loop.train(fashion_run(tmp_path, checkpoint_every=2, eval_every=0))
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert payload["train_state"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())


@needs_fashion
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    real_save = torch.save
    saves = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        loop.train(fashion_run(tmp_path, checkpoint_every=2, eval_every=0))
    out = tmp_path / "run"
    assert load_checkpoint(out / "last.pt")["train_state"]["global_step"] == 4
    assert not list(out.glob(".*.tmp")) and not (out / "last.next.pt").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert (
        loop.train(fashion_run(tmp_path, checkpoint_every=2, eval_every=0, resume=True)).steps == 12
    )


@needs_fashion
def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    loop.train(fashion_run(tmp_path, checkpoint_every=2, eval_every=0, epochs=1))
    last = tmp_path / "run" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    result = loop.train(
        fashion_run(tmp_path, checkpoint_every=2, eval_every=0, epochs=1, resume=True)
    )
    assert result.steps == 6
    assert "trying the previous checkpoint" in (tmp_path / "run" / "train.log").read_text()


@needs_fashion
def test_output_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    loop.train(fashion_run(tmp_path, epochs=1, eval_every=0))
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        loop.train(fashion_run(tmp_path, epochs=1, eval_every=0))
    # An explicit setting that would change the run is refused with a fix that keeps it.
    with pytest.raises(ValueError, match="started with lr=0.05, not 0.3; drop --lr"):
        loop.train(fashion_run(tmp_path, epochs=1, eval_every=0, lr=0.3, resume=True))
    keep = tmp_path / "run" / "notes.txt"
    keep.write_text("mine")
    result = loop.train(fashion_run(tmp_path, epochs=1, eval_every=0, lr=0.3, overwrite=True))
    assert result.steps == 6 and keep.read_text() == "mine"  # only run files are replaced


@needs_fashion
def test_stochastic_paths_switch_on_when_the_gap_opens_and_are_saved(tmp_path, monkeypatch):
    # A validation top-1 of 0 % opens a gap larger than any threshold after epoch 1.
    monkeypatch.setattr(loop.Trainer, "evaluate", lambda self, limit=None: (9.0, 0.0, 10))
    result = loop.train(fashion_run(tmp_path, path_drop_gap=0.5, path_drop=0.2, epochs=2))
    assert [row["path_drop"] for row in result.history] == [0.0, 0.2]
    state = load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]
    assert state["path_drop_on"] and state["path_drop_epoch"] == 1
    assert "stochastic paths on from epoch 2" in (tmp_path / "run" / "train.log").read_text()


@needs_fashion
def test_batchnorm_recalibration_averages_training_images_and_keeps_rng(tmp_path):
    cfg = build_config(**fashion_run(tmp_path, path_drop=0.2))
    trainer = loop.Trainer(cfg)
    try:
        trainer.raw_model.set_path_drop(0.2)
        rng = torch.get_rng_state()
        trainer.recalibrate_batchnorm(40)  # batches of 16, 16, 8
        assert torch.equal(rng, torch.get_rng_state())
        bn = trainer.raw_model.stem.conv1.bn
        assert int(bn.num_batches_tracked) == 3 and bn.momentum == 0.1
        assert trainer.raw_model.path_drop_rate == 0.2
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    finally:
        trainer.close()


def test_path_drop_leaves_eval_output_unchanged():
    model = polynet.create_model("polynet_small", **TINY).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
        model.set_path_drop(0.25)
        assert torch.equal(before, model(x))
        model.train()
        assert not torch.equal(model(x), model(x))  # training draws paths to drop


def test_init_from_loads_weights_without_optimizer_state(tmp_path, folder):
    source = polynet.create_model("polynet_small", num_classes=2, **TINY)
    path = tmp_path / "grown.pt"
    polynet.io.checkpoint.save_checkpoint(
        path,
        dict(
            model_name="polynet_small",
            model_kwargs=dict(TINY, num_classes=2),
            model=source.state_dict(),
        ),
    )
    cfg = build_config(
        **dict(
            QUICK,
            data=str(folder),
            out=str(tmp_path / "run"),
            batch_size=8,
            init_from=str(path),
            model_kwargs={},
        )
    )
    trainer = loop.Trainer(cfg)
    try:
        for key, value in source.state_dict().items():
            assert torch.equal(trainer.raw_model.state_dict()[key], value), key
        assert (
            trainer.raw_model.config.width_mult == TINY["width_mult"]
            and not trainer.optimizer.state
        )
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------
# Command line


@needs_fashion
def test_cli_trains_from_yaml_and_flags_and_prints_top1(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            dict(
                model_kwargs=TINY,
                train_subset=64,
                batch_size=16,
                epochs=1,
                eval_every=0,
                final_eval=False,
                workers=0,
                lr=0.05,
            )
        )
    )
    out = tmp_path / "run"
    argv = [
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--val-subset",
        "50",
        "--final-eval",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "50 " in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 2


def test_cli_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--batch-size" in text and "--crop-scale MIN MAX" in text and "--no-progress" in text


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("bacth_size: 3\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'bacth_size'" in err and "Traceback" not in err
    assert main(["train", "--lr", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "lr must be positive" in capsys.readouterr().err


@needs_fashion
def test_in_memory_evaluation_batches_equal_the_per_image_transform(monkeypatch):
    from polynet.data import build_dataset
    from polynet.evaluation import batches

    dataset = build_dataset("fashion-mnist", "val")
    cfg = dict(polynet.create_model("polynet_small").pretrained_cfg)
    indices = list(range(0, 200, 3))
    assert batches.is_tensor_identity(dataset, cfg)
    fast = list(batches.single_crop_batches(dataset, indices, cfg, 16, 0))
    monkeypatch.setattr(batches, "is_tensor_identity", lambda *args: False)
    slow = list(batches.single_crop_batches(dataset, indices, cfg, 16, 0))
    assert len(fast) == len(slow)
    for (x, y, _), (x_ref, y_ref, _) in zip(fast, slow, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    # A model that resizes (another input size) takes the per-image path.
    assert not batches.is_tensor_identity(dataset, {**cfg, "input_size": (1, 32, 32)})


def test_planned_steps_fit_training_and_evaluations_into_the_budget():
    from polynet.training.budget import (
        EPOCH_END_SECONDS,
        RESERVE_SECONDS,
        Eta,
        EvalWork,
        Speed,
        epoch_work,
        evaluation_work,
        planned_steps,
    )

    speed = Speed(step_seconds=0.1, eval_image_seconds=0.001, recalibration_image_seconds=0.002)
    # An epoch: 10 steps (1 s), 600 validation views (0.6 s), 200 recalibration images (0.4 s)
    # and its end (checkpoint, metrics).
    epoch = 2 + EPOCH_END_SECONDS
    steps = planned_steps(
        speed, 50 * epoch + RESERVE_SECONDS, 10, EvalWork(600, 200), EvalWork(0, 0)
    )
    assert steps == 500
    final = EvalWork(1000, 0)  # a final evaluation outside the epochs costs 1 s
    left = 50 * 1.5 + 1 + RESERVE_SECONDS + 1e-9  # (a hair more: 75 / 0.15 rounds down)
    assert planned_steps(speed, left, 10, EvalWork(0, 0), final) == 500
    assert planned_steps(speed, 1.0, 10, EvalWork(0, 0), EvalWork(0, 0)) == 1  # never nothing
    # Test-time flips double the validation views; evaluating every 2 epochs halves the average.
    cfg = build_config(eval_flip=True, eval_every=2, bn_recalibrate=300, val_subset=None)
    assert evaluation_work(cfg, range(500), 1000) == EvalWork(1000, 300)
    assert epoch_work(cfg, range(500), 1000) == EvalWork(500, 150)
    assert epoch_work(build_config(eval_every=0), range(500), 1000) == EvalWork(0, 0)
    eta = Eta(EvalWork(600, 400), batch_size=10)
    for _ in range(4):
        eta.step(0.1)
    # Before any evaluation: a forward pass costs a third of a training step per image.
    assert eta.seconds_left(10, 2) == pytest.approx(10 * 0.1 + 2 * 1000 * 0.01 / 3)
    eta.evaluated(2.5)
    assert eta.seconds_left(10, 2) == pytest.approx(1.0 + 5.0)
    assert eta.images_per_second == pytest.approx(100)


@needs_fashion
def test_time_budget_plans_the_length_once_and_a_resume_keeps_it(tmp_path, capsys):
    values = dict(QUICK, data="fashion-mnist", out=str(tmp_path / "run"), val_subset=32)
    # Three batches an epoch, fewer than the probe's 15 steps: the probe sees them again.
    result = loop.train(dict(values, time_budget=20.0, train_subset=48, batch_size=16))
    err = capsys.readouterr().err
    assert "time budget 20 s:" in err and "planned" in err
    # The run's first line comes before the plan, and says the precision chosen.
    assert err.index("training polynet_small") < err.index("time budget 20 s:")
    # The folder keeps what was asked beside the plan that was made.
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["time_budget"] == 20.0 and saved["epochs"] == values.get("epochs", 10.0)
    plans = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plans["time_budget"] == 20.0
    assert plans["plans"][-1]["epochs"] == pytest.approx(result.epochs)
    assert result.seconds < 20
    again = loop.train(dict(out=str(tmp_path / "run"), resume=True))
    assert "time budget" not in capsys.readouterr().err  # no second plan
    assert again.steps == result.steps


@needs_fashion
def test_time_budget_is_planned_again_at_every_checkpoint_at_the_runs_pace(
    tmp_path, capsys, monkeypatch
):
    from polynet.training import planning

    monkeypatch.setattr(planning, "REPLAN_AFTER_STEPS", 20)
    values = dict(QUICK, data="fashion-mnist", out=str(tmp_path / "run"), val_subset=32)
    result = loop.train(dict(values, time_budget=20.0, train_subset=160, batch_size=8))
    err = capsys.readouterr().err
    # 20 steps an epoch: a plan at each epoch end, just before its checkpoint (a machine whose
    # pace drifts after the first epoch made a once-re-planned quick start overrun by 14 %).
    replans = [int(n) for n in re.findall(r"re-planned after (\d+) steps", err)]
    assert replans[:2] == [20, 40] and all(step % 20 == 0 for step in replans), replans
    assert replans[-1] > result.steps - 20
    plans = json.loads((tmp_path / "run" / "plan.json").read_text())["plans"]
    assert [p["after_step"] for p in plans[1:3]] == [20, 40]
    assert plans[-1]["epochs"] == pytest.approx(result.epochs)  # what a resume continues
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["train_state"]
    assert saved["planned_epochs"] == pytest.approx(result.epochs)
    assert result.seconds < 20
    # The cosine schedule follows the new length: it reaches zero at the end, not before.
    rates = [row["lr"] for row in result.history]
    assert rates[-1] == pytest.approx(0.0, abs=1e-12) and min(rates[:-1]) > 0
    again = loop.train(dict(out=str(tmp_path / "run"), resume=True))
    assert "re-planned" not in capsys.readouterr().err and again.steps == result.steps


@needs_fashion
def test_ema_weights_are_evaluated_saved_and_resumed_exactly(tmp_path, monkeypatch):
    run = dict(deterministic=True, checkpoint_every=2, epochs=2, ema_decay=0.9, val_subset=32)
    whole = loop.train(fashion_run(tmp_path, "whole", **run))
    saved = load_checkpoint(tmp_path / "whole" / "last.pt")
    # The published weights are the average, not the last training weights.
    assert any(not torch.equal(saved["model"][k], saved["train_model"][k]) for k in saved["model"])
    model, _ = polynet.load_model(tmp_path / "whole" / "last.pt")
    assert model.config == polynet.create_model("polynet_small", **TINY).config
    original = loop.Trainer.train_step
    calls = {"n": 0}

    def interrupted(self, images, labels):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(fashion_run(tmp_path, "split", **run))
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    resumed = loop.train(dict(out=str(tmp_path / "split"), resume=True))
    again = load_checkpoint(tmp_path / "split" / "last.pt")
    for part in ("model", "train_model"):
        for key, value in saved[part].items():
            assert torch.equal(value, again[part][key]), (part, key)
    assert resumed.final_top1 == whole.final_top1
