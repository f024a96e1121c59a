"""Run a study: time every config, train and evaluate each one with one recipe, cache results.

Layout of a study folder ``OUT``::

    OUT/study.json                 the study, recipe and data (what the results mean)
    OUT/timing.json                time per training iteration of every config (one pass)
    OUT/results/<config>_s<seed>.json   one finished config and seed (the cache)
    OUT/runs/<config>_s<seed>/     the training run (checkpoints, metrics; resumable)
    OUT/results.csv, results.json, report.md, fig*.png   tables, plots and report

A result file is written atomically once a config is trained and evaluated, so a killed study
resumes at the first config without one (and inside that config from its last checkpoint); a
config whose result exists is not trained again unless ``rerun``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polynet.ablation.studies import (
    Study,
    StudyConfig,
    build_study,
    create_study_model,
)
from polynet.checkpoint import atomic_write
from polynet.cost import count_macs, count_params, model_cost
from polynet.data import build_dataset
from polynet.devices import resolve_device
from polynet.evaluation import SingleCrop, evaluate
from polynet.loading import load_model
from polynet.network import PolyNet
from polynet.training import TrainConfig, build_config, run_identity, train

# One recipe for every config of a study. The small scale is the first tuned Fashion-MNIST
# recipe (the paper's RMSProp with epsilon 1.0, cosine decay, mild crops, label smoothing),
# written out here rather than taken from the ``fashion-mnist`` preset so that re-tuning the
# quick start never changes a study's recipe or invalidates its cache; it is cut to a fixed
# number of steps so that the 19 configs of ``stages`` take about an hour on two CPU cores.
# The full scale is the paper's recipe (Sec. 4), whose length is set by the caller.
SMALL_RECIPE: dict[str, Any] = dict(
    model="polynet_small",
    data="fashion-mnist",
    epochs=5,  # unused while ``steps`` is set
    steps=300,
    batch_size=64,
    optimizer="rmsproptf",
    lr_base=0.45,
    lr_base_batch=256,
    lr_schedule="cosine",
    warmup=30,  # steps, since the run length is in steps
    weight_decay=4e-5,
    label_smoothing=0.1,
    crop_scale=(0.7, 1.0),
    hflip=0.5,
    path_drop_gap=3.0,
    bn_recalibrate=2048,
    workers=0,
    channels_last=True,
    log_every=20,
    threads=2,
    checkpoint_every=100,  # a killed config resumes within 100 steps, not from its start
)
FULL_RECIPE: dict[str, Any] = dict(preset="paper-imagenet")
# Settings no study may change: the study evaluates once itself (top-1 and top-5 of the final
# weights) and trains without stochastic paths, whose train/val-gap trigger would switch them on
# at different times for different configs (the paper uses them for very deep models only).
FIXED: dict[str, Any] = dict(eval_every=0, final_eval=False, path_drop=0.0)
# The recipe settings the report lists.
REPORTED = (
    "steps",
    "epochs",
    "batch_size",
    "train_subset",
    "optimizer",
    "learning_rate",
    "lr_schedule",
    "warmup",
    "weight_decay",
    "label_smoothing",
    "crop_scale",
    "hflip",
    "threads",
    "device",
    "amp",
)


@dataclass
class StudyOptions:
    """How to run a study.

    Attributes:
        data: ``"fashion-mnist"`` or an ImageNet-layout folder.
        scale: ``"small"`` or ``"full"``; None picks small for Fashion-MNIST, full otherwise.
        width_mult: Width multiplier (None: the scale's default, see ``build_study``).
        seeds: Seeds per config (0 .. seeds - 1); every config uses the same seeds, so data
            order and augmentation are identical across configs.
        rerun: Train, evaluate and time every selected config again.
        configs: Names of the configs to run (None: all).
        train_overrides: Training settings over the scale's recipe (``steps``, ``epochs``,
            ``batch_size``, ``device``, ``amp``, ``threads``, ``workers``, ...).
        eval_limit: Evaluate on the first this many validation images (None: all).
        eval_batch_size: Images per evaluation forward pass.
        timing_rounds: Interleaved rounds of the timing pass (after one warm-up round).
        timing_iters: Training iterations per config and round.
        progress: Show progress bars.

    """

    data: str = "fashion-mnist"
    scale: str | None = None
    width_mult: float | None = None
    seeds: int = 1
    rerun: bool = False
    configs: Sequence[str] | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)
    eval_limit: int | None = None
    eval_batch_size: int = 256
    timing_rounds: int = 3
    timing_iters: int = 2
    progress: bool = False

    def resolved_scale(self) -> str:
        """Return the scale in use."""
        if self.scale is not None:
            return self.scale
        return "small" if self.data.lower().replace("_", "-") == "fashion-mnist" else "full"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(message: str) -> None:
    if _rank() == 0:
        print(f"polynet ablate: {message}", file=sys.stderr, flush=True)


def _write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=1, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def recipe_for(config: StudyConfig, options: StudyOptions, seed: int, out: Path) -> TrainConfig:
    """Build the training configuration of one config and seed (the study's one recipe)."""
    base = dict(SMALL_RECIPE if options.resolved_scale() == "small" else FULL_RECIPE)
    overrides = {k: v for k, v in options.train_overrides.items() if v is not None}
    if "epochs" in overrides and "steps" not in overrides:
        # A run measured in epochs: the recipe's step count and step-unit warm-up yield.
        base.pop("steps", None)
        base.pop("warmup", None)
    values = {**base, **overrides, **FIXED}
    values.update(
        model=config.model,
        model_kwargs=dict(config.model_kwargs),
        data=options.data,
        seed=seed,
        out=str(out),
        progress=options.progress,
    )
    return build_config(**values)


def _recipe_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that change what a run computes (TrainConfig declares which)."""
    return run_identity(cfg)


def _input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    size = model.pretrained_cfg["input_size"]
    return (int(getattr(model, "in_chans", size[0])), int(size[1]), int(size[2]))


def model_costs(config: StudyConfig, num_classes: int) -> dict[str, Any]:
    """Parameters and MACs (one image at the model's input size) of a config."""
    model = create_study_model(config.model, **config.model_kwargs, num_classes=num_classes)
    model.eval()
    size = _input_size(model)
    if isinstance(model, PolyNet):
        report = model_cost(model, size)
        stage_params = {part: cost.params for part, cost in report.parts.items()}
        return dict(
            params=report.total.params,
            macs=report.total.macs,
            input=list(size),
            stage_params=stage_params,
        )
    macs = count_macs(model, torch.zeros(1, *size))
    return dict(params=count_params(model), macs=macs, input=list(size), stage_params=None)


def _device(name: str) -> torch.device:
    """Return the device a run with ``device=name`` trains on in this process."""
    return resolve_device(name)


def measure_iteration_times(
    configs: Sequence[StudyConfig],
    cfg: TrainConfig,
    num_classes: int,
    rounds: int = 3,
    iters: int = 2,
) -> dict[str, list[float]]:
    """Seconds per training iteration of every config, measured round-robin in one process.

    Every config trains on the same fixed batch with the recipe's optimizer; configs take turns
    (``iters`` iterations each) for ``rounds`` rounds after one warm-up round, so a drift of
    the machine's speed affects all configs alike.

    Args:
        configs: The configs to time.
        cfg: The recipe (batch size, optimizer, device, threads, precision).
        num_classes: Classifier outputs.
        rounds: Measured rounds.
        iters: Iterations per config and round.

    Returns:
        Per config name, one mean seconds-per-iteration per measured round.

    """
    from polynet.training import build_optimizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = max(1, cfg.batch_size // world)
    models, optimizers, inputs = {}, {}, {}
    generator = torch.Generator().manual_seed(0)
    for config in configs:
        model = create_study_model(config.model, **config.model_kwargs, num_classes=num_classes)
        model.to(device).train()
        models[config.name] = model
        optimizers[config.name] = build_optimizer(model, cfg)
        size = _input_size(model)
        if size not in inputs:
            images = torch.randn(batch, *size, generator=generator)
            labels = torch.randint(num_classes, (batch,), generator=generator)
            inputs[size] = (images.to(device), labels.to(device))
    enabled = cfg.amp != "none" and device.type == "cuda"
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {c.name: [] for c in configs}
    for round_index in range(rounds + 1):
        for config in configs:
            model, optimizer = models[config.name], optimizers[config.name]
            images, labels = inputs[_input_size(model)]
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                with torch.autocast(device.type, dtype=dtype, enabled=enabled):
                    loss = F.cross_entropy(model(images).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            sync()
            if round_index:  # round 0 warms up caches, allocators and autotuning
                times[config.name].append((time.perf_counter() - start) / iters)
    return times


def _timing(
    out: Path, study: Study, options: StudyOptions, num_classes: int
) -> dict[str, dict[str, Any]]:
    """Load the timing pass, or measure every config again if any is missing or stale."""
    path = out / "timing.json"
    probe = recipe_for(study.configs[0], options, 0, out / "runs" / "timing")
    identity = dict(
        batch_size=probe.batch_size,
        optimizer=probe.optimizer,
        device=str(_device(probe.device)),
        threads=probe.threads,
        amp=probe.amp,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        rounds=options.timing_rounds,
        iters=options.timing_iters,
    )
    wanted = {c.name: _fingerprint([c.model, c.model_kwargs, identity]) for c in study.configs}
    cached: dict[str, dict[str, Any]] = {}
    if path.is_file() and not options.rerun:
        cached = json.loads(path.read_text()).get("configs", {})
    if all(cached.get(n, {}).get("fingerprint") == f for n, f in wanted.items()):
        return cached
    _say(
        f"timing {len(study.configs)} configs: {options.timing_rounds} interleaved rounds of "
        f"{options.timing_iters} iterations at batch {probe.batch_size} on {identity['device']}"
    )
    times = measure_iteration_times(
        study.configs, probe, num_classes, options.timing_rounds, options.timing_iters
    )
    # Configs timed earlier in another pass are replaced: only one pass is comparable.
    cached = {
        name: dict(
            fingerprint=wanted[name],
            seconds_per_iter=statistics.median(samples),
            samples=samples,
        )
        for name, samples in times.items()
    }
    previous = json.loads(path.read_text()).get("configs", {}) if path.is_file() else {}
    merged = {k: v for k, v in previous.items() if k not in cached}
    merged.update(cached)
    if _rank() == 0:
        _write_json(path, dict(setup=identity, configs=merged))
    return merged


def _evaluate_run(run_dir: Path, data: str, options: StudyOptions) -> dict[str, Any]:
    """Top-1 and top-5 of a run's final weights on the validation split."""
    model, file = load_model(run_dir / "last.pt", factory=create_study_model, adapt=False)
    payload = file.payload
    data_cfg = dict(payload["pretrained_cfg"])
    data_cfg["input_size"] = tuple(data_cfg["input_size"])
    dataset = build_dataset(data, "val")
    cfg = payload["config"]
    device = _device(cfg.get("device", "auto"))
    result = evaluate(
        model,
        dataset,
        SingleCrop(),
        cfg=data_cfg,
        batch_size=options.eval_batch_size,
        device=device,
        limit=options.eval_limit,
        amp=cfg.get("amp", "none") != "none",
        progress=options.progress,
    )
    summary = result.metrics.summary()
    return dict(
        top1=summary["top1_accuracy"],
        top5=summary.get("top5_accuracy"),
        eval_images=int(summary["images"]),
        eval_seconds=result.seconds,
    )


@dataclass
class StudyRun:
    """What :func:`run_study` did.

    Attributes:
        out: The study folder.
        rows: Per config and seed, the cached or new result.
        trained: ``config_s<seed>`` keys trained in this call.
        cached: Keys taken from the cache.

    """

    out: Path
    rows: list[dict[str, Any]]
    trained: list[str]
    cached: list[str]


def run_study(
    study: Study | str,
    out: str | os.PathLike,
    options: StudyOptions | None = None,
    *,
    after_config: Callable[[dict[str, Any]], None] | None = None,
) -> StudyRun:
    """Run a study (or finish a killed one), then write its tables, plots and report.

    Args:
        study: A :class:`Study` or a name from :data:`~polynet.ablation.studies.STUDIES`.
        out: The study folder.
        options: Data, scale, seeds, recipe overrides, caching and timing settings.
        after_config: Called with each new result row once it is saved.

    Returns:
        The rows and which of them were trained now or taken from the cache.

    Raises:
        ValueError: For an unknown study or config, bad settings, or a folder holding results
            of a different recipe (pass ``rerun`` or use another folder).

    """
    from polynet.ablation.report import write_outputs

    options = options or StudyOptions()
    if options.seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {options.seeds}")
    scale = options.resolved_scale()
    if isinstance(study, str):
        study = build_study(study, scale, options.width_mult)
    study = study.select(options.configs)
    out = Path(out)
    is_main = _rank() == 0
    # Validate the recipe and the data before any long work.
    recipe_for(study.configs[0], options, 0, out / "runs" / "check")
    classes = list(build_dataset(options.data, "val").classes)
    rows, trained, cached = [], [], []
    pending = []
    for config in study.configs:
        for seed in range(options.seeds):
            key = f"{config.name}_s{seed}"
            run_dir = out / "runs" / key
            cfg = recipe_for(config, options, seed, run_dir)
            identity = _recipe_identity(cfg)
            result_file = out / "results" / f"{key}.json"
            if result_file.is_file() and not options.rerun:
                saved = json.loads(result_file.read_text())
                if saved.get("fingerprint") != _fingerprint(identity):
                    differs = sorted(
                        k
                        for k in set(identity) | set(saved.get("recipe", {}))
                        if identity.get(k) != saved.get("recipe", {}).get(k)
                    )
                    raise ValueError(
                        f"{result_file} was made with a different recipe (differs in "
                        f"{', '.join(differs) or 'model'}); retrain it with --rerun --configs "
                        f"{config.name} (--rerun alone retrains every config) or choose another "
                        "--out"
                    )
                rows.append(saved)
                cached.append(key)
            else:
                pending.append((config, seed, key, run_dir, cfg, identity, result_file))
    if is_main:
        _write_json(
            out / "study.json",
            dict(
                study=study.name,
                title=study.title,
                figure=study.figure,
                scale=scale,
                data=options.data,
                seeds=options.seeds,
                options={k: v for k, v in asdict(options).items() if k != "configs"},
                configs=[asdict(c) for c in study.configs],
            ),
        )
    # Timing after the cache check, so that a refused folder fails before any long work.
    # Under torchrun every process times on its own device at the same time (no process waits
    # for another outside the training API); the main process records its measurements.
    timing = _timing(out, study, options, len(classes))
    if cached:
        _say(f"{len(cached)} config/seed results cached in {out / 'results'}; not rerun")

    costs: dict[str, dict[str, Any]] = {}
    for index, (config, seed, key, run_dir, cfg, identity, result_file) in enumerate(pending):
        _say(f"[{index + 1}/{len(pending)}] training {key} ({config.label})")
        start = time.time()
        overrides = dict(overwrite=True) if options.rerun else dict(resume=True)
        outcome = train(cfg, model_factory=create_study_model, **overrides)
        if not is_main:
            continue
        if config.name not in costs:
            costs[config.name] = model_costs(config, len(classes))
        row: dict[str, Any] = dict(
            config=config.name,
            seed=seed,
            **{k: v for k, v in asdict(config).items() if k != "name"},
            **costs[config.name],
            **_evaluate_run(run_dir, options.data, options),
            steps=outcome.steps,
            epochs=outcome.epochs,
            train_seconds=outcome.seconds,
            wall_seconds=time.time() - start,
            recipe=identity,
            fingerprint=_fingerprint(identity),
        )
        _write_json(result_file, row)
        rows.append(row)
        trained.append(key)
        _say(f"{key}: top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%")
        if after_config is not None:
            after_config(row)
    if is_main:
        order = {c.name: i for i, c in enumerate(study.configs)}
        rows.sort(key=lambda r: (order[r["config"]], r["seed"]))
        for row in rows:
            row["seconds_per_iter"] = timing.get(row["config"], {}).get("seconds_per_iter")
        recipe = recipe_for(study.configs[0], options, 0, out)
        shown = {k: getattr(recipe, k) for k in REPORTED}
        if recipe.steps is not None:
            shown.pop("epochs")  # the run length is in steps
        summary = ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in shown.items()
            if v is not None
        )
        context = dict(scale=scale, data=options.data, classes=classes, recipe=summary)
        write_outputs(study, rows, out, context)
        _say(f"wrote tables, plots and report to {out}")
    return StudyRun(out, rows, trained, cached)
