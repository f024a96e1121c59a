"""Evaluate a weights file on a named data set and write the reports: what ``polynet eval`` runs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from polynet.data import build_dataset
from polynet.evaluation.engine import EvalResult, Protocol, evaluate, model_config
from polynet.evaluation.report import (
    build_report,
    file_sha256,
    save_confusion_matrix,
    to_markdown,
    write_json,
)
from polynet.io.outputs import write_text

REPORT_FILES = ("report.json", "report.md", "confusion_matrix.png")


def evaluate_weights(
    weights: str | os.PathLike,
    data: str,
    split: str = "val",
    protocol: Protocol | None = None,
    *,
    model_name: str | None = None,
    **eval_kwargs: Any,
) -> tuple[dict[str, Any], EvalResult]:
    """Load a weights file, evaluate it on a data set and build the report.

    Args:
        weights: A polynet checkpoint, converted ``.safetensors`` or the released port's file
            (see :func:`polynet.io.loading.load_model`).
        data: ``"fashion-mnist"`` or an ImageNet-layout folder (see
            :func:`polynet.data.build_dataset`).
        split: The split to evaluate (``"val"`` is Fashion-MNIST's test split).
        protocol: :class:`~polynet.evaluation.SingleCrop` (default) or
            :class:`~polynet.evaluation.MultiCrop`.
        model_name: The registered model to build; by default the one the file names.
        **eval_kwargs: Passed to :func:`~polynet.evaluation.evaluate` (``batch_size``,
            ``device``, ``num_workers``, ``limit``, ``progress``, ``fuse``, ``precision``,
            ``runtime``). With ``precision="int8"`` the activation ranges are calibrated on
            256 evenly spaced images of the data set's ``train`` split (of the evaluated split
            where the data set has no training split, with a warning); ``"auto"`` is
            :func:`polynet.devices.default_precision` of the device.

    Returns:
        The report (see :func:`~polynet.evaluation.build_report`) and the raw result.

    """
    from polynet.io.loading import load_model

    model, file = load_model(weights, model_name)
    # Preprocessing recorded with converted weights wins over the registry's defaults.
    cfg = {**model_config(model), **file.pretrained_cfg}
    dataset = build_dataset(data, split)
    if eval_kwargs.get("precision") == "int8" and "calibration" not in eval_kwargs:
        eval_kwargs["calibration"] = _calibration_split(data, split, dataset)
    result = evaluate(model, dataset, protocol, cfg=cfg, **eval_kwargs)
    device = str(next(model.parameters()).device)
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(device)})"
    report = build_report(
        result,
        model=dict(
            name=model.pretrained_cfg.get("architecture", model_name or file.model_name),
            config=file.model_config or file.model_kwargs,
            parameters=sum(p.numel() for p in model.parameters()),
        ),
        weights=dict(path=str(weights), kind=file.kind, sha256=file_sha256(weights)),
        data=dict(source=data, split=getattr(dataset, "split", split)),
        device=device,
    )
    report["runtime"]["precision"] = result.precision
    report["runtime"]["engine"] = result.engine
    return report, result


def _calibration_split(data: str, split: str, dataset: Any) -> Any:
    """The training split to calibrate int8 on; the evaluated one where there is none."""
    if split == "train":
        return dataset
    try:
        return build_dataset(data, "train")
    except (FileNotFoundError, ValueError):
        warnings.warn(
            f"{data} has no train split; calibrating int8 on the evaluated {split} split",
            RuntimeWarning,
            stacklevel=3,
        )
        return dataset


def write_reports(
    report: dict[str, Any],
    out_dir: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``confusion_matrix.png`` and/or one JSON file.

    Args:
        report: From :func:`evaluate_weights` or :func:`~polynet.evaluation.build_report`.
        out_dir: Folder for the three report files.
        json_path: Where to write the JSON report on its own.

    Returns:
        The files written.

    """
    written = []
    if json_path is not None:
        write_json(report, json_path)
        written.append(Path(json_path))
    if out_dir is not None:
        out = Path(out_dir)
        json_file, markdown_file, png_file = (out / name for name in REPORT_FILES)
        write_json(report, json_file)
        write_text(markdown_file, to_markdown(report))
        title = f"{report['model']['name']}, {report['protocol']['name']}"
        save_confusion_matrix(
            report["confusion_matrix"], report["data"]["classes"], png_file, title
        )
        written += [json_file, markdown_file, png_file]
    return written
