"""The run folder: which files a run owns, checkpoint rotation, and resuming from it.

A run is identified by the settings that define what it computes
(:func:`~polynet.training.config.defines_run`). A bare ``--resume`` continues the run saved in
``--out`` from its own ``config.yaml``; settings of how it runs (threads, workers, progress,
logging and checkpoint cadence, where the folder is or how its path is spelled) may differ, and
an explicit setting that would change the run is refused with the key and a fix that keeps it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from polynet.errors import UserError
from polynet.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from polynet.io.outputs import write_json, write_text
from polynet.training.config import TrainConfig, build_config, defines_run, load_yaml

CONFIG_FILE = "config.yaml"
PLAN_FILE = "plan.json"
LOCK_FILE = ".lock"
# Files a run writes into its output folder (``--overwrite`` removes only these and tb/).
RUN_FILES = (
    CONFIG_FILE,
    PLAN_FILE,
    "last.pt",
    "last.next.pt",
    "last.prev.pt",
    "best.pt",
    "metrics.csv",
    "metrics.json",
    "result.json",
    "curve.png",
    "train.log",
)
# Newest first: ``last.next.pt`` exists only if a save was cut between its two renames.
_RESUME_ORDER = ("last.next.pt", "last.pt", "last.prev.pt")


def holds_run(out: str | os.PathLike) -> bool:
    """Whether a training run has been started in ``out``."""
    return (Path(out) / CONFIG_FILE).is_file()


def resumed_config(explicit: Mapping[str, Any]) -> TrainConfig:
    """The configuration of the run saved in ``explicit["out"]``, for ``--resume``.

    Args:
        explicit: The settings given for this invocation (preset, YAML file and flags).

    Returns:
        The saved run's configuration with this invocation's how-settings (and ``out``).

    Raises:
        UserError: If an explicit setting would change what the run computes.

    """
    out = Path(explicit.get("out", TrainConfig.__dataclass_fields__["out"].default))
    if not holds_run(out):
        return build_config(**{**explicit, "resume": True})
    saved = load_yaml(out / CONFIG_FILE)  # plain data only; a bad file is a clear error
    known = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
    saved_cfg = build_config(**{**known, "resume": False, "overwrite": False})
    wanted = build_config(**{**known, **explicit, "resume": False, "overwrite": False})
    before, after = saved_cfg.to_dict(), wanted.to_dict()
    for key in explicit:
        if defines_run(key) and before[key] != after[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"the run in {out} was started with {key}={before[key]!r}, not {after[key]!r}; "
                f"drop {flag} to continue it as it was, or start a new run with another --out "
                f"(--init-from {out / 'last.pt'} starts from its weights)"
            )
    how = {k: v for k, v in explicit.items() if not defines_run(k)}
    return build_config(**{**known, **how, "out": str(out), "resume": True, "overwrite": False})


class RunFolder:
    """A run's output folder.

    Args:
        out: The folder.
        is_main: Whether this process writes (the main process of a multi-process run).

    """

    def __init__(self, out: str | os.PathLike, is_main: bool = True) -> None:
        self.out = Path(out)
        self.is_main = is_main
        self._created = False
        self._lock: int | None = None

    def claim(self) -> None:
        """Make this process the folder's one writer, or refuse at once naming the holder.

        The claim is an exclusive ``flock`` on the folder itself (main process), which the
        kernel drops when its holder exits, however it exits (a SIGKILL too), and which
        travels with the folder when it is moved: a dead holder's folder is taken over, a live
        one's never. While it is held, ``.lock`` names the holder; a clean exit removes it.

        Raises:
            UserError: If another process is training in the folder, or it cannot be made.

        """
        if not self.is_main:
            return
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output {self.out} is a file; choose another --out")
        self._created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:  # a file in the path, a read-only or full file system, ...
            raise UserError(
                f"cannot create output folder {self.out}: {err.strerror}; choose another --out"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = (self.out / LOCK_FILE).read_text().strip()
            except OSError:
                holder = ""
            raise UserError(
                f"output folder {self.out} is in use by {holder or 'another process'}; wait for "
                "it to end, stop it, or choose another --out"
            ) from None
        self._lock = fd
        command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
        (self.out / LOCK_FILE).write_text(
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({command})\n"
        )

    def release(self) -> None:
        """Give the folder up."""
        if self._lock is not None:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None

    def check(self, cfg: TrainConfig) -> None:
        """Refuse a folder that holds another run unless resuming or overwriting."""
        if holds_run(self.out) and not (cfg.resume or cfg.overwrite):
            raise UserError(
                f"output folder {self.out} already holds a run; pass --resume to continue it, "
                "or choose another --out (--overwrite replaces it, deleting its checkpoints)"
            )
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output {self.out} is a file; choose another --out")

    def prepare(self, cfg: TrainConfig) -> None:
        """Create the folder (main process) and, with ``overwrite``, remove the old run's files."""
        if not self.is_main:
            return
        if cfg.overwrite:
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / "tb", ignore_errors=True)
        self._created = self._created or not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file in the path, a read-only or full file system, ...
            raise UserError(
                f"cannot create output folder {self.out}: {err.strerror}; choose another --out"
            ) from err
        if not os.access(self.out, os.W_OK):
            raise UserError(f"output folder {self.out} is not writable; choose another --out")
        if cfg.resume:
            # Temporary files of saves killed mid-write (SIGKILL, power loss) are never read.
            for name in RUN_FILES:
                for stale in self.out.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)

    def abandon(self) -> None:
        """Remove the folder again if this start created it and wrote nothing of a run."""
        if self.is_main and self._created and self.out.is_dir():
            leftovers = [
                p
                for p in self.out.iterdir()
                if p.name not in ("train.log", "tb", PLAN_FILE, LOCK_FILE)
            ]
            if not leftovers:
                shutil.rmtree(self.out, ignore_errors=True)

    def write_config(self, cfg: TrainConfig) -> None:
        """Record the run's configuration (once it has started, so a failed start is not a run)."""
        if self.is_main:
            write_text(self.out / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def record_plan(self, plan: dict[str, Any], time_budget: float | None) -> None:
        """Add a plan of the run's length to ``plan.json`` (what was asked stays in config)."""
        if not self.is_main:
            return
        path = self.out / PLAN_FILE
        plans = json.loads(path.read_text()).get("plans", []) if path.is_file() else []
        write_json(path, dict(time_budget=time_budget, plans=[*plans, plan]))

    def save(self, payload: dict[str, Any], best: bool = False) -> None:
        """Write ``last.pt`` (keeping the one before as ``last.prev.pt``) and maybe ``best.pt``."""
        if not self.is_main:
            return
        # Write the new file completely before touching the old ones: a full disk or a crash
        # leaves last.pt (or, between the renames, last.next.pt) usable.
        last, following = self.out / "last.pt", self.out / "last.next.pt"
        save_checkpoint(following, payload)
        if last.exists():
            os.replace(last, self.out / "last.prev.pt")
        os.replace(following, last)
        if best:
            save_checkpoint(self.out / "best.pt", payload)

    def latest_checkpoint(
        self, map_location: Any = "cpu", warn: Any = print
    ) -> dict[str, Any] | None:
        """The newest readable checkpoint's payload, or None when the run has saved none.

        Raises:
            CheckpointError: If checkpoints exist but none can be read (they are left alone).

        """
        unusable = []
        for name in _RESUME_ORDER:
            path = self.out / name
            if not path.exists():
                continue
            try:
                return load_checkpoint(path, map_location=map_location)
            except CheckpointError as err:
                unusable.append(name)
                warn(f"warning: {err}; trying the previous checkpoint")
        if unusable:
            raise CheckpointError(
                f"no usable checkpoint in {self.out} ({', '.join(unusable)} unreadable, left "
                "untouched); restore one from a copy, or start a new run with another --out"
            )
        return None

    def newest_saved(self) -> Path | None:
        """The checkpoint a resume would read first, if any exists."""
        return next((self.out / n for n in _RESUME_ORDER if (self.out / n).exists()), None)

    def write_result(self, summary: dict[str, Any]) -> None:
        """Write ``result.json`` atomically."""
        if self.is_main:
            write_json(self.out / "result.json", summary)
