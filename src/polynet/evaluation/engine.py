"""The evaluation loop: protocols, batching, OOM back-off and distributed counting."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from polynet.data import UnreadableImageError, eval_transform
from polynet.devices import resolve_device, resolve_precision
from polynet.distributed import ProcessGroup, current
from polynet.evaluation.batches import EvalView, Unreadable, collate, single_crop_batches
from polynet.evaluation.crops import (
    CROPS_PER_SCALE,
    MultiScaleResize,
    check_scales,
    default_scales,
    distinct_crops,
    multi_crop,
    multi_crop_boxes,
)
from polynet.evaluation.metrics import DEFAULT_TOPK, ClassificationMetrics
from polynet.evaluation.pooling import (
    DEFAULT_TOP_FRACTION,
    SCORE_TYPES,
    ScoreType,
    crop_scores,
    pool_multi_scale,
    pooled_count,
)
from polynet.inference.fuse import inference_model


@dataclass(frozen=True)
class SingleCrop:
    """One resized, centre-cropped view per image, as the model's ``pretrained_cfg`` says.

    ``crop_mode="center"`` keeps the aspect ratio (shorter side to ``size / crop_pct``, then a
    centre crop); ``"squash"`` resizes both sides to ``size / crop_pct`` first (the released
    Very Deep PolyNet: 378 x 378, then the centre 331 x 331).

    Attributes:
        crop_pct: Override of the config's crop fraction.
        crop_mode: Override of the config's crop mode (``"center"`` or ``"squash"``).
        flip: Test-time flips: each image's logits are averaged with its mirror image's (the
            result also counts the predictions without, :attr:`EvalResult.unflipped`).

    """

    crop_pct: float | None = None
    crop_mode: str | None = None
    flip: bool = False

    name = "single-crop"


@dataclass(frozen=True)
class MultiCrop:
    """The paper's multi-crop protocol: 36 crops per scale, top-k pooled, averaged over scales.

    Attributes:
        scales: Shorter-side lengths; ``None`` for :func:`~polynet.evaluation.default_scales`
            of the model's input size.
        top_fraction: Share of the crops of a scale averaged per class (0.3 in the paper).
        score: Pool ``"softmax"`` probabilities (default) or raw ``"logits"``.

    """

    scales: tuple[int, ...] | None = None
    top_fraction: float = DEFAULT_TOP_FRACTION
    score: ScoreType = "softmax"

    name = "multi-crop"

    def __post_init__(self) -> None:
        pooled_count(CROPS_PER_SCALE, self.top_fraction)  # validates the fraction
        if self.score not in SCORE_TYPES:
            raise ValueError(f"score must be one of {', '.join(SCORE_TYPES)}, got {self.score!r}")


Protocol = SingleCrop | MultiCrop


@dataclass
class EvalResult:
    """What an evaluation counted.

    Attributes:
        metrics: Top-k counts and the confusion matrix over the readable images.
        classes: Class names, in label order.
        protocol: How images were turned into predictions (JSON-able).
        unreadable: ``(path, reason)`` for every image that could not be read; these are
            excluded from the counts.
        seconds: Wall time of the evaluation loop.
        world_size: Processes that shared the work.
        precision: What the model computed in (``"fp32"``, ``"bf16"`` or ``"int8"``).
        engine: What ran it: ``"torch"`` or ``"onnxruntime"`` (int8 always).
        unflipped: With :attr:`SingleCrop.flip`, the counts of the predictions without flips.

    """

    metrics: ClassificationMetrics
    classes: list[str]
    protocol: dict[str, Any]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    world_size: int = 1
    precision: str = "fp32"
    engine: str = "torch"
    unflipped: ClassificationMetrics | None = None

    @property
    def images_per_second(self) -> float:
        """Images (readable or not) processed per second of wall time."""
        total = self.metrics.count + len(self.unreadable)
        return total / self.seconds if self.seconds > 0 else float("nan")


def model_config(model: nn.Module) -> dict[str, Any]:
    """Return the model's ``pretrained_cfg`` (input size, crop, interpolation, mean, std)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or "input_size" not in cfg:
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg with an input_size; build it with "
            "polynet.create_model or pass cfg= to evaluate()"
        )
    return dict(cfg)


