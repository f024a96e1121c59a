"""Tables and the markdown report of a study: setup, compute, findings, results, figure.

The accuracy compared is top-5 where top-5 means something (more than 20 classes, as on
ImageNet) and top-1 otherwise (on Fashion-MNIST's 10 classes top-5 is close to 100 % for every
config). Per config the tables give the mean over seeds and its 95 % Student's t interval;
the findings follow the paired-by-seed rule of :mod:`polynet.ablation.stats`.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from polynet.ablation.aggregate import Point, aggregate
from polynet.ablation.findings import FINDINGS, Finding
from polynet.ablation.plots import PLOTS, error_bar_note
from polynet.ablation.stats import CONFIDENCE, POWER
from polynet.ablation.studies import Study
from polynet.io.checkpoint import atomic_write

TABLE_COLUMNS = (
    "config",
    "label",
    "family",
    "group",
    "units",
    "params",
    "macs",
    "seconds_per_iter",
    "seeds",
    "top1",
    "top1_low",
    "top1_high",
    "top1_sd",
    "top5",
    "top5_low",
    "top5_high",
    "top5_sd",
    "eval_images",
    "missing_seeds",
)
# The recipe settings each result records and the report lists (a run measured in steps
# leaves out its epochs).
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


def choose_metric(num_classes: int) -> str:
    """``"top5"`` for many classes, ``"top1"`` when top-5 is saturated (20 classes or fewer)."""
    return "top5" if num_classes > 20 else "top1"


def _write_text(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def _table_record(p: Point) -> dict[str, Any]:
    record: dict[str, Any] = {k: getattr(p, k) for k in TABLE_COLUMNS if hasattr(p, k)}
    for metric in ("top1", "top5"):
        iv = p.interval(metric)
        record[metric] = None if iv is None else round(iv.mean, 3)
        for end in ("low", "high", "sd"):
            value = None if iv is None else getattr(iv, end)
            record[f"{metric}_{end}"] = None if value is None else round(value, 3)
    record["missing_seeds"] = " ".join(str(s) for s in p.missing_seeds)
    return record


def write_tables(
    points: Sequence[Point],
    rows: Sequence[dict[str, Any]],
    out: Path,
    metric: str,
    findings: Sequence[Finding] = (),
    missing: Sequence[str] = (),
) -> None:
    """Write ``results.csv`` (one row per config) and ``results.json`` (everything)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for p in points:
        writer.writerow(_table_record(p))
    _write_text(out / "results.csv", buffer.getvalue())
    payload = dict(
        metric=metric,
        confidence=CONFIDENCE,
        configs=[p.to_dict() for p in points],
        findings=[f.to_dict() for f in findings],
        missing=list(missing),
        runs=[{k: v for k, v in r.items() if k != "recipe"} for r in rows],
    )
    _write_text(out / "results.json", json.dumps(payload, indent=1))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _utc(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))


def recipe_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The recipe every config trained with, from the first result's recorded settings."""
    if not rows:
        return ""
    first = rows[0]
    settings = first.get("settings") or first.get("recipe", {})
    shown = {k: settings[k] for k in REPORTED if settings.get(k) is not None}
    if shown.get("steps") is not None:
        shown.pop("epochs", None)  # the run length is in steps
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def compute_summary(rows: Sequence[dict[str, Any]], timing_seconds: float | None) -> list[str]:
    """Lines on the compute the results took: run time, processes, devices, wall-clock span."""
    if not rows:
        return []
    wall = sum(r.get("wall_seconds", 0.0) for r in rows)
    train = sum(r.get("train_seconds", 0.0) for r in rows)
    evaluation = sum(r.get("eval_seconds", 0.0) for r in rows)
    process = sum(r.get("wall_seconds", 0.0) * r.get("world_size", 1) for r in rows)
    devices = sorted({str(r["device"]) for r in rows if "device" in r}) or ["not recorded"]
    worlds = sorted({r.get("world_size", 1) for r in rows})
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    capabilities = sorted({r["cpu_capability"] for r in rows if r.get("cpu_capability")})
    lines = [
        f"- Compute: {_duration(wall)} of run time over {len(rows)} runs (training "
        f"{_duration(train)}, evaluation {_duration(evaluation)}); {_duration(process)} of "
        f"process time on {', '.join(devices)}, {'/'.join(map(str, worlds))} "
        f"process{'' if worlds == [1] else 'es'} per run"
        + (
            f", {'/'.join(map(str, threads))} CPU thread{'' if threads == [1] else 's'}"
            if threads
            else ""
        )
        + (f" ({', '.join(capabilities)})" if capabilities else "")
        + (f"; timing pass {_duration(timing_seconds)}" if timing_seconds else "")
        + ". A run resumed after a kill counts its last session only."
    ]
    starts = [r["started_at"] for r in rows if "started_at" in r]
    ends = [r["finished_at"] for r in rows if "finished_at" in r]
    if starts and ends:
        lines.append(
            f"- Wall time: {_duration(max(ends) - min(starts))} from the first run's start "
            f"({_utc(min(starts))}) to the last one's end ({_utc(max(ends))}), pauses and "
            "parallel jobs included."
        )
    return lines


