"""Evaluation: single-crop and the paper's multi-crop top-k pooling, metrics and reports.

Example::

    from polynet.data import build_dataset
    from polynet.evaluation import MultiCrop, evaluate

    dataset = build_dataset("fashion-mnist", "test")
    result = evaluate(model, dataset, MultiCrop())
    print(result.metrics.summary())
"""

from polynet.evaluation.crops import (
    CROPS_PER_SCALE,
    DEFAULT_SCALE_RATIOS,
    CropBox,
    MultiScaleResize,
    default_scales,
    distinct_crops,
    multi_crop,
    multi_crop_boxes,
)
from polynet.evaluation.engine import (
    AdaptiveBatchForward,
    EvalResult,
    MultiCrop,
    SingleCrop,
    describe_protocol,
    evaluate,
    model_config,
)
from polynet.evaluation.metrics import ClassificationMetrics, topk_correct
from polynet.evaluation.pooling import crop_scores, pool_multi_scale, pooled_count, top_k_pool
from polynet.evaluation.report import (
    build_report,
    save_confusion_matrix,
    to_markdown,
    write_json,
)

__all__ = [
    "CROPS_PER_SCALE",
    "DEFAULT_SCALE_RATIOS",
    "AdaptiveBatchForward",
    "ClassificationMetrics",
    "CropBox",
    "EvalResult",
    "MultiCrop",
    "MultiScaleResize",
    "SingleCrop",
    "build_report",
    "crop_scores",
    "default_scales",
    "describe_protocol",
    "distinct_crops",
    "evaluate",
    "model_config",
    "multi_crop",
    "multi_crop_boxes",
    "pool_multi_scale",
    "pooled_count",
    "save_confusion_matrix",
    "to_markdown",
    "top_k_pool",
    "topk_correct",
    "write_json",
]