def _interpolation(cfg: dict[str, Any]) -> InterpolationMode:
    return InterpolationMode(cfg.get("interpolation", "bilinear"))


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError)


class AdaptiveBatchForward:
    """Run a model over a batch in chunks, halving the chunk after a CUDA out-of-memory error.

    The smaller chunk is kept for later calls, so one oversized batch costs one retry.

    Args:
        model: The network (already on its device, in eval mode).
        batch_size: Largest chunk tried first.

    """

    def __init__(self, model: nn.Module, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Return the model's outputs for ``x`` as float32, computed chunk by chunk."""
        outputs, start = [], 0
        while start < len(x):
            size = self.batch_size
            try:
                outputs.append(self.model(x[start : start + size]).float())
                start += size
                continue
            except Exception as err:
                if not _is_oom(err) or size == 1:
                    raise
            # Out of the except block, so the failed attempt's tensors are freed first.
            self.batch_size = max(1, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(
                f"CUDA out of memory with {size} crops per batch; retrying with {self.batch_size}",
                RuntimeWarning,
                stacklevel=2,
            )
        return torch.cat(outputs)


def _score_groups(
    groups: Iterable[tuple[Any, torch.Tensor]], forward: AdaptiveBatchForward, batch_size: int
) -> Iterator[tuple[Any, torch.Tensor]]:
    """Batch crop groups of any sizes through ``forward``; yield each group's logits in order.

    At most ``batch_size`` plus one group of crops are held at a time.
    """
    pending: list[tuple[Any, torch.Tensor]] = []
    held = 0

    def flush() -> Iterator[tuple[Any, torch.Tensor]]:
        logits = forward(torch.cat([crops for _, crops in pending]))
        sizes = [len(crops) for _, crops in pending]
        yield from zip([key for key, _ in pending], logits.split(sizes), strict=True)

    for key, crops in groups:
        pending.append((key, crops))
        held += len(crops)
        if held >= batch_size:
            yield from flush()
            pending, held = [], 0
    if pending:
        yield from flush()


def describe_protocol(protocol: Protocol, cfg: dict[str, Any]) -> dict[str, Any]:
    """Describe, as JSON-able values, a protocol resolved against a model config."""
    size = int(cfg["input_size"][-1])
    base = dict(
        name=protocol.name,
        input_size=list(cfg["input_size"]),
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=list(cfg["mean"]),
        std=list(cfg["std"]),
    )
    if isinstance(protocol, SingleCrop):
        crop_pct = protocol.crop_pct or cfg.get("crop_pct", 1.0)
        crop_mode = protocol.crop_mode or cfg.get("crop_mode", "center")
        described = dict(base, crop_pct=crop_pct, crop_mode=crop_mode)
        return dict(described, flip=True) if protocol.flip else described
    scales = check_scales(protocol.scales or default_scales(size), size)
    return dict(
        base,
        scales=list(scales),
        crops_per_scale=CROPS_PER_SCALE,
        crops_per_image=CROPS_PER_SCALE * len(scales),
        top_fraction=protocol.top_fraction,
        pooled_crops_per_scale=pooled_count(CROPS_PER_SCALE, protocol.top_fraction),
        score=protocol.score,
    )


def _single_crop_transform(cfg: dict[str, Any], description: dict[str, Any]) -> Callable:
    return eval_transform(
        dict(cfg, crop_pct=description["crop_pct"], crop_mode=description["crop_mode"])
    )


CALIBRATION_IMAGES = 256


def calibration_batches(
    dataset: Dataset, transform: Callable, batch_size: int, images: int = CALIBRATION_IMAGES
) -> list[torch.Tensor]:
    """Preprocessed batches for int8 calibration: ``images`` items spread evenly over a data set.

    Evenly spaced rather than the first ones, so that a folder sorted by class contributes
    every class. Unreadable items are skipped.
    """
    count = min(images, len(dataset))
    step = len(dataset) / max(count, 1)
    tensors = []
    for k in range(count):
        try:
            image, _ = dataset[int(k * step)]
        except UnreadableImageError:
            continue
        tensors.append(transform(image))
    return [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    protocol: Protocol | None = None,
    *,
    cfg: dict[str, Any] | None = None,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    limit: int | None = None,
    progress: bool = True,
    fuse: bool = True,
    precision: str = "fp32",
    calibration: Dataset | None = None,
    runtime: str = "torch",
    group: ProcessGroup | None = None,
) -> EvalResult:
    """Evaluate a classifier on a data set of ``(PIL image, label)`` items.

    Under ``torch.distributed`` every process evaluates every ``world_size``-th image from its
    rank (no image twice, none padded in) and the counts are summed over processes; every
    process gets the same result.

    Args:
        model: The classifier; put in eval mode and moved to ``device``.
        dataset: Items ``(image, label)`` with images as PIL images (build it with
            ``transform=None``) and a ``classes`` list. Items whose reading raises
            :class:`polynet.data.UnreadableImageError` are reported and skipped.
        protocol: :class:`SingleCrop` (default) or :class:`MultiCrop`.
        cfg: Preprocessing config; defaults to ``model.pretrained_cfg``.
        batch_size: Crops per forward pass (images per pass for single-crop).
        device: Where the model runs; defaults to CUDA when available.
        num_workers: Data-loader worker processes for reading and resizing.
        limit: Evaluate only the first ``limit`` images of the data set.
        progress: Show a progress bar (on rank 0 only).
        fuse: Evaluate an inference-optimised copy of a PolyNet
            (:func:`polynet.inference.fuse.optimize_for_inference`: norms folded, parallel
            convolutions
            joined, oneDNN-packed on CPU; the same outputs within float rounding). Other
            models are evaluated as they are; a part that cannot fold runs as built, named by a
            :class:`~polynet.inference.fuse.FusionWarning`.
        precision: ``"fp32"``, ``"bf16"`` (bf16 weights and activations, fp32 logits) or
            ``"int8"`` (static quantization, CPU only; see
            :func:`polynet.inference.fuse.inference_model`).
        calibration: For int8, a data set like ``dataset`` (e.g. its training split) whose
            evenly spaced 256 images, single-crop preprocessed, calibrate the activation
            ranges; by default those of ``dataset`` itself.
        runtime: ``"torch"`` or ``"onnxruntime"`` (the folded fp32 model exported to ONNX and
            run by ONNX Runtime on the CPU; see
            :func:`polynet.inference.fuse.optimize_for_inference`).
        group: The processes sharing the work (default: the group this process has joined,
            :func:`polynet.distributed.current`).

    Returns:
        The counts and what was skipped.

    Raises:
        UserError: For int8 or ONNX Runtime off the CPU, bf16 in ONNX Runtime, or an unknown
            precision or runtime.

    """
    protocol = protocol or SingleCrop()
    cfg = dict(cfg) if cfg is not None else model_config(model)
    description = describe_protocol(protocol, cfg)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    group = group or current(device)
    classes = list(getattr(dataset, "classes", None) or [])
    if not classes:
        raise ValueError("the data set has no 'classes' list; cannot name or count classes")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    # Every world_size-th image from this process's rank: no image twice, none padded in.
    indices = range(group.rank, total, group.world_size)
    model = model.eval().to(device)
    calibration_inputs = None
    if precision == "int8":
        calibration_transform = _single_crop_transform(cfg, describe_protocol(SingleCrop(), cfg))
        calibration_inputs = calibration_batches(
            calibration if calibration is not None else dataset, calibration_transform, batch_size
        )
    runner = inference_model(
        model,
        precision,
        calibration_inputs,
        fuse=fuse,
        runtime=runtime,
        input_size=cfg["input_size"],
    )
    forward = AdaptiveBatchForward(runner, batch_size)
    metrics = ClassificationMetrics(len(classes), DEFAULT_TOPK)
    flips = isinstance(protocol, SingleCrop) and protocol.flip
    unflipped = ClassificationMetrics(len(classes), DEFAULT_TOPK) if flips else None
    unreadable: list[Unreadable] = []
    bar = tqdm(
        total=len(indices),
        unit="img",
        disable=not progress or not group.is_main,
        desc=f"{protocol.name} eval",
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    with bar:
        if isinstance(protocol, MultiCrop):
            transform = MultiScaleResize(
                description["scales"], cfg["input_size"][0], _interpolation(cfg)
            )
            loader = DataLoader(
                EvalView(dataset, indices, transform),
                batch_size=max(1, math.ceil(batch_size / description["crops_per_image"])),
                num_workers=num_workers,
                collate_fn=collate(stack=False),
                pin_memory=device.type == "cuda",
            )
            _run_multi_crop(
                loader, forward, metrics, unreadable, bar, protocol, description, device, batch_size
            )
        else:
            single = dict(cfg, crop_pct=description["crop_pct"], crop_mode=description["crop_mode"])
            transform = eval_transform(single)
            batches = single_crop_batches(
                dataset, indices, single, batch_size, num_workers, device.type == "cuda"
            )
            _run_single_crop(batches, forward, metrics, unflipped, unreadable, bar, device)
    description["transform"] = repr(transform)
    seconds = time.perf_counter() - start
    found = [(item.path, item.reason) for item in unreadable]
    if group.enabled:
        for counts in (metrics, unflipped):
            if counts is not None:
                counts.all_reduce(group)
        gathered = group.gather((found, seconds))
        found = [item for part, _ in gathered for item in part]
        seconds = max(part_seconds for _, part_seconds in gathered)
    engine = "onnxruntime" if precision == "int8" else runtime
    return EvalResult(
        metrics,
        classes,
        description,
        found,
        seconds,
        group.world_size,
        precision,
        engine,
        unflipped,
    )


def _run_single_crop(
    batches: Iterable[tuple[Any, torch.Tensor, list[Unreadable]]],
    forward: AdaptiveBatchForward,
    metrics: ClassificationMetrics,
    unflipped: ClassificationMetrics | None,
    unreadable: list[Unreadable],
    bar: tqdm,
    device: torch.device,
) -> None:
    """Count single-crop predictions (with their mirror images' where ``unflipped`` is kept)."""
    for inputs, labels, bad in batches:
        unreadable.extend(bad)
        if len(labels):
            images = inputs.to(device, non_blocking=True)
            logits = forward(images)
            if unflipped is not None:  # the mirror image votes too
                unflipped.update(logits, labels)
                logits = (logits + forward(images.flip(-1))) / 2
            metrics.update(logits, labels, loss=True)
        bar.update(len(labels) + len(bad))


def _run_multi_crop(
    loader: DataLoader,
    forward: AdaptiveBatchForward,
    metrics: ClassificationMetrics,
    unreadable: list[Unreadable],
    bar: tqdm,
    protocol: MultiCrop,
    description: dict[str, Any],
    device: torch.device,
    batch_size: int,
) -> None:
    size, interpolation = description["input_size"][-1], _interpolation(description)
    mean, std = description["mean"], description["std"]
    scales_per_image = len(description["scales"])

    def groups() -> Iterator[tuple[tuple[int, int, list[int]], torch.Tensor]]:
        # One group = the distinct crops among the 36 of one image at one scale, cut on the
        # device; ``inverse`` maps their scores back to all 36.
        for pyramids, labels, bad in loader:
            unreadable.extend(bad)
            bar.update(len(bad))
            for pyramid, label in zip(pyramids, labels.tolist(), strict=True):
                for level, scaled in enumerate(pyramid):
                    image = TF.to_dtype(
                        scaled.to(device, non_blocking=True), torch.float32, scale=True
                    )
                    keep, inverse = distinct_crops(multi_crop_boxes(*image.shape[-2:], size))
                    crops = multi_crop(image, size, interpolation)[keep]
                    yield (label, level, inverse), TF.normalize(crops, mean, std)

    per_scale: list[torch.Tensor] = []
    done_scores: list[torch.Tensor] = []
    done_labels: list[int] = []
    for (label, level, inverse), logits in _score_groups(groups(), forward, batch_size):
        per_scale.append(crop_scores(logits[inverse], protocol.score))
        if level + 1 < scales_per_image:
            continue
        done_scores.append(pool_multi_scale(torch.stack(per_scale), protocol.top_fraction))
        done_labels.append(label)
        per_scale = []
        bar.update(1)
        if len(done_labels) >= 256:
            metrics.update(torch.stack(done_scores), torch.tensor(done_labels))
            done_scores, done_labels = [], []
    if done_labels:
        metrics.update(torch.stack(done_scores), torch.tensor(done_labels))
