"""Run a study: time every config, train and evaluate each one with one recipe, cache results.

Layout of a study folder ``OUT``::

    OUT/study.json                 the study, recipe and data (what the results mean)
    OUT/timing.json                time per training iteration of every config (one pass)
    OUT/results/<config>_s<seed>.json   one finished config and seed (the cache)
    OUT/results.csv, results.json, report.md, fig*.png   tables, plots and report
    RUNS/<config>_s<seed>/         the training run (checkpoints, metrics; resumable)

``RUNS`` is ``OUT/runs`` unless given, so that ``OUT`` can be a folder committed to git (small
JSON, Markdown and PNG files) while checkpoints stay elsewhere. A result file is written
atomically once a pair is trained and evaluated, so a killed study resumes at the first pair
without one (and inside that pair from its last checkpoint); a pair whose result exists is not
trained again unless ``rerun``. Pairs run seed-major: every config's seed 0 first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from polynet.ablation.report import REPORTED, write_outputs
from polynet.ablation.results import (
    Collected,
    ResultStore,
    fingerprint,
    folder_lock,
    pair_key,
    seed_of,
    write_json,
)
from polynet.ablation.shards import Shard
from polynet.ablation.studies import Study, StudyConfig, build_study, create_study_model
from polynet.ablation.timing import attach_times, autocast_of, input_size, load_or_measure
from polynet.data import build_dataset
from polynet.devices import resolve_device
from polynet.distributed import is_main_process, world_size
from polynet.errors import UserError
from polynet.evaluation import SingleCrop, evaluate
from polynet.io.loading import load_model
from polynet.model.cost import count_macs, count_params, model_cost
from polynet.model.network import PolyNet
from polynet.training import TrainConfig, build_config, run_identity, train

# One recipe for every config of a study. The small scale is the quick start's recipe (AdamW,
# cosine decay after a 0.1-epoch warm-up, 85-100 % crops, label smoothing, BatchNorm
# recalibration; bf16 autocast where native), written out here rather than taken from the
# ``fashion-mnist`` preset so that re-tuning the quick start never changes a study's recipe or
# invalidates its results. Six epochs, and short of the plateau: the IR 3-6-3 baseline gains
# about a point from each doubling up to 24 epochs, and neither width, learning rate nor a
# smaller training set bends that within what two CPU cores afford (docs/ablation.md, "Scale");
# a longer study (on a GPU) passes ``--epochs``, which is part of each result's identity, so
# results of two lengths never mix in one report.
# One thread: a network this small keeps two threads half idle, and two one-thread jobs
# (``--shard 1/2``, ``--shard 2/2``) finish 1.9x the pairs per hour of one two-thread job;
# written here so that every job of a study rounds alike. The full scale is the paper's recipe
# (Sec. 4), whose length is set by the caller.
SMALL_RECIPE: dict[str, Any] = dict(
    model="polynet_small",
    data="fashion-mnist",
    epochs=6,
    batch_size=128,
    optimizer="adamw",
    lr_base=0.006,
    lr_base_batch=256,
    lr_schedule="cosine",
    warmup=0.1,  # epochs
    weight_decay=0.05,
    label_smoothing=0.1,
    crop_scale=(0.85, 1.0),
    hflip=0.5,
    bn_recalibrate=2048,
    workers=0,
    channels_last=True,
    log_every=50,
    threads=1,
    checkpoint_every=200,  # a killed config resumes within 200 steps, not from its start
    # No ``amp``: the precision is the training API's default for this machine (see
    # ``timing.autocast_of``), and ``--amp`` sets it for every config alike.
)
FULL_RECIPE: dict[str, Any] = dict(preset="paper-imagenet")
# Settings no study may change: the study evaluates once itself (top-1 and top-5 of the final
# weights) and trains without stochastic paths, whose train/val-gap trigger would switch them on
# at different times for different configs (the paper uses them for very deep models only).
FIXED: dict[str, Any] = dict(eval_every=0, final_eval=False, path_drop=0.0)


@dataclass
class StudyOptions:
    """How to run a study.

    Attributes:
        data: ``"fashion-mnist"`` or an ImageNet-layout folder.
        scale: ``"small"`` or ``"full"``; None picks small for Fashion-MNIST, full otherwise.
        width_mult: Width multiplier (None: the scale's default, see ``build_study``).
        seeds: Seeds per config (0 .. seeds - 1). Seed ``s`` seeds the run's initialisation,
            data order, augmentation and training subset; every config uses the same seeds,
            so seed ``s`` of two configs sees the same images in the same order (comparisons
            are paired by seed) and two seeds of one config are independent runs.
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


def _say(message: str) -> None:
    if is_main_process():
        print(f"polynet ablate: {message}", file=sys.stderr, flush=True)


def recipe_for(config: StudyConfig, options: StudyOptions, seed: int, out: Path) -> TrainConfig:
    """Build the training configuration of one config and seed (the study's one recipe)."""
    base = dict(SMALL_RECIPE if options.resolved_scale() == "small" else FULL_RECIPE)
    overrides = {k: v for k, v in options.train_overrides.items() if v is not None}
    if "steps" in overrides and "warmup" not in overrides and "epochs" in base:
        # A run measured in steps: the recipe's warm-up, in epochs, becomes the same share of it.
        base["warmup"] = base.get("warmup", 0) / base["epochs"] * overrides["steps"]
    if "epochs" in overrides and "steps" not in overrides and "steps" in base:
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


def model_costs(config: StudyConfig, num_classes: int) -> dict[str, Any]:
    """Parameters and MACs (one image at the model's input size) of a config."""
    model = create_study_model(config.model, **config.model_kwargs, num_classes=num_classes)
    model.eval()
    size = input_size(model)
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    """The recipe settings the report lists, as this machine ran them."""
    values = {k: getattr(cfg, k) for k in REPORTED}
    values.update(amp=autocast_of(cfg), device=str(resolve_device(cfg.device)))
    return values


def _evaluate_run(run_dir: Path, data: str, options: StudyOptions, amp: str) -> dict[str, Any]:
    """Top-1 and top-5 of a run's final weights on the validation split."""
    model, file = load_model(run_dir / "last.pt", factory=create_study_model, adapt=False)
    payload = file.payload
    data_cfg = dict(payload["pretrained_cfg"])
    data_cfg["input_size"] = tuple(data_cfg["input_size"])
    dataset = build_dataset(data, "val")
    result = evaluate(
        model,
        dataset,
        SingleCrop(),
        cfg=data_cfg,
        batch_size=options.eval_batch_size,
        device=resolve_device(payload["config"].get("device", "auto")),
        limit=options.eval_limit,
        # The precision the run trained in (an fp16 run evaluates in fp32, as evaluate has
        # no fp16 path).
        precision="bf16" if amp == "bf16" else "fp32",
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
    """What :func:`run_study` or :func:`report_study` did.

    Attributes:
        out: The study folder.
        rows: Per config and seed of this job, the cached or new result.
        trained: ``config_s<seed>`` keys trained in this call.
        cached: Keys taken from the results folder.
        missing: Keys of the study without a result (after this call).
        reported: Whether the tables, plots and report were written.

    """

    out: Path
    rows: list[dict[str, Any]]
    trained: list[str]
    cached: list[str]
    missing: list[str] = field(default_factory=list)
    reported: bool = False


def _write_study_json(
    out: Path, study: Study, scale: str, options: StudyOptions, num_classes: int
) -> None:
    write_json(
        out / "study.json",
        dict(
            study=study.name,
            title=study.title,
            figure=study.figure,
            scale=scale,
            data=options.data,
            seeds=options.seeds,
            num_classes=num_classes,
            options={k: v for k, v in asdict(options).items() if k != "configs"},
            configs=[asdict(c) for c in study.configs],
        ),
    )


def _write_report(
    study: Study,
    out: Path,
    store: ResultStore,
    seeds: Sequence[int],
    context: dict[str, Any],
    expected: int | None = None,
) -> Collected:
    """Merge the results folder's pairs of ``study`` into tables, plots and the report.

    Args:
        study: The study (its selected configs).
        out: The study folder.
        store: Its results folder.
        seeds: The seeds to merge.
        context: Scale, data and number of classes (None: from the rows or the data).
        expected: Seeds below this count as missing where absent (None: all of ``seeds``).

    Returns:
        The rows merged and the expected pairs without a result.

    """
    collected = store.collect(study, seeds)
    if expected is not None:
        collected.missing = [k for k in collected.missing if seed_of(k) < expected]
    timing_seconds = attach_times(collected.rows, out)
    context = dict(context, missing=collected.missing, timing_seconds=timing_seconds)
    if context.get("num_classes") is None:  # a folder of an older version: ask the rows, data
        recorded = (r["num_classes"] for r in collected.rows if "num_classes" in r)
        context["num_classes"] = next(recorded, None) or len(
            build_dataset(context["data"], "val").classes
        )
    write_outputs(study, collected.rows, out, context)
    return collected


def run_study(
    study: Study | str,
    out: str | os.PathLike,
    options: StudyOptions | None = None,
    *,
    runs: str | os.PathLike | None = None,
    shard: Shard | None = None,
    after_config: Callable[[dict[str, Any]], None] | None = None,
) -> StudyRun:
    """Run a study (or finish a killed one, or one job's share), then write its report.

    Args:
        study: A :class:`Study` or a name from :data:`~polynet.ablation.studies.STUDIES`.
        out: The study folder (results, timing, tables, report).
        options: Data, scale, seeds, recipe overrides, caching and timing settings.
        runs: Where the training runs (checkpoints) go (default ``out/runs``).
        shard: Train only this job's share of the (config, seed) pairs (see
            :class:`~polynet.ablation.shards.Shard`); the report is written once the folder
            holds every pair, else by :func:`report_study`.
        after_config: Called with each new result row once it is saved.

    Returns:
        This job's rows, which of them were trained now or taken from the results folder,
        and the pairs still missing.

    Raises:
        UserError: For an unknown study or config, bad settings, or a folder holding results
            of a different recipe (pass ``rerun`` or use another folder).

    """
    options = options or StudyOptions()
    if options.seeds < 1:
        raise UserError(f"seeds must be at least 1, got {options.seeds}")
    scale = options.resolved_scale()
    whole = build_study(study, scale, options.width_mult) if isinstance(study, str) else study
    study = whole.select(options.configs)
    out = Path(out)
    runs = Path(runs) if runs is not None else out / "runs"
    store = ResultStore(out / "results")
    is_main = is_main_process()
    # Validate the recipe and the data before any long work.
    recipe_for(study.configs[0], options, 0, runs / "check")
    classes = list(build_dataset(options.data, "val").classes)
    trained: list[str] = []
    pending, rows, cached = _sort_pairs(whole, study, options, runs, store, shard)
    if is_main:
        _write_study_json(out, study, scale, options, len(classes))
    # Timing after the cache check, so that a refused folder fails before any long work.
    # Under torchrun every process times on its own device at the same time (no process waits
    # for another outside the training API); the main process records its measurements.
    if shard is None or shard.times:
        probe = recipe_for(study.configs[0], options, 0, runs / "timing")
        load_or_measure(
            out,
            study.configs,
            probe,
            len(classes),
            options.timing_rounds,
            options.timing_iters,
            rerun=options.rerun,
            say=_say,
        )
    if cached:
        _say(f"{len(cached)} config/seed results cached in {store.folder}; not rerun")

    costs: dict[str, dict[str, Any]] = {}
    for index, (config, seed, key, cfg, identity) in enumerate(pending):
        # Another job may have landed this pair meanwhile (all processes of one torchrun job
        # must take the same branch, so only a single-process job looks).
        landed = None if options.rerun or world_size() > 1 else store.load(key)
        if landed is not None:
            store.check(landed, identity)
            rows.append(landed)
            cached.append(key)
            continue
        _say(f"[{index + 1}/{len(pending)}] training {key} ({config.label})")
        started = time.time()
        overrides = dict(overwrite=True) if options.rerun else dict(resume=True)
        outcome = train(cfg, model_factory=create_study_model, **overrides)
        if not is_main:
            continue
        if config.name not in costs:
            costs[config.name] = model_costs(config, len(classes))
        evaluated = _evaluate_run(runs / key, options.data, options, autocast_of(cfg))
        measured = dict(**costs[config.name], **evaluated, num_classes=len(classes))
        row = _result_row(config, seed, cfg, identity, outcome, started, measured)
        with folder_lock(out):  # land and announce one pair at a time (see folder_lock)
            store.save(row)
            rows.append(row)
            trained.append(key)
            _say(f"{key}: top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%")
            if after_config is not None:
                after_config(row)
    run = StudyRun(out, rows, trained, cached)
    if is_main:
        context = dict(scale=scale, data=options.data, num_classes=len(classes))
        _report_when_complete(run, study, store, range(options.seeds), shard, context)
    return run


def _report_when_complete(
    run: StudyRun,
    study: Study,
    store: ResultStore,
    seeds: range,
    shard: Shard | None,
    context: dict[str, Any],
) -> None:
    """Note the missing pairs; write the report once the folder holds them all (or no shards)."""
    run.missing = store.collect(study, seeds).missing
    if shard is None or shard.count == 1 or not run.missing:
        run.missing = _write_report(study, run.out, store, seeds, context).missing
        run.reported = True
        _say(f"wrote tables, plots and report to {run.out}")


def _sort_pairs(
    whole: Study,
    study: Study,
    options: StudyOptions,
    runs: Path,
    store: ResultStore,
    shard: Shard | None,
) -> tuple[list[tuple], list[dict[str, Any]], list[str]]:
    """Sort the job's (config, seed) pairs: those to train, and results already in the folder.

    Returns:
        ``(config, seed, key, cfg, identity)`` of each pair to train, the saved result rows
        and their keys.

    Raises:
        UserError: For a saved result of another recipe.

    """
    pending, rows, cached = [], [], []
    for seed in range(options.seeds):
        for config in study.configs:
            if shard is not None and not shard.owns(whole, config.name, seed):
                continue
            key = pair_key(config.name, seed)
            cfg = recipe_for(config, options, seed, runs / key)
            identity = run_identity(cfg)
            saved = None if options.rerun else store.load(key)
            if saved is None:
                pending.append((config, seed, key, cfg, identity))
            else:
                store.check(saved, identity)
                rows.append(saved)
                cached.append(key)
    return pending, rows, cached


def _result_row(
    config: StudyConfig,
    seed: int,
    cfg: TrainConfig,
    identity: dict[str, Any],
    outcome: Any,
    started: float,
    measured: dict[str, Any],
) -> dict[str, Any]:
    """What a trained pair's result records: config, costs and accuracy, training, machine."""
    last = outcome.history[-1] if outcome.history else {}
    return dict(
        config=config.name,
        seed=seed,
        **{k: v for k, v in asdict(config).items() if k != "name"},
        **measured,
        steps=outcome.steps,
        epochs=outcome.epochs,
        train_loss=last.get("train_loss"),
        train_top1=last.get("train_top1"),
        train_curve=[
            {k: h[k] for k in ("epoch", "step", "lr", "train_loss", "train_top1") if k in h}
            for h in outcome.history
        ],
        train_seconds=outcome.seconds,
        wall_seconds=time.time() - started,
        started_at=started,
        finished_at=time.time(),
        device=_device_name(resolve_device(cfg.device)),
        # Machines of one kind differ from day to day (AVX2 one day, AVX-512 with native bf16
        # the next): the instruction set is part of what the times mean.
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        world_size=world_size(),
        threads=torch.get_num_threads(),
        settings=_settings(cfg),
        recipe=identity,
        fingerprint=fingerprint(identity),
    )


def _read_study_json(out: Path, name: str) -> dict[str, Any]:
    path = out / "study.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("study", name) != name:
        raise UserError(
            f"{out} holds the study {saved['study']!r}, not {name!r}; name that study or "
            "another --out"
        )
    return saved


def report_study(
    study: Study | str,
    out: str | os.PathLike,
    options: StudyOptions | None = None,
    *,
    seeds: int | None = None,
    retime: bool = False,
) -> StudyRun:
    """Merge whatever results ``out/results`` holds into tables, plots and the report.

    Trains nothing, and times nothing unless ``retime``. The pairs expected are the configs
    and seeds the last run recorded in ``study.json`` (``options.configs`` and ``seeds``
    override them); those without a result are listed as missing in the report, not
    silently left out.

    Args:
        study: A :class:`Study` or a study's name.
        out: The study folder.
        options: Data, scale and width (when ``study.json`` does not record them), configs.
        seeds: Seeds expected of every config (seeds found beyond them are reported too).
        retime: Time every selected config again first, in one interleaved pass with the
            recipe the study ran (its recorded overrides unless ``options`` gives some): the
            pass to take on a quiet machine when the study's own pass ran beside other jobs.

    Raises:
        UserError: When the folder holds no result of the study, results of different
            recipes, or another study.

    """
    options = options or StudyOptions()
    out = Path(out)
    name = study if isinstance(study, str) else study.name
    saved = _read_study_json(out, name)
    scale = saved.get("scale") or options.resolved_scale()
    data = saved.get("data") or options.data
    if isinstance(study, str):
        width = saved.get("options", {}).get("width_mult", options.width_mult)
        study = build_study(study, scale, width)
    names = options.configs or [c["name"] for c in saved.get("configs", [])] or None
    study = study.select(names)
    store = ResultStore(out / "results")
    found = store.seeds_found(study)
    if not found:
        raise UserError(
            f"no results of study {name!r} in {store.folder} yet; train them first (polynet "
            f"ablate {name} --out {out})"
        )
    expected = seeds or saved.get("seeds") or max(found) + 1
    all_seeds = sorted(set(range(expected)) | set(found))
    context = dict(scale=scale, data=data, num_classes=saved.get("num_classes"))
    if retime:
        recorded = saved.get("options", {}).get("train_overrides", {})
        ran = replace(
            options, data=data, scale=scale, train_overrides=options.train_overrides or recorded
        )
        classes = context["num_classes"] or len(build_dataset(data, "val").classes)
        probe = recipe_for(study.configs[0], ran, 0, out / "runs" / "timing")
        load_or_measure(
            out, study.configs, probe, classes, options.timing_rounds, options.timing_iters,
            rerun=True, say=_say,
        )  # fmt: skip
    collected = _write_report(study, out, store, all_seeds, context, expected)
    keys = [pair_key(r["config"], r["seed"]) for r in collected.rows]
    return StudyRun(out, collected.rows, [], keys, collected.missing, reported=True)
