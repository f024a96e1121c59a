"""What a run reports: messages (``train.log``), TensorBoard, metrics tables and the curve."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from polynet.io.checkpoint import atomic_write
from polynet.io.outputs import write_text


class RunLog:
    """The reporting side of a run; in a multi-process run only the main process writes.

    Args:
        out: The run folder.
        enabled: Whether this process writes (the main process).

    """

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.out, self.enabled = out, enabled
        self.file = None
        self.writer = None

    def open_file(self) -> None:
        """Open ``train.log`` for appending (the folder exists)."""
        if self.enabled:
            self.file = open(self.out / "train.log", "a")  # noqa: SIM115 - closed in close()

    def open_writer(self, global_step: int) -> None:
        """Open the TensorBoard writer, dropping events past ``global_step`` (a resumed run)."""
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only when training

        self.writer = SummaryWriter(str(self.out / "tb"), purge_step=global_step or None)

    def __call__(self, message: str) -> None:
        """Print a message and append it to ``train.log``."""
        if not self.enabled:
            return
        tqdm.write(f"polynet: {message}", file=sys.stderr)
        if self.file:
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self.file.flush()

    def scalars(self, step: int, prefix: str, values: dict[str, float]) -> None:
        """Add scalars to TensorBoard under ``prefix/``."""
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.csv``, ``metrics.json`` (atomically) and ``curve.png``."""
        if not self.enabled:
            return
        keys = list(dict.fromkeys(k for row in history for k in row))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        write_text(self.out / "metrics.csv", table.getvalue())
        write_text(self.out / "metrics.json", json.dumps(history, indent=1))

    def close(self) -> None:
        """Close the files."""
        if self.writer:
            self.writer.close()
        if self.file:
            self.file.close()
        self.writer = self.file = None


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Save loss and top-1 per epoch (train and validation) as a PNG."""
    if not history:
        return
    import matplotlib  # slow to import: only at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "top1", "top-1 (%)")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        val = [(row["epoch"], row[f"val_{key}"]) for row in history if f"val_{key}" in row]
        if val:
            ax.plot(*zip(*val, strict=True), "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    for row in history:
        if row.get("path_drop"):
            ax_acc.axvline(row["epoch"] - 1, color="gray", ls="--", lw=0.8)
            break
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