def _rule(seeds: int) -> str:
    text = (
        "Every accuracy comparison is paired by seed: the difference of two configs' accuracy "
        "within each seed (seed s of every config trains on the same images in the same "
        f"order). A finding *holds* or *does not hold* only when the {100 * CONFIDENCE:.0f} % "
        "interval (Student's t over the seeds) of each paired difference it rests on excludes "
        "zero; "
        "otherwise it is *unresolved at this scale*, and the evidence gives the minimum "
        "detectable difference: the true difference a two-sided 5 % paired t-test would find "
        f"with {100 * POWER:.0f} % power at the observed spread of the paired differences, "
        "(t_0.975 + t_0.80) x sd / sqrt(n), in points. Brackets are 95 % intervals; they are "
        "per comparison, not corrected for the number of comparisons. Findings on costs "
        "(parameter counts, the timing pass) involve no seed."
    )
    if seeds < 2:
        text += (
            " A config with one seed has no interval: every accuracy finding that rests on it "
            "is *unresolved (one seed)*, and its numbers are single runs."
        )
    return text


def to_markdown(
    study: Study,
    points: Sequence[Point],
    findings: Sequence[Finding],
    metric: str,
    context: dict[str, Any],
    figure: str | None,
    rows: Sequence[dict[str, Any]] = (),
) -> str:
    """Render the report: setup and compute, findings with verdicts, the table, the plot."""
    seeds = sorted({s for p in points for s in p.series(metric)})
    fewest = min((p.seeds for p in points), default=0)
    images = min((p.eval_images for p in points), default=0)
    missing = list(context.get("missing", ()))
    num_classes = context.get("num_classes") or len(context.get("classes", ()))
    lines = [
        f"# Ablation study `{study.name}`: {study.title}",
        "",
        f"Mirrors the paper's {study.figure}.",
        "",
        "## Setup",
        "",
        f"- Data: {context.get('data')} ({num_classes} classes); each run evaluated single-crop "
        f"on {images:,} validation images. Accuracy compared: {metric} "
        f"({'top-5 is saturated with 10 classes' if metric == 'top1' else 'as in the paper'}).",
        f"- Scale: {context.get('scale')}; {len(points)} config{'' if len(points) == 1 else 's'}.",
        f"- Recipe (every config): {recipe_summary(rows)}",
        f"- Seeds: {', '.join(map(str, seeds)) or 'none'} (at least {fewest} per config); seed "
        "s sets the initialisation, data order, augmentation and training subset of its run.",
        f"- Results: {len(rows)} config/seed runs"
        + (f"; missing (no result yet): {', '.join(missing)}" if missing else "; none missing")
        + ".",
        *compute_summary(rows, context.get("timing_seconds")),
        "",
        "## Findings",
        "",
        _rule(fewest),
        "",
    ]
    for i, f in enumerate(findings, 1):
        lines.append(f"{i}. **{f.claim}** — *{f.verdict}*. {f.evidence}.")
    lines += [
        "",
        "## Results",
        "",
        "Mean over seeds and, with two or more, its 95 % interval (Student's t).",
        "",
        "| config | group | params | MMACs | ms/iter | top-1 (%) | top-5 (%) | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        cells = []
        for m in ("top1", "top5"):
            iv = p.interval(m)
            cell = "-" if iv is None else f"{iv.mean:.2f}"
            if iv is not None and iv.half_width is not None:
                cell += f" [{iv.low:.2f}, {iv.high:.2f}]"
            cells.append(cell)
        ms = "-" if p.seconds_per_iter is None else f"{p.ms:.0f}"
        lines.append(
            f"| {p.label}{' (baseline)' if p.baseline else ''} | {p.group or p.family} | "
            f"{p.params:,} | {p.macs / 1e6:.1f} | {ms} | {cells[0]} | {cells[1]} | {p.seeds} |"
        )
    if figure:
        lines += ["", f"![{study.figure}]({figure})", "", f"Figure: {error_bar_note(points)}."]
    lines += [
        "",
        "Time per iteration is one training step (forward, backward, optimizer) on one fixed "
        "batch, measured round-robin over all configs in one process so that drift of the "
        "machine's speed cancels; MACs are for one image at the model's input size.",
        "",
    ]
    return "\n".join(lines)


def write_outputs(
    study: Study, rows: Sequence[dict[str, Any]], out: Path, context: dict[str, Any]
) -> list[Path]:
    """Write the tables, the plot and ``report.md`` of a study; return the files written.

    Args:
        study: The study.
        rows: Result rows (one per config and seed), with ``seconds_per_iter`` where timed.
        out: The folder to write into.
        context: ``data``, ``scale``, ``num_classes`` (or ``classes``), ``missing`` (pairs
            without a result) and ``timing_seconds`` for the report.

    """
    num_classes = context.get("num_classes") or len(context.get("classes", ())) or 10
    metric = choose_metric(num_classes)
    missing = list(context.get("missing", ()))
    points = aggregate(study, rows, missing)
    if not points:
        return []
    findings = FINDINGS[study.name](points, metric) if study.name in FINDINGS else []
    write_tables(points, rows, out, metric, findings, missing)
    written = [out / "results.csv", out / "results.json"]
    figure = None
    if study.name in PLOTS:
        figure, plot = PLOTS[study.name]
        plot(points, out / figure, metric)
        written.append(out / figure)
    report = to_markdown(study, points, findings, metric, context, figure, rows)
    _write_text(out / "report.md", report)
    written.append(out / "report.md")
    return written
