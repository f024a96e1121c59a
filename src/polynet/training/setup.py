"""What a run is made of before its first step: threads, device, data and the model.

The functions here are the parts of :class:`~polynet.training.trainer.Trainer`'s setup that do
not depend on each other's state, each testable alone.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from polynet.data import build_dataset
from polynet.devices import resolve_device
from polynet.distributed import ProcessGroup, join
from polynet.errors import UserError
from polynet.io.loading import build_from_file
from polynet.io.weights import fit_state_dict, read_weights
from polynet.training.batches import FolderTrainBatches, TensorTrainBatches
from polynet.training.config import TrainConfig
from polynet.training.state import seed_everything


def set_threads(cfg: TrainConfig) -> None:
    """Use ``cfg.threads`` CPU threads, or one per idle core (from the load average)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif cfg.device != "cuda" and hasattr(os, "getloadavg"):
        # Threads beyond the idle cores spin against other processes and run slower.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(max(1, min(cores, round(cores - os.getloadavg()[0]))))


def train_device(cfg: TrainConfig) -> torch.device:
    """The device type a run trains on (the GPU index is chosen with the process group)."""
    return torch.device(resolve_device(cfg.device).type)


def start_process(cfg: TrainConfig, device: torch.device) -> tuple[torch.device, ProcessGroup]:
    """Join the process group (under torchrun), take this process's GPU and seed it.

    Also checks that the run fits the group and sets the determinism flags.

    Raises:
        UserError: For ``sync_bn`` off CUDA or a batch that does not split over the processes.

    """
    group = join(device)
    device = group.device
    if cfg.sync_bn and group.enabled and device.type != "cuda":
        raise UserError("sync_bn needs CUDA (SyncBatchNorm has no CPU version); drop --sync-bn")
    if cfg.batch_size % group.world_size:
        raise UserError(
            f"batch_size {cfg.batch_size} does not split evenly over "
            f"{group.world_size} processes; use a multiple of {group.world_size}"
        )
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed + group.rank)
    return device, group


def placed_for_training(
    cfg: TrainConfig, model: nn.Module, device: torch.device, group: ProcessGroup
) -> tuple[nn.Module, torch.memory_format]:
    """``model`` on ``device`` in its memory format, its norms synchronised as asked.

    Returns:
        The model (what is saved, averaged and wrapped for the steps,
        :func:`~polynet.training.step.wrap_for_training`) and the memory format of the inputs:
        channels-last where ``cfg.channels_last`` says, by default on CUDA.

    """
    channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    raw = model.to(device).to(memory_format=memory_format)
    if cfg.sync_bn and group.enabled:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    return raw, memory_format


@dataclass
class TrainData:
    """A run's data: the splits, the training images used and the epoch length.

    Attributes:
        train_set: The training split.
        val_set: The validation split (None when the run never evaluates).
        classes: Class names of the training split.
        train_indices: Training images used (all, or a seeded subset).
        steps_per_epoch: Optimizer steps per epoch (the last incomplete batch is dropped).

    """

    train_set: Dataset
    val_set: Dataset | None
    classes: list[str]
    train_indices: torch.Tensor
    steps_per_epoch: int


def build_data(cfg: TrainConfig) -> TrainData:
    """Open the data set of a run and choose its training images.

    Raises:
        UserError: If fewer images than one batch remain.

    """
    train_set = build_dataset(cfg.data, "train")
    val_set = None
    if cfg.eval_every or cfg.final_eval or cfg.path_drop_gap is not None:
        val_set = build_dataset(cfg.data, "val")
    n = len(train_set)
    indices = torch.arange(n)
    if cfg.train_subset is not None and cfg.train_subset < n:
        g = torch.Generator().manual_seed(cfg.seed)
        indices = torch.randperm(n, generator=g)[: cfg.train_subset].sort().values
    if len(indices) < cfg.batch_size:
        raise UserError(
            f"the training set has {len(indices)} images, fewer than one batch of "
            f"{cfg.batch_size}; lower --batch-size"
        )
    return TrainData(
        train_set, val_set, list(train_set.classes), indices, len(indices) // cfg.batch_size
    )


def initial_model(
    cfg: TrainConfig,
    factory: Callable[..., nn.Module],
    num_classes: int,
    log: Callable[[str], None],
) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build the model: ``--init-from``'s own architecture and weights, or ``cfg.model``.

    Returns:
        The model, the name it was built under and the keyword arguments given to the factory.

    """
    kwargs = dict(cfg.model_kwargs, num_classes=num_classes)
    if not cfg.init_from:
        return factory(cfg.model, **kwargs), cfg.model, kwargs
    weights = read_weights(cfg.init_from)
    model, name = build_from_file(weights, None, factory, **kwargs)
    if weights.model_name and weights.model_name != cfg.model:
        log(
            f"warning: --init-from {cfg.init_from} holds {weights.model_name}; training that "
            f"architecture (not --model {cfg.model})"
        )
    with warnings.catch_warnings():  # a new head for other classes is the point here
        warnings.simplefilter("ignore", UserWarning)
        model.load_state_dict(fit_state_dict(weights, model))
    return model, name, kwargs


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's preprocessing, true to its input channels and classes."""
    cfg = dict(model.pretrained_cfg)
    cfg["input_size"] = (model.in_chans, *cfg.get("input_size", (1, 28, 28))[1:])
    if model.num_classes != cfg.get("num_classes"):
        cfg["num_classes"] = model.num_classes
    return cfg


def training_batches(
    cfg: TrainConfig, data: TrainData, data_cfg: dict[str, Any], rank: int
) -> TensorTrainBatches | FolderTrainBatches:
    """Augmented batches: whole batches as tensors for in-memory data, else per image."""
    images = getattr(data.train_set, "images", None)
    if images is not None:
        return TensorTrainBatches(
            images,
            data.train_set.targets,
            data_cfg,
            cfg.crop_scale,
            cfg.crop_ratio,
            cfg.hflip,
            cfg.seed,
            rank,
        )
    aug = dict(data_cfg, scale=cfg.crop_scale, ratio=cfg.crop_ratio, hflip=cfg.hflip)
    return FolderTrainBatches(data.train_set, aug, cfg.seed, cfg.workers)
