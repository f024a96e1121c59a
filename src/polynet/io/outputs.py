"""Output files: checked before the work starts, written atomically, never over an input.

Every command that writes a result calls :func:`check_output` for each output first, so a
bad path fails in a second instead of after an hour of evaluation, and an existing file is
only replaced with ``--overwrite``. An input is never replaced, not even with ``--overwrite``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from polynet.errors import UserError
from polynet.io.checkpoint import atomic_write


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _writable_dir(folder: Path) -> Path | None:
    """The nearest existing ancestor of ``folder`` if it cannot take new files, else None."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return probe
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return probe
    return None


def check_output(
    path: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    what: str = "output",
    folder: bool = False,
) -> Path:
    """Check that ``path`` can be written without losing anything, before any work is done.

    Args:
        path: The output file (or folder, with ``folder=True``).
        inputs: Files the command reads; the output may be none of them.
        overwrite: Whether an existing output may be replaced.
        what: The option that named the path, for the message (``"--out"``).
        folder: ``path`` is a folder that will receive files (it may exist).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        UserError: For an output that is an input, exists without ``overwrite``, or lies
            where files cannot be created.

    """
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise UserError(
                f"{what} {path} is an input of this command; write the output somewhere else"
            )
    if folder:
        if path.exists() and not path.is_dir():
            raise UserError(f"{what} {path} is a file, not a folder; choose another {what}")
        target = path
    else:
        if path.is_dir():
            raise UserError(f"{what} {path} is a folder; give a file name")
        if path.exists() and not overwrite:
            raise UserError(
                f"{what} {path} already exists; pass --overwrite to replace it or choose "
                "another name"
            )
        target = path.parent
    blocked = _writable_dir(target)
    if blocked is not None:
        reason = (
            "is not a folder" if blocked.exists() and not blocked.is_dir() else ("is not writable")
        )
        raise UserError(f"cannot write {what} {path}: {blocked} {reason}; choose another {what}")
    return path


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (a crash leaves the old file or the whole new one)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Write JSON atomically, indented, with a final newline."""
    write_text(path, json.dumps(value, indent=1) + "\n")
