"""The report of a run: the like-for-like targets as ratios of that run, and its markdown."""

from __future__ import annotations

from typing import Any

from polynet.bench.candidates import REGISTRY, targets


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def evaluate_targets(results: list[dict[str, Any]], default_precision: str) -> list[dict[str, Any]]:
    """Every target whose two rows the run measured: the ratio, whether it is met, one line."""
    rows = {(r["candidate"], r["mode"]): r for r in results}
    evaluated = []
    for t in targets(default_precision):
        ours, ref = rows.get((t.ours, t.mode)), rows.get((t.reference, t.mode))
        if ours is None or ref is None:
            continue
        ratio = ours["images_per_s"] / ref["images_per_s"]
        entry: dict[str, Any] = dict(
            label=t.label,
            ours=t.ours,
            reference=t.reference,
            mode=t.mode,
            target=t.ratio,
            ratio=ratio,
            met=ratio >= t.ratio,
        )
        text = f"{t.label}: {t.ours}/{t.reference} = {ratio:.2f}x (target {t.ratio:.1f}x: "
        text += f"{_met(entry['met'])})"
        if t.memory:
            if "peak_mib" in ours and "peak_mib" in ref:
                entry["memory_ratio"] = ours["peak_mib"] / ref["peak_mib"]
                entry["memory_met"] = entry["memory_ratio"] <= 1.0
                text += f"; peak memory {entry['memory_ratio']:.2f}x (target at most 1.00x: "
                text += f"{_met(entry['memory_met'])})"
            else:
                entry["memory_ratio"] = entry["memory_met"] = None
                text += "; peak memory not measured"
        entry["text"] = text
        evaluated.append(entry)
    return evaluated


def _fmt(value: float | None, unit: str, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}{unit}"


def to_markdown(report: dict[str, Any]) -> str:
    """Render a report: machine, precision and settings, the table, the targets, the notes."""
    m, c, p = report["machine"], report["config"], report["precision"]
    gpu = f", {m['gpu']}" if "gpu" in m else ""
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in report["matmul_peak_gflops"].items())
    lines = [
        f"Precision: {', '.join(p['measured'])} ({p['why']}).",
        "",
        f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs){gpu}, torch {m['torch']}, "
        f"{c['threads']} threads, {c['device']}; matmul peaks (GFLOP/s, int8 GOP/s): {peaks}. "
        f"Input {c['batch_size']} x 3 x {c['image_size']} x {c['image_size']}, median of "
        f"{c['reps']} interleaved rounds.",
        "",
        "| candidate | mode | precision | images/s | vs port | GMACs/image | GFLOP/s | of peak | "
        "peak MiB | memory vs port | step MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        fraction = r.get("fraction_of_matmul_peak")
        lines.append(
            f"| {r['candidate']} | {r['mode']} | {r['precision']} | {r['images_per_s']:.3f} | "
            f"{_fmt(r.get('speed_vs_port'), 'x')} | {r['gmacs_per_image']:.2f} | "
            f"{r['gflops_per_s']:.1f} | {_fmt(fraction and 100 * fraction, ' %', 0)} | "
            f"{_fmt(r.get('peak_mib'), '', 0)} | {_fmt(r.get('memory_vs_port'), 'x')} | "
            f"{_fmt(r.get('step_mib'), '', 0)} |"
        )
    lines.append("")
    if report["targets"]:
        lines.append("Targets, as ratios of this run:")
        lines.append("")
        lines.extend(f"- {t['text']}" for t in report["targets"])
        lines.append("")
    lines.extend(
        f"- {r['candidate']} {r['mode']}: first step {r['compile_s']:.1f} s (compiling), "
        "not in the images/s"
        for r in report["results"]
        if "compile_s" in r
    )
    names = dict.fromkeys(r["candidate"] for r in report["results"])
    lines.extend(f"- {name}: {REGISTRY[name].description}" for name in names)
    lines.extend(f"- note: {n}" for n in report["notes"])
    return "\n".join(lines) + "\n"


__all__ = ["evaluate_targets", "to_markdown"]
