"""Training configuration: one flat dataclass, named presets, YAML files and validation.

A configuration is built in layers, later layers winning: the dataclass defaults, a preset
(``paper-imagenet`` or ``fashion-mnist``), a YAML file, then explicit overrides (command-line
flags). Unknown keys, wrong types and out-of-range values are errors naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _how(default: Any) -> Any:
    """A setting of *how* a run is carried out, not *what* it computes.

    It may differ when a run is resumed and does not enter the ablation cache's identity:
    where the run is written, threads and workers, progress, logging and checkpoint cadence.
    Every other field defines the run (:func:`defines_run`).
    """
    return field(default=default, metadata={"defines_run": False})


@dataclass
class TrainConfig:
    """Every setting of a training run.

    The run length is ``steps`` (optimizer iterations) when set, else ``epochs``; ``warmup`` and
    an explicit ``lr_decay_every`` are in the same unit, the default decay points are fractions
    of the run. Fields made with ``_how`` do not change what is computed (:func:`defines_run`).
    The learning rate is ``lr_base * batch_size / lr_base_batch`` unless ``lr`` is given.

    Attributes:
        model: Registered model name.
        model_kwargs: Extra constructor arguments (``spec``, ``width_mult``, ``drop_rate``, ...).
        data: ``"fashion-mnist"`` or an ImageNet-layout folder.
        out: Output folder (checkpoints, metrics, TensorBoard events, curve).
        epochs: Run length in epochs (used when ``steps`` is None).
        steps: Run length in optimizer steps.
        time_budget: Fit the run to this many seconds of training and evaluation: the speed
            of this machine is measured before the first step and ``epochs`` is set to what
            fits (and recorded, so a resumed run keeps it). None: ``steps`` or ``epochs``.
        batch_size: Global batch size (split evenly over processes).
        optimizer: ``"rmsproptf"`` (the paper), ``"sgd"`` or ``"adamw"``.
        lr: Learning rate; None means ``lr_base`` scaled linearly with the batch size.
        lr_base: Learning rate for a batch of ``lr_base_batch`` images.
        lr_base_batch: Reference batch size of ``lr_base``.
        lr_schedule: ``"step"`` (x ``lr_decay_rate`` at each decay point) or ``"cosine"``.
        lr_decay_every: Interval of the step decay, in the run-length unit (None: decay at
            ``lr_decay_at``).
        lr_decay_at: Step-decay points as fractions of the run, whichever unit its length is
            given in (the paper: 160K, 320K and 480K of 560K iterations).
        lr_decay_rate: Factor of each step decay.
        warmup: Linear warm-up length, in the run-length unit.
        momentum: Momentum (RMSProp and SGD).
        rms_decay: RMSProp decay of the squared-gradient average.
        rms_eps: RMSProp epsilon, inside the square root as in TensorFlow.
        weight_decay: L2 penalty (coupled, as in TensorFlow's slim).
        label_smoothing: Cross-entropy label smoothing.
        ema_decay: Keep an exponential moving average of the weights (timm's ``ModelEmaV3``,
            with warm-up) with this decay per step; evaluation and the saved ``model`` use it.
        crop_scale: Random-crop area range (the paper: 8-100 %).
        crop_ratio: Random-crop aspect-ratio range.
        hflip: Horizontal flip probability.
        path_drop: Stochastic-path drop probability at the last unit once switched on.
        path_drop_epoch: Switch stochastic paths on at this epoch (None: never by epoch).
        path_drop_gap: Switch them on when train minus val top-1 exceeds this many points.
        eval_every: Evaluate on the validation split every this many epochs (0: never).
        bn_recalibrate: Before each evaluation, recompute BatchNorm statistics as a plain
            average over this many training images (0: keep the running averages, which lag
            behind fast-changing weights in short runs).
        val_subset: Evaluate on the first this many validation images (None: all).
        train_subset: Train on this many images drawn once with the seed (None: all).
        final_eval: Evaluate the final weights on the whole validation split.
        eval_flip: Test-time flips: each validation image's logits are averaged with its
            mirror image's (the final line also gives the top-1 without).
        checkpoint_every: Also save ``last.pt`` every this many steps (0: per epoch only).
        log_every: Log step metrics every this many steps.
        workers: DataLoader worker processes for image folders.
        seed: Seed of every random number generator.
        deterministic: Deterministic algorithms (bitwise reproducible resume on CPU).
        threads: CPU threads for torch (0: one per idle core, from the load average).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        amp: Autocast precision of the forward pass: ``"auto"`` (bf16 where the device computes
            it natively: CUDA, or a CPU with AVX512-BF16 or AMX; else none), ``"none"`` (fp32),
            ``"bf16"`` or ``"fp16"`` (CUDA only). Weights and optimizer state stay fp32. A run
            records what ``"auto"`` chose, so a resumed run keeps it.
        channels_last: Channels-last memory format (None: on CUDA only).
        compile: Compile each unit with ``torch.compile``
        (:func:`polynet.model.network.compile_units`).
        sync_bn: SyncBatchNorm across processes (the paper normalises per GPU).
        init_from: Initialise the weights from this polynet checkpoint (no optimizer state).
        resume: Continue the run in ``out`` from its ``last.pt``.
        overwrite: Replace a different run found in ``out``.
        progress: Show a progress bar.

    """

    model: str = "polynet_small"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "fashion-mnist"
    out: str = _how("runs/polynet")
    epochs: float = 10.0
    steps: int | None = None
    time_budget: float | None = None
    batch_size: int = 256
    optimizer: str = "rmsproptf"
    lr: float | None = None
    lr_base: float = 0.45
    lr_base_batch: int = 256
    lr_schedule: str = "step"
    lr_decay_every: float | None = None
    lr_decay_at: tuple[float, ...] = (2 / 7, 4 / 7, 6 / 7)
    lr_decay_rate: float = 0.1
    warmup: float = 0.0
    momentum: float = 0.9
    rms_decay: float = 0.9
    rms_eps: float = 1.0
    weight_decay: float = 4e-5
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    path_drop: float = 0.25
    path_drop_epoch: float | None = None
    path_drop_gap: float | None = None
    eval_every: int = 1
    bn_recalibrate: int = 0
    val_subset: int | None = None
    train_subset: int | None = None
    final_eval: bool = True
    eval_flip: bool = False
    checkpoint_every: int = _how(0)
    log_every: int = _how(50)
    workers: int = _how(2)
    seed: int = 0
    deterministic: bool = False
    threads: int = _how(0)
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    sync_bn: bool = False
    init_from: str | None = None
    resume: bool = _how(False)
    overwrite: bool = _how(False)
    progress: bool = _how(True)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def learning_rate(self) -> float:
        """The learning rate in use: ``lr`` or the linearly scaled ``lr_base``."""
        if self.lr is not None:
            return self.lr
        return self.lr_base * self.batch_size / self.lr_base_batch

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as plain YAML/JSON-able values."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @property
    def given(self) -> frozenset[str]:
        """The settings named when this config was made, defaults left out.

        ``TrainConfig(out=RUN, resume=True)`` gave ``out`` and ``resume``; :func:`build_config`
        gives what its preset, file and overrides set, a value equal to the default included.
        A resume compares only these with the saved run.
        """
        return self.__dict__.get("_given", frozenset(_FIELDS))


def _record_given(init: Any) -> Any:
    """Wrap the dataclass ``__init__`` so that a config knows which settings were named."""

    def __init__(self: TrainConfig, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.__dict__["_given"] = frozenset([*list(_FIELDS)[: len(args)], *kwargs])

    __init__.__doc__ = init.__doc__
    __init__.__signature__ = inspect.signature(init)  # type: ignore[attr-defined]
    return __init__


PRESETS: dict[str, dict[str, Any]] = {
    # Section 4 of the paper, exactly: batch 256, RMSProp (0.9, eps 1.0, momentum 0.9),
    # lr 0.45 x0.1 every 160K of 560K iterations, 8-100 % crops, stochastic paths 0 -> 0.25
    # switched on when the train/val gap opens.
    "paper-imagenet": dict(
        model="polynet_ir_3_6_3",
        steps=560_000,
        batch_size=256,
        optimizer="rmsproptf",
        lr_base=0.45,
        lr_base_batch=256,
        lr_schedule="step",
        lr_decay_at=(2 / 7, 4 / 7, 6 / 7),  # x0.1 at 160K, 320K and 480K of 560K
        lr_decay_rate=0.1,
        warmup=0,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        hflip=0.5,
        path_drop=0.25,
        path_drop_gap=5.0,
        checkpoint_every=5000,
        log_every=100,
        workers=8,
    ),
    # Tuned for Fashion-MNIST on a 2-core CPU (the quick start: 91 % top-1 inside 10 minutes).
    # Every choice was picked from a measured sweep (docs/training.md): AdamW reaches a given
    # accuracy in fewer epochs than the paper's RMSProp on this small data set, mild crops
    # (8 % of a 28 px image is ~8 px) and label smoothing help, and so does a wider net on a
    # halved grid.
    "fashion-mnist": dict(
        model="polynet_small",
        # Width 1/8 with a stride-2 stem: stage A runs at 14 x 14, so the net has 4x the
        # parameters of a width-1/16 net at full resolution for ~1.7x its training speed on a
        # CPU. Released-style sharing gives each power of a repeated block (F and FF of poly-2)
        # its own BatchNorm: one shared norm averages the statistics of two different inputs
        # and evaluation accuracy collapses.
        model_kwargs=dict(width_mult=0.125, sharing="released", stem_stride=2),
        data="fashion-mnist",
        epochs=3,
        batch_size=128,
        optimizer="adamw",
        lr_base=0.006,
        lr_base_batch=256,
        lr_schedule="cosine",
        warmup=0.1,
        weight_decay=0.05,
        label_smoothing=0.1,
        crop_scale=(0.85, 1.0),
        hflip=0.5,
        path_drop=0.1,
        path_drop_gap=3.0,
        eval_every=1,
        bn_recalibrate=2048,
        workers=0,
        channels_last=True,
        log_every=20,
    ),
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TrainConfig.__init__ = _record_given(TrainConfig.__init__)  # type: ignore[method-assign]

_CHOICES = {
    "optimizer": ("rmsproptf", "sgd", "adamw"),
    "lr_schedule": ("step", "cosine"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "none", "bf16", "fp16"),
}


def defines_run(name: str) -> bool:
    """Whether a setting changes what a run computes (resume and caches compare only these)."""
    return _FIELDS[name].metadata.get("defines_run", True)


def run_identity(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that define what ``cfg`` computes, as plain values.

    ``amp="auto"`` counts as what it chooses on this machine: a bf16 run and an fp32 run are
    different runs.
    """
    from polynet.devices import training_amp  # imports torch: only when asked for

    identity = {k: v for k, v in cfg.to_dict().items() if defines_run(k)}
    identity["amp"] = training_amp(cfg.amp, cfg.device)
    return identity


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's annotation, converting YAML lists to tuples."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ValueError as err:
                errors.append(err)
        raise errors[0]
    expected = origin or annotation
    if expected is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"config key {key!r} must be a list of numbers, got {value!r}")
            return tuple(_coerce(key, v, args[0]) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(
                f"config key {key!r} must be a list of {len(args)} numbers, got {value!r}"
            )
        return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if expected is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if expected is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if expected is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if expected is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    return value


def check_keys(values: dict[str, Any], where: str) -> None:
    """Raise a ValueError for keys that are not configuration fields, suggesting close ones."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {key!r} in {where}{hint}")


def _range(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: TrainConfig) -> None:
    """Check types and ranges of every field; raise a ValueError naming the first bad one."""
    hints = _field_types()
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _coerce(f.name, getattr(cfg, f.name), hints[f.name]))
    for key, choices in _CHOICES.items():
        _range(
            getattr(cfg, key) in choices,
            f"config key {key!r} must be one of {', '.join(choices)}, got {getattr(cfg, key)!r}",
        )
    finite = all(
        math.isfinite(v) for v in (cfg.lr_base, cfg.rms_eps, cfg.weight_decay) + cfg.crop_scale
    )
    _range(finite, "learning rate, epsilon, weight decay and crop scale must be finite numbers")
    _range(cfg.batch_size >= 1, f"batch_size must be at least 1, got {cfg.batch_size}")
    _range(cfg.lr is None or cfg.lr > 0, f"lr must be positive, got {cfg.lr}")
    _range(cfg.lr_base > 0, f"lr_base must be positive, got {cfg.lr_base}")
    _range(cfg.lr_base_batch >= 1, f"lr_base_batch must be at least 1, got {cfg.lr_base_batch}")
    _range(cfg.epochs > 0, f"epochs must be positive, got {cfg.epochs}")
    _range(cfg.steps is None or cfg.steps >= 1, f"steps must be at least 1, got {cfg.steps}")
    _range(
        cfg.time_budget is None or cfg.time_budget > 0,
        f"time_budget must be a positive number of seconds, got {cfg.time_budget}",
    )
    _range(
        cfg.time_budget is None or cfg.steps is None,
        "time_budget and steps both fix the run length; pass only one",
    )
    _range(
        cfg.lr_decay_every is None or cfg.lr_decay_every > 0,
        f"lr_decay_every must be positive, got {cfg.lr_decay_every}",
    )
    _range(
        all(0 < f < 1 for f in cfg.lr_decay_at)
        and list(cfg.lr_decay_at) == sorted(cfg.lr_decay_at),
        f"lr_decay_at must be increasing fractions of the run in (0, 1), got {cfg.lr_decay_at}",
    )
    _range(0 < cfg.lr_decay_rate <= 1, f"lr_decay_rate must be in (0, 1], got {cfg.lr_decay_rate}")
    _range(cfg.warmup >= 0, f"warmup must be at least 0, got {cfg.warmup}")
    _range(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    _range(0 <= cfg.rms_decay < 1, f"rms_decay must be in [0, 1), got {cfg.rms_decay}")
    _range(cfg.rms_eps > 0, f"rms_eps must be positive, got {cfg.rms_eps}")
    _range(cfg.weight_decay >= 0, f"weight_decay must be at least 0, got {cfg.weight_decay}")
    _range(
        cfg.ema_decay is None or 0 < cfg.ema_decay < 1,
        f"ema_decay must be in (0, 1), got {cfg.ema_decay}",
    )
    _range(
        0 <= cfg.label_smoothing < 1,
        f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}",
    )
    low, high = cfg.crop_scale
    _range(
        0 < low <= high <= 1, f"crop_scale must satisfy 0 < min <= max <= 1, got {cfg.crop_scale}"
    )
    low, high = cfg.crop_ratio
    _range(0 < low <= high, f"crop_ratio must satisfy 0 < min <= max, got {cfg.crop_ratio}")
    _range(0 <= cfg.hflip <= 1, f"hflip must be a probability in [0, 1], got {cfg.hflip}")
    _range(
        0 <= cfg.path_drop < 1,
        f"path_drop must be a probability in [0, 1), got {cfg.path_drop}",
    )
    _range(
        cfg.path_drop_epoch is None or cfg.path_drop_epoch >= 0,
        f"path_drop_epoch must be at least 0, got {cfg.path_drop_epoch}",
    )
    _range(
        cfg.path_drop_gap is None or cfg.path_drop_gap >= 0,
        f"path_drop_gap must be at least 0 (accuracy points), got {cfg.path_drop_gap}",
    )
    for key in ("eval_every", "bn_recalibrate", "checkpoint_every", "workers", "threads", "seed"):
        _range(getattr(cfg, key) >= 0, f"{key} must be at least 0, got {getattr(cfg, key)}")
    _range(cfg.log_every >= 1, f"log_every must be at least 1, got {cfg.log_every}")
    for key in ("val_subset", "train_subset"):
        value = getattr(cfg, key)
        _range(value is None or value >= 1, f"{key} must be at least 1, got {value}")
    _range(
        not (cfg.resume and cfg.overwrite),
        "resume and overwrite exclude each other; pass only one",
    )


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file safely (plain data only; no Python tags)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(
            f"config file {path} is not valid YAML: {str(err).splitlines()[0]}"
        ) from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return values


def layer_values(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The explicitly given settings: a preset, a YAML file and overrides, later ones winning.

    Raises:
        ValueError: For an unknown preset or key.

    """
    file_values = load_yaml(config_file) if config_file else {}
    preset = preset or file_values.pop("preset", None)
    file_values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    check_keys(file_values, str(config_file))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    check_keys(overrides, "the arguments")
    values = dict(PRESETS.get(preset or "", {}))
    # A run length given by a later layer replaces the one of an earlier layer, whatever its
    # unit: `--epochs 10` over the paper's preset (560K steps) means 10 epochs, and `--steps
    # 200` over the quick start's file (a time budget) means 200 steps. Layer by layer, so an
    # earlier layer's length never clears the one a later layer gives.
    for layer in (file_values, overrides):
        if {"epochs", "steps", "time_budget"} & set(layer):
            values.update(steps=None, time_budget=None)
        values.update(layer)
    return values


def build_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> TrainConfig:
    """Layer a preset, a YAML file and overrides into a validated :class:`TrainConfig`.

    Args:
        preset: A name from :data:`PRESETS`; a ``preset:`` key in the file is used otherwise.
        config_file: YAML file of configuration keys.
        **overrides: Keys that win over the file (None values are ignored).

    Raises:
        ValueError: For an unknown preset or key, a wrong type or an out-of-range value.

    """
    return TrainConfig(**layer_values(preset, config_file, **overrides))
